"""mlx-lm's layouts: quantized weights (what `mlx_lm.convert -q` writes) and LoRA adapters
(what `mlx_lm.lora` writes and `mlx_lm.generate --adapter-path` reads)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.export.hf import ExportError, decoder_name
from mlxlab.models.adapters.lora import AdapterLayer
from mlxlab.models.adapters.routed_experts import dora_on_experts
from mlxlab.models.decoders.mlx_lm_decoder import GROUP_SIZE, MLXLMDecoder, quantize_as_convert

METHODS = ("rtn", "gptq", "awq")  # round to nearest (mlx_lm.convert -q), mlx_lm.quant's own


def quantize(model: nn.Module, bits: int, group_size: int = GROUP_SIZE, method: str = "rtn",
             calibration: mx.array | None = None) -> dict:
    """Quantize in place; returns config.json's "quantization" entry. `rtn`: mlx-lm's own
    quantize_model (what `mlx_lm.convert -q` runs: every Linear and Embedding whose input size
    is a multiple of group_size, per the architecture's quant_predicate where it has one);
    `gptq` / `awq`: mlx_lm.quant's calibrated quantizers on `calibration` (token rows, the
    run's own: quality.calibration_tokens), the layers they do not calibrate (embeddings) at
    max(bits, 6) (GPTQ) or `bits` (AWQ)."""
    if bits not in (4, 8):
        raise ValueError(f"--quantize {bits}: use 4 or 8")
    target = model.lm if isinstance(model, MLXLMDecoder) else model  # mlx-lm's own names
    if method == "rtn":
        return quantize_as_convert(target, {}, bits, group_size)["quantization"]
    if method in ("gptq", "awq"):
        odd = [(name, m.weight.shape[-1]) for name, m in target.named_modules()
               if isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size]
        if odd:
            raise ExportError(f"--quantize-method {method} quantizes every linear layer in "
                              f"groups of {group_size} inputs; {odd[0][0]} has {odd[0][1]}: "
                              "use --quantize-method rtn")
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        _, config = gptq_quantize(target, calibration, bits, group_size, max(bits, 6),
                                  group_size)
        return config
    if method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        kind = model.architecture.get("model_type")
        awq = AWQ_MODEL_CONFIGS.get(kind)
        if awq is None:
            raise ExportError(f"--quantize-method awq: mlx_lm.quant has no AWQ settings for "
                              f"{kind!r} (it has "
                              f"{sorted(AWQ_MODEL_CONFIGS)}); use gptq or rtn")
        awq_quantize(target, calibration, awq, group_size=group_size, bits=bits,
                     embed_group_size=32, embed_bits=bits)
        return update_config(target, {})["quantization"]
    raise ExportError(f"--quantize-method {method!r}: use one of {list(METHODS)}")


def split_adapters(model: nn.Module) -> tuple[dict[str, mx.array], dict]:
    """(adapter weights under mlx-lm's names, adapter_config.json) of a LoRA / DoRA model: what
    `mlx_lm.generate --adapter-path` and `mlx_lm.utils.load_adapters` read (LoRA on the routed
    experts is mlx-lm's LoRASwitchLinear; DoRA on them, which mlx-lm's loader refuses, is one
    line)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise ValueError("--adapters needs a LoRA run (model.lora.rank > 0); this run has none")
    if dora_on_experts(model):
        raise ExportError("DoRA adapters on the routed experts have no mlx-lm adapter form "
                          "(mlx-lm's loader refuses DoRA on SwitchLinear): export the merged "
                          "model (--format mlx-lm without --adapters, or --format hf)")
    leaves = (".lora_a", ".lora_b", ".m")
    adapters = {decoder_name(model, name): value
                for name, value in tree_flatten(model.parameters()) if name.endswith(leaves)}
    first = layers[0][1]
    # "model.layers.0.self_attn.q_proj.lora_a" -> "self_attn.q_proj": the key inside each block
    keys = sorted({re.sub(r"^.*?layers\.\d+\.", "", decoder_name(model, f"{n}.weight"))
                   .rsplit(".", 1)[0] for n, _ in layers})
    # lora_a is (in, r) on a Linear, (E, r, in) on the experts: the rank is its axis 1 in both
    settings = {"rank": int(first.lora_a.shape[1]), "scale": float(first.scale),
                "dropout": 1.0 - first.dropout._p_1,  # nn.Dropout keeps 1 - p
                "keys": keys}
    config = {"fine_tune_type": first.kind,
              "num_layers": len(model.layers), "lora_parameters": settings}
    return adapters, config


def write_adapters(adapters: dict[str, mx.array], config: dict, out: Path, dtype: mx.Dtype
                   ) -> None:
    """adapters.safetensors + adapter_config.json in mlx-lm's names and format."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in adapters.items()}
    mx.eval(weights)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
