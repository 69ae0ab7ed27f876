"""A LoRA / DoRA run's adapters alone as a PEFT folder: adapter_config.json and
adapter_model.safetensors on the base checkpoint's Hugging Face module names, what
`PeftModel.from_pretrained(base, folder)` loads, and what vLLM, llama.cpp's LoRA converter and
Ollama's ADAPTER take.

mlxlab's layer computes y = W x + s * (x A) B with A (in, r), B (r, out), s = alpha / r; PEFT's
computes W x + (lora_alpha / r) * B' A' x with A' = A^T (r, in), B' = B^T (out, r): the same
function with lora_alpha = s * r. DoRA's magnitude m (one per output row, over the adapted
row's norm) is PEFT's lora_magnitude_vector under use_dora.

Refused, in one line before anything is written: a run without adapters (full fine-tuning:
--format hf), a quantized base (the adapters were trained on its rounded weights, which a float
base in transformers does not have), modules trained in full beside the adapters
(extra_trainable), and an adapter on a module the Hugging Face checkpoint has no Linear for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import mlx.core as mx

from mlxlab.export.hf import ExportError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_peft(model_config: Mapping, quantized_base: bool, has_adapters: bool) -> None:
    """What PEFT cannot carry exactly, refused before anything is written."""
    if not has_adapters:
        raise ExportError("--format peft writes LoRA / DoRA adapters; this run fine-tuned every "
                          "weight (model.lora.rank=0): export it with --format hf")
    if not model_config.get("pretrained"):
        raise ExportError("--format peft needs a pretrained base (model.pretrained) for the "
                          "adapters to go on: export this run with --format hf")
    if quantized_base:
        raise ExportError("the adapters were trained on a quantized base, which transformers "
                          "does not load as mlxlab computed it: export the merged model with "
                          "--format hf (or --format mlx-lm --adapters)")
    extra = (model_config.get("lora") or {}).get("extra_trainable") or []
    if extra:
        raise ExportError(f"modules {list(extra)} trained in full beside the adapters "
                          "(model.lora.extra_trainable): a PEFT folder would drop them; export "
                          "the merged model with --format hf")


def _target_modules(paths: list[str], base_names: Iterable[str]) -> list[str] | str:
    """The module names PEFT matches: the leaf names when the adapters sit on every module of
    those names (the usual case, what vLLM reads), else a regex of exactly these paths."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    every = {n.removesuffix(".weight") for n in base_names
             if n.endswith(".weight") and n.removesuffix(".weight").rsplit(".", 1)[-1] in leaves}
    if every == set(paths):
        return leaves
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def peft_files(adapters: Mapping[str, mx.array], settings: Mapping, base_names: Iterable[str],
               base_model: str, dtype: mx.Dtype) -> tuple[dict[str, mx.array], dict]:
    """(adapter_model.safetensors' tensors, adapter_config.json) from `split_adapters`' output
    (mlx-lm names: <module>.lora_a / .lora_b / .m) and the base checkpoint's tensor names."""
    base_names = set(base_names)
    params = settings["lora_parameters"]
    tensors: dict[str, mx.array] = {}
    paths = sorted({name.rsplit(".", 1)[0] for name in adapters})
    for path in paths:
        if f"{path}.weight" not in base_names:
            raise ExportError(f"the adapter on {path} has no Linear of that name in the base's "
                              "Hugging Face checkpoint: export the merged model with --format hf")
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = adapters[f"{path}.lora_a"].T.astype(dtype)
        tensors[f"{key}.lora_B.weight"] = adapters[f"{path}.lora_b"].T.astype(dtype)
        if f"{path}.m" in adapters:
            tensors[f"{key}.lora_magnitude_vector"] = adapters[f"{path}.m"].astype(dtype)
    rank = int(params["rank"])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": float(params["scale"]) * rank,
        "lora_dropout": float(params["dropout"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": settings["fine_tune_type"] == "dora",
        "target_modules": _target_modules(paths, base_names), "modules_to_save": None,
        "inference_mode": True, "init_lora_weights": True,
    }
    return tensors, config


def write_peft(tensors: Mapping[str, mx.array], config: Mapping, out: Path) -> None:
    mx.eval(dict(tensors))
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), dict(tensors), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
