"""The request checked against the loaded run before anything is written: the options the model
has an export for, whether transformers can check it here, the caller's own refusals, PEFT's
conditions, and --out. Each failure is one ExportError line (the CLI's `error:`)."""

from __future__ import annotations

from mlxlab.export.architectures import HYBRIDS_TESTED, TESTED
from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.export.peft_adapter import check_peft
from mlxlab.export.proof import checker_version, peft_available, peft_base, unchecked
from mlxlab.export.request import FORMATS, ExportRequest, LoadedRun
from mlxlab.export.vision import check_vision_options
from mlxlab.models.adapters.lora import has_adapters
from mlxlab.models.adapters.routed_experts import dora_on_experts
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.vision.vision_language import VisionLanguageModel


def validated(request: ExportRequest, loaded: LoadedRun) -> tuple[ExportRequest, dict | None]:
    """The request with its dtype settled, and None when the export will be checked in
    transformers (else the record of why it is written unchecked); an ExportError line for
    anything the run has no such export of, before a file is written."""
    model, state = loaded.model, loaded.state
    if request.quantization and request.quantization.method != "rtn" and request.fmt != "mlx-lm":
        raise ExportError(f"--quantize-method {request.quantization.method} calibrates mlx-lm's "
                          "quantization: add --format mlx-lm --quantize 4 (or 8)")
    request = request.with_dtype_of(model)
    _check_options(model, request.fmt, request.dtype, request.bits, request.lora)
    not_checked = _checker(model, state, request.fmt, request.check)
    if request.refuse is not None:
        request.refuse(model, state)
    if request.fmt == "peft":
        check_peft(state.config.get("model") or {},
                   isinstance(model, MLXLMDecoder) and bool(model.quantized), has_adapters(model),
                   dora_on_experts(model))
    out = request.out
    if out.exists() and any(out.iterdir()) and not request.overwrite:
        raise ExportError(f"{out} exists and is not empty: pick a new --out or pass --overwrite")
    if request.lora == "adapters" and not has_adapters(model) and request.fmt != "peft" \
            and not isinstance(model, VisionLanguageModel):
        raise ExportError("--adapters needs a LoRA run (model.lora.rank > 0); this run has none")
    return request, not_checked


def _check_options(model, fmt: str, dtype: str, quantize: int | None, lora: str) -> None:
    """The request's options against the model it exports: one ExportError line for what this
    model has no such export of."""
    if isinstance(model, VisionLanguageModel):
        check_vision_options(fmt, quantize, lora, model.hf_config.get("model_type"))
        if dtype not in DTYPES:
            raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
        return
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {list(DTYPES)}")
    if lora not in ("fuse", "adapters"):
        raise ExportError(f"lora={lora!r}: use --fuse-lora or --adapters")
    if isinstance(model, MLXLMDecoder) and model.head == "score":
        raise ExportError("this run is a reward model (model.head=score): mlxlab exports "
                          "next-token decoders only, so its scores stay in mlxlab (a GRPO "
                          "reward: objectives.rewards.learned_reward)")
    if isinstance(model, BertClassifier):
        if fmt != "hf" or quantize or lora == "adapters":
            raise ExportError(
                "a BERT classifier exports only as --format hf (fused LoRA, no quantization): "
                "mlx-lm has no sequence classifiers"
            )
    elif not isinstance(model, (Transformer, MLXLMDecoder)):
        raise ExportError(f"a {type(model).__name__} run has no Hugging Face equivalent")
    elif isinstance(model, MLXLMDecoder) and model.quantized and quantize:
        raise ExportError(f"the model is already {model.quantized_bits()}-bit quantized: export "
                          "it without --quantize (it stays quantized in --format mlx-lm)")
    elif fmt == "mlx-lm" and isinstance(model, Transformer) and model.architecture["mlp"] != "swiglu":
        # mlx-lm's llama/qwen2/mistral MLP is silu(gate) * up whatever config.json says
        raise ExportError(f"mlp={model.architecture['mlp']} has no mlx-lm equivalent (its Llama "
                          "MLP is always swiglu): export it with --format hf")
    if fmt in ("hf", "peft") and (quantize or lora == "adapters"):
        raise ExportError(
            "--quantize and --adapters write mlx-lm's layouts: use --format mlx-lm "
            "(transformers cannot read mlx quantization)"
        )


def _checker(model, state, fmt: str, check: bool) -> dict | None:
    """None when the export will be checked (transformers can load it here), else the record
    of why it is written unchecked; a model type no test proves is refused when nothing here
    can check it."""
    if fmt == "mlx-vlm" or isinstance(model, VisionLanguageModel):
        return None  # checked where it is written (export/vision.py)
    if fmt == "mlx-lm":
        if not check:
            raise ExportError("--no-check is for --format hf, peft and gguf: --format mlx-lm is "
                              "mlx-lm's own layout, which is not loaded in transformers")
        return None
    if not check:
        return unchecked("written with --no-check, not loaded in transformers")
    version = checker_version()
    if fmt == "peft":
        base = peft_base(state.config.get("model") or {})
        why = ("PyTorch is not installed, so transformers could not load it here"
               if version is None else "peft is not installed" if not peft_available()
               else None if base is not None
               else "its base is not a Hugging Face folder transformers loads here")
        return None if why is None else unchecked(why)
    if version is not None:
        return None
    kind = model.architecture.get("model_type") if isinstance(model, MLXLMDecoder) else None
    if kind is not None and kind not in (*TESTED, *HYBRIDS_TESTED):
        raise ExportError(
            f"model_type={kind!r} is checked as it is exported, by loading it in transformers, "
            "which needs PyTorch (not installed here), and no mlxlab test proves its export: "
            "pip install torch, or pass --no-check to write it unchecked")
    return unchecked("PyTorch is not installed, so transformers could not load it here"
                     + (f"; model_type={kind!r} is one mlxlab's tests export and check"
                        if kind else ""))
