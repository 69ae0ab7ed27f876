"""A LoRA / DoRA run's adapters alone as a PEFT folder: adapter_config.json and
adapter_model.safetensors on the base checkpoint's Hugging Face module names, what
`PeftModel.from_pretrained(base, folder)` loads, and what vLLM, llama.cpp's LoRA converter and
Ollama's ADAPTER take.

mlxlab's layer computes y = W x + s * (x A) B with A (in, r), B (r, out), s = alpha / r; PEFT's
computes W x + (lora_alpha / r) * B' A' x with A' = A^T (r, in), B' = B^T (out, r): the same
function with lora_alpha = s * r. DoRA's magnitude m (one per output row, over the adapted
row's norm) is PEFT's lora_magnitude_vector under use_dora.

Adapters on a MoE layer's routed experts go on the experts' 3-D parameters of transformers 5's
experts module (`target_parameters`: `experts.gate_up_proj` (E, 2 * ffn, hidden), gate over
up, and `experts.down_proj`), PEFT's one LoRA pair per expert: lora_A (E * r, in) is the
experts' A stacked, lora_B (out, r * E) their B with the expert last. Gate and up share one
parameter, so their adapters become one of rank 2r (A stacked, B block-diagonal) and every other
adapter is padded with zero rows to 2r (PEFT has one rank per config; lora_alpha keeps the
scale): the same function. PEFT has no DoRA and no dropout on experts: both refused.

Refused, in one line before anything is written: a run without adapters (full fine-tuning:
--format hf), a quantized base (the adapters were trained on its rounded weights, which a float
base in transformers does not have), modules trained in full beside the adapters
(extra_trainable), an adapter on a module the Hugging Face checkpoint has no Linear for, and
DoRA or dropout on the routed experts.
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
_NO_EXPERT_DORA = ("DoRA adapters on the routed experts have no PEFT form (PEFT's LoRA on expert "
                   "parameters has no DoRA): export the merged model with --format hf")


def check_peft(model_config: Mapping, quantized_base: bool, has_adapters: bool,
               expert_dora: bool = False) -> None:
    """What PEFT cannot carry exactly, refused before anything is written (`expert_dora`: DoRA
    adapters on routed experts)."""
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
    if expert_dora:
        raise ExportError(_NO_EXPERT_DORA)
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


# mlx-lm's MoE block -> transformers 5's module of the same block, where the names differ
# (Mixtral's checkpoint says block_sparse_moe, its model holds the block as mlp)
_BLOCK_MODULES = {"mixtral": ("block_sparse_moe", "mlp")}
# transformers 5's expert parameters, each the mlx-lm projections it stacks (in this order)
_EXPERT_PARAMETERS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _padded(a: mx.array, b: mx.array, rank: int) -> tuple[mx.array, mx.array]:
    """A (..., r, in) and B (..., out, r) with zero rows / columns up to `rank`: the same BA."""
    extra = rank - a.shape[-2]
    if extra == 0:
        return a, b
    a = mx.concatenate([a, mx.zeros((*a.shape[:-2], extra, a.shape[-1]), a.dtype)], axis=-2)
    b = mx.concatenate([b, mx.zeros((*b.shape[:-1], extra), b.dtype)], axis=-1)
    return a, b


def _stacked(adapters: Mapping[str, mx.array], block: str, projections: tuple[str, ...]
             ) -> tuple[mx.array, mx.array] | None:
    """One expert parameter's (A (E, R, in), B (E, out, R)) from the adapters on the
    projections it stacks (B block-diagonal; a projection without an adapter: zeros), in
    mlx-lm's LoRASwitchLinear layout; None when none of them has one."""
    found = {p: (adapters[f"{block}.switch_mlp.{p}.lora_a"], adapters[f"{block}.switch_mlp.{p}.lora_b"])
             for p in projections if f"{block}.switch_mlp.{p}.lora_a" in adapters}
    if not found:
        return None
    a0, b0 = next(iter(found.values()))
    (experts, rank, in_dims), out_dims = a0.shape, b0.shape[1]
    pairs = [found.get(p, (mx.zeros((experts, rank, in_dims)), mx.zeros((experts, out_dims, rank))))
             for p in projections]
    a = mx.concatenate([pa for pa, _ in pairs], axis=1)
    b = mx.zeros((experts, out_dims * len(pairs), rank * len(pairs)), b0.dtype)
    for i, (_, pb) in enumerate(pairs):
        b[:, i * out_dims:(i + 1) * out_dims, i * rank:(i + 1) * rank] = pb
    return a, b


