"""lm-evaluation-harness's `mlxlab` model: any model mlxlab scores (a finished run with its LoRA
adapters unfused, its best or last checkpoint; a Hugging Face / mlx-lm / exported folder; a
GGUF file, 4-bit ones kept quantized; ollama:NAME; a hub id) as an lm-eval `LM`.

    import mlxlab.evaluation.lm_eval.registered   # registers the name "mlxlab" with lm-eval
    lm_eval.simple_evaluate(model="mlxlab", model_args="model=outputs/ft/<time>", tasks=[...])

lm-eval 0.4 finds models only in its own registry (no plugin discovery), so its command runs
with the model registered through `python -m mlxlab.evaluation.lm_eval.command` (the same arguments
as `lm_eval`). `harness_lm` is what `mlxlab eval --tasks` scores with.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model

from mlxlab.errors import ConfigError
from mlxlab.evaluation.lm_eval.model import MlxlabLM, hf_tokenizer
from mlxlab.runs.named_model import EvalModel, load_eval_model

DEFAULT_BATCH = 16


def harness_lm(source: EvalModel, batch_size: int = DEFAULT_BATCH,
               add_bos_token: bool | None = None, max_length: int | None = None) -> MlxlabLM:
    """lm-eval's view of a loaded model (runs/named_model.py load_eval_model)."""
    return MlxlabLM(source.model, hf_tokenizer(source.tokenizer_folder or source.path),
                    batch_size, add_bos_token, max_length, name=source.path.name)


def _batch_size(value: Any) -> int:
    """lm-eval's --batch_size: a number, "auto" (mlxlab's default here) or nothing."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        return max(1, int(value))
    except ValueError:
        raise ConfigError(f"batch_size={value!r}: give a number of sequences") from None


@register_model("mlxlab")
class MlxlabModel(MlxlabLM):
    """`--model mlxlab --model_args model=RUN[,checkpoint=last][,add_bos_token=True]
    [,max_length=N]`: `model` is what `mlxlab eval` takes."""

    def __init__(self, model: str, checkpoint: str = "best", batch_size: Any = None,
                 add_bos_token: bool | None = None, max_length: int | None = None,
                 device: Any = None, max_batch_size: Any = None, **unknown: Any) -> None:
        if unknown:  # device, max_batch_size: lm-eval passes them to every model; MLX picks
            raise ConfigError(f"--model_args {', '.join(sorted(unknown))}: the mlxlab model "
                              "takes model, checkpoint, add_bos_token, max_length")
        source = load_eval_model(str(model), str(checkpoint), "plain", "lm-eval tasks")
        super().__init__(source.model, hf_tokenizer(source.tokenizer_folder or source.path),
                         _batch_size(batch_size), add_bos_token, max_length,
                         name=source.path.name)
        self.source = source
