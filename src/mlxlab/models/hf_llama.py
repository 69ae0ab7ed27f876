"""Hugging Face / mlx-lm Llama-family decoders <-> mlxlab's Transformer: config and weight names.

Covers model_type llama (SmolLM too), mistral and qwen2: RMSNorm, SwiGLU (GeGLU for
hidden_act=gelu), rotary positions,
grouped-query attention, tied or untied embeddings, q/k/v biases (qwen2) and the rope scaling
variants of models/rope.py. The same names serve mlx-lm folders (its config.json is the Hugging
Face one plus a "quantization" entry; quantized weights are dequantized on load).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.hf import assign_weights, read_config, weight_files
from mlxlab.models.rope import check_rope_scaling

MODEL_TYPES = ("llama", "mistral", "qwen2")
# hidden_act -> model.mlp: these model types' MLP is down(act(gate(x)) * up(x)); transformers'
# "gelu" is the exact (erf) GELU, the one mlxlab's geglu uses (gelu_new / gelu_pytorch_tanh are not).
IMPORTED_MLPS = {"silu": "swiglu", "gelu": "geglu"}
# Our path inside a decoder layer -> the Hugging Face one.
_LAYER_NAMES = {
    "attention.query": "self_attn.q_proj",
    "attention.key": "self_attn.k_proj",
    "attention.value": "self_attn.v_proj",
    "attention.out": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_HF_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_TOP_NAMES = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_HF_TOP_NAMES = {v: k for k, v in _TOP_NAMES.items()}


def _rename(name: str, layer_names: Mapping, top_names: Mapping, layers: str) -> str | None:
    module, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", module)
    if m:
        inner = layer_names.get(m.group(2))
        return None if inner is None else f"{layers}.{m.group(1)}.{inner}.{leaf}"
    top = top_names.get(module)
    return None if top is None else f"{top}.{leaf}"


def to_hf_name(name: str) -> str:
    """'layers.0.attention.query.weight' -> 'model.layers.0.self_attn.q_proj.weight' (also for
    lora_a/lora_b and quantized scales/biases leaves)."""
    hf = _rename(name, _LAYER_NAMES, _TOP_NAMES, "model.layers")
    if hf is None:
        raise ValueError(f"{name} has no Hugging Face Llama name; is this a decoder parameter?")
    return hf


def from_hf_name(name: str) -> str | None:
    """The inverse of to_hf_name; None for tensors we do not use (e.g. rotary_emb.inv_freq)."""
    return _rename(name, _HF_LAYER_NAMES, _HF_TOP_NAMES, "layers")


def rope_settings(c: Mapping) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either config style: transformers 4's top-level
    rope_theta + rope_scaling, or transformers 5's rope_parameters holding both."""
    params = dict(c.get("rope_parameters") or {})
    theta = c.get("rope_theta", params.pop("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or params or None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling else None)


def decoder_kwargs(c: Mapping) -> dict:
    """Transformer keyword arguments from a Hugging Face config.json of the Llama family."""
    kind = c.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(
            f"config.json has model_type={kind!r}; mlxlab loads {list(MODEL_TYPES)} decoders "
            "(SmolLM is 'llama')"
        )
    act = c.get("hidden_act", "silu")
    if act not in IMPORTED_MLPS:
        raise ConfigError(f"hidden_act={act!r}: only silu (mlp=swiglu) and the exact gelu "
                          "(mlp=geglu) are supported")
    rope_theta, rope_scaling = rope_settings(c)
    check_rope_scaling(rope_scaling)
    try:
        heads = int(c["num_attention_heads"])
        max_len = int(c["max_position_embeddings"])
        # A sliding window at least as long as the context is full attention: cap the context.
        if kind == "mistral" and c.get("sliding_window"):
            max_len = min(max_len, int(c["sliding_window"]))
        if kind == "qwen2" and c.get("use_sliding_window"):
            raise ConfigError("qwen2 with use_sliding_window=true is not supported")
        return dict(
            vocab_size=int(c["vocab_size"]),
            dim=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=c.get("head_dim") or None,
            mlp_dim=int(c["intermediate_size"]),
            max_seq_len=max_len,
            norm="rmsnorm",
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            mlp=IMPORTED_MLPS[act],
            positions="rope",
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # transformers' default for these three model types is untied
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bool(c.get("attention_bias", False)),
            out_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}; is it a {kind} config?") from None


def _dequantize(weights: dict[str, mx.array], quantization: Mapping, path: Path) -> None:
    """mlx-lm's quantized layout (weight as packed uint32 + scales + biases) -> float weights,
    in place. Per-layer entries of the quantization config override the global settings."""
    for scales_name in [n for n in weights if n.endswith(".scales")]:
        module = scales_name.removesuffix(".scales")
        spec = quantization.get(module, quantization)
        if not isinstance(spec, Mapping):
            spec = quantization
        if spec.get("mode", "affine") != "affine":
            raise ConfigError(
                f"{path}: {module} uses quantization mode {spec['mode']!r}; only mlx-lm's "
                "affine quantization can be dequantized (use an unquantized copy)"
            )
        weights[f"{module}.weight"] = mx.dequantize(
            weights[f"{module}.weight"], weights.pop(scales_name), weights.pop(f"{module}.biases"),
            group_size=int(spec["group_size"]), bits=int(spec["bits"]),
        )


def read_hf_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a Hugging Face or mlx-lm folder under their file names, dequantized."""
    path = Path(path)
    config = read_config(path)
    weights: dict[str, mx.array] = {}
    for f in weight_files(path):
        weights.update(mx.load(str(f)))
    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization and any(n.endswith(".scales") for n in weights):
        if "bits" not in quantization:
            raise ConfigError(
                f"{path} is quantized with {quantization.get('quant_method', 'an unknown method')};"
                " only mlx-lm's quantized layout can be loaded (or an unquantized copy)"
            )
        _dequantize(weights, quantization, path)
    return weights


def load_hf_decoder_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Copy a Llama-family checkpoint into `model` (a Transformer built from its config, LoRA
    wrapped or not): every parameter must be present with its shape. Unused names are e.g. the
    lm_head of a tied checkpoint or old rotary inv_freq buffers."""
    path = Path(path)
    loaded, unused, missing = assign_weights(model, read_hf_weights(path), from_hf_name)
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    model.load_weights(list(loaded.items()), strict=False)
    return {"loaded": sorted(loaded), "unused": unused}
