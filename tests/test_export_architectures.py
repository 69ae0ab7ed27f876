"""Export is right or refused, per architecture (export/architectures.py).

Every model_type in `LAYOUTS` is trained here (LoRA, 3 steps, from a tiny random folder that
transformers writes) and exported both ways: transformers loads `--format hf` with no missing or
unexpected tensor and mlxlab's logits to 1e-4, and mlx-lm loads `--format mlx-lm` with them
too. The list is the parametrization, so an entry without a tiny model and this proof fails
here. A type that mlxlab trains but the list does not hold is refused in one line, exit 2,
before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model, tiny, torch_logits
from mlxlab.export import export_run
from mlxlab.export.architectures import LAYOUTS
from mlxlab.models.mlx_lm_decoder import MLXLMDecoder
from mlxlab.runs import load_run_model
from test_mlx_lm_decoders import ARCHS, IDS, train_chat


# The types test_mlx_lm_decoders.py trains and loads in transformers in the default run take
# their mlx-lm half here with -m slow; the others are proven here in the default run (3-7 s each
# on a loaded 2-core box).
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ARCHS else k
                                  for k in sorted(LAYOUTS)])
def test_each_exportable_architecture_loads_in_transformers_and_mlx_lm(kind, tmp_path):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(kind, tmp_path / f"tiny-{kind}", chat=ARCHS.get(kind, "chatml"))
    _, run = train_chat(folder, tmp_path)
    model, _ = load_run_model(run)
    assert isinstance(model, MLXLMDecoder) and model.architecture["model_type"] == kind
    ours = mlx_logits(model, IDS)
    base = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(folder)), IDS)
    assert np.abs(base - ours).max() > 1e-3  # the adapters changed the model

    export_run(run, tmp_path / "hf", "hf", "float32")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(torch_logits(hf.eval(), IDS) - ours).max() <= 1e-4
    # the tensor names are the checkpoint's own: what transformers wrote for the base model
    from safetensors import safe_open

    def names(path: Path) -> set[str]:
        with safe_open(str(path / "model.safetensors"), "np") as f:
            return set(f.keys())

    assert names(tmp_path / "hf") == names(folder)

    export_run(run, tmp_path / "mlx", "mlx-lm", "float32")
    theirs, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert np.abs(np.array(theirs(mx.array(IDS))) - ours).max() <= 1e-4


def save_tiny_qwen2_moe(path: Path) -> Path:
    """A Qwen2-MoE (shared expert and its gate beside the routed ones): an architecture mlx-lm
    loads and mlxlab trains whose export no test proves."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig

    tok = tiny.tiny_tokenizer("qwen2", chat="chatml")
    config = Qwen2MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        max_position_embeddings=256, eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    file = path / "config.json"
    file.write_text(json.dumps(tiny.hub_config(json.loads(file.read_text()))))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                            chat_template=tiny.CHATML).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unproven_run(tmp_path_factory) -> Path:
    if "qwen2_moe" in LAYOUTS:
        pytest.fail("qwen2_moe is proven now: refuse another architecture here")
    root = tmp_path_factory.mktemp("unproven")
    return train_chat(save_tiny_qwen2_moe(root / "tiny-qwen2_moe"), root)[1]


@pytest.mark.parametrize("fmt", ["hf", "mlx-lm", "gguf"])
def test_an_architecture_without_a_proven_export_is_refused_before_writing(fmt, unproven_run,
                                                                          tmp_path, capsys):
    from mlxlab.cli.export import main

    run = unproven_run
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    capsys.readouterr()  # transformers' progress bars while the folder was written
    assert main([str(run), "--format", fmt, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model_type='qwen2_moe' has no proven export" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