def _expert_tensors(adapters: Mapping[str, mx.array], settings: Mapping, model_type: str | None,
                    dtype: mx.Dtype) -> tuple[dict[str, mx.array], list[str], int]:
    """(PEFT's tensors of the adapters on the routed experts, target_parameters, the rank every
    adapter is padded to); refused in one line where PEFT has no form for them."""
    if settings["fine_tune_type"] == "dora":
        raise ExportError(_NO_EXPERT_DORA)
    if float(settings["lora_parameters"]["dropout"]):
        raise ExportError("PEFT's LoRA on expert parameters has no dropout and these adapters "
                          "trained with model.lora.dropout > 0: export the merged model with "
                          "--format hf")
    blocks = sorted({name.split(".switch_mlp.")[0] for name in adapters if ".switch_mlp." in name})
    rank = int(settings["lora_parameters"]["rank"])
    stacked = {(block, param): pair for block in blocks for param, projections in
               _EXPERT_PARAMETERS.items()
               if (pair := _stacked(adapters, block, projections)) is not None}
    params = [p for p in _EXPERT_PARAMETERS if any(key[1] == p for key in stacked)]
    if len(stacked) != len(blocks) * len(params):
        raise ExportError("the adapters reach other expert projections in different MoE layers, "
                          "and PEFT names the expert parameters once for every layer: export "
                          "the merged model with --format hf")
    padded = max(a.shape[1] for a, _ in stacked.values())
    old, new = _BLOCK_MODULES.get(model_type or "", ("", ""))
    tensors = {}
    for (block, param), (a, b) in stacked.items():
        a, b = _padded(a, b, padded)
        module = f"base_model.model.{block.replace(f'.{old}', f'.{new}') if old else block}.experts"
        # PEFT wraps the parameters one inside the other, the first named innermost
        key = f"{module}.base_layer" if len(params) > 1 and param == params[0] else module
        experts, r, in_dims = a.shape
        tensors[f"{key}.lora_A.weight"] = a.reshape(experts * r, in_dims).astype(dtype)
        tensors[f"{key}.lora_B.weight"] = b.transpose(1, 2, 0).reshape(b.shape[1], r * experts
                                                                        ).astype(dtype)
    return tensors, [f"experts.{p}" for p in params], max(padded, rank)


def peft_files(adapters: Mapping[str, mx.array], settings: Mapping, base_names: Iterable[str],
               base_model: str, dtype: mx.Dtype, model_type: str | None = None
               ) -> tuple[dict[str, mx.array], dict]:
    """(adapter_model.safetensors' tensors, adapter_config.json) from `split_adapters`' output
    (mlx-lm names: <module>.lora_a / .lora_b / .m) and the base checkpoint's tensor names."""
    base_names = set(base_names)
    params = settings["lora_parameters"]
    tensors, target_parameters, rank = {}, None, int(params["rank"])
    if any(".switch_mlp." in name for name in adapters):
        tensors, target_parameters, rank = _expert_tensors(adapters, settings, model_type, dtype)
    paths = sorted({name.rsplit(".", 1)[0] for name in adapters if ".switch_mlp." not in name})
    for path in paths:
        if f"{path}.weight" not in base_names:
            raise ExportError(f"the adapter on {path} has no Linear of that name in the base's "
                              "Hugging Face checkpoint: export the merged model with --format hf")
        key = f"base_model.model.{path}"
        a, b = _padded(adapters[f"{path}.lora_a"].T, adapters[f"{path}.lora_b"].T, rank)
        tensors[f"{key}.lora_A.weight"] = a.astype(dtype)
        tensors[f"{key}.lora_B.weight"] = b.astype(dtype)
        if f"{path}.m" in adapters:
            tensors[f"{key}.lora_magnitude_vector"] = adapters[f"{path}.m"].astype(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": float(params["scale"]) * rank,
        "lora_dropout": float(params["dropout"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": settings["fine_tune_type"] == "dora",
        "target_modules": _target_modules(paths, base_names) if paths else [],
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    return tensors, config


def write_peft(tensors: Mapping[str, mx.array], config: Mapping, out: Path) -> None:
    mx.eval(dict(tensors))
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), dict(tensors), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
