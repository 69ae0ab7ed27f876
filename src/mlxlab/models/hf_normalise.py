"""A hybrid model's folder as transformers 5 saves it, read as mlx-lm reads the hub's.

transformers 5's `save_pretrained` writes its own config keys (`rope_parameters`, `layer_types`,
`per_layer_config`, infinity as `{"__float__": "Infinity"}`) and, for some types, its own weight
names (OLMo-Hybrid's norms under their checkpoint names, its q/k/v convolutions split in three
equal parts whatever the head sizes). mlx-lm 0.32 reads the hub's keys: without them a folder
fails to load (a required argument missing, a weight of the wrong shape) or, worse, loads with
mlx-lm's default for the key (Falcon-H1's rope base 1e11, Qwen3-Next's and Qwen3.5's full
attention every fourth layer). One table, per family, says what mlx-lm reads (`FAMILIES`):

    config   the keys mlx-lm reads, from transformers' (or one line refusing the folder where
             they cannot say the same)
    weights  the folder's tensors put in the names and shapes mlx-lm's sanitize expects, before
             it runs (only where the folder is in transformers' layout: a checkpoint's rebuild
             passes mlx-lm's own names through unchanged)
    classes  the mlx-lm module of a model_type it names otherwise (Qwen3.5's text-only model)

A key mlx-lm would silently default is read from the transformers config or refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mlx.core as mx

from mlxlab.errors import ConfigError

Weights = dict[str, mx.array]


def decoded(value):
    """transformers 5's JSON for a float JSON cannot spell ({"__float__": "Infinity"}) as the
    float, anywhere in a value."""
    if isinstance(value, Mapping):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decoded(v) for v in value]
    return value


def _rope(config: Mapping) -> dict:
    """rope_theta, partial_rotary_factor and (a scaled rope) rope_scaling from
    rope_parameters, where the config has only that."""
    params = config.get("rope_parameters") or {}
    out = {}
    if "rope_theta" in params and "rope_theta" not in config:
        out["rope_theta"] = params["rope_theta"]
    if "partial_rotary_factor" in params and "partial_rotary_factor" not in config:
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = scaling
    return out


def _interval(config: Mapping) -> dict:
    """mlx-lm's Qwen3-Next / Qwen3.5 place full attention every `full_attention_interval`
    layers (default 4); transformers writes each layer's type: the interval they follow, or
    one line for a pattern mlx-lm cannot build."""
    types = config.get("layer_types")
    if not types or "full_attention_interval" in config:
        return {}
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[0] + 1 if full else len(types) + 1
    if [i for i in range(len(types)) if (i + 1) % every == 0] != full:
        raise ConfigError(f"layer_types={types}: mlx-lm {_version()} builds a {config.get('model_type')}"
                          " with full attention every n-th layer only; this folder's pattern is "
                          "not one, so it cannot load here")
    return {"full_attention_interval": every}


def _version() -> str:
    import mlx_lm

    return mlx_lm.__version__


def _qwen3_5(config: Mapping) -> dict:
    """Qwen3.5's text model: the keys at the top (Qwen3_5ForCausalLM's folder) or in
    text_config (the multimodal one's)."""
    if isinstance(config.get("text_config"), Mapping):
        text = config["text_config"]
        return {"text_config": {**text, **_qwen3_5(text)}}
    out = {**_interval(config), **_rope(config)}
    params = config.get("rope_parameters")
    if params:  # mlx-lm's TextModelArgs default is Qwen3.5-VL's mrope at theta 1e5
        out["rope_parameters"] = {"type": params.get("rope_type", "default"), **params}
    return out


def _qwen3_next(config: Mapping) -> dict:
    return {**_interval(config), **_rope(config)}


def _kimi_linear(config: Mapping) -> dict:
    """Kimi-Linear's hub keys: linear_attn_config (1-indexed layer lists), NoPE in its MLA
    layers (transformers' has no rotary embedding), MoE from mlp_layer_types."""
    types = config.get("layer_types") or []
    out = {"mla_use_nope": True, "rope_theta": float(config.get("rope_theta", 10000.0))}
    if "linear_attn_config" not in config:
        out["linear_attn_config"] = {
            "kda_layers": [i + 1 for i, t in enumerate(types) if t == "linear_attention"],
            "full_attn_layers": [i + 1 for i, t in enumerate(types) if t == "full_attention"],
            "num_heads": config["linear_num_heads"], "head_dim": config["linear_head_dim"],
            "short_conv_kernel_size": config["linear_conv_kernel_dim"]}
    mlp = config.get("mlp_layer_types")
    if mlp:
        dense = mlp.index("sparse") if "sparse" in mlp else len(mlp)
        if any(t != "sparse" for t in mlp[dense:]):
            raise ConfigError(f"mlp_layer_types={mlp}: mlx-lm {_version()} builds Kimi-Linear "
                              "with dense layers first, then MoE in every layer")
        out.update(first_k_dense_replace=dense, moe_layer_freq=1)
    return out


def _olmo_hybrid(config: Mapping) -> dict:
    return _rope(config)


def _granitemoehybrid(config: Mapping) -> dict:
    """transformers 5 names the layer types linear_attention / full_attention; mlx-lm reads the
    hub's mamba / attention. transformers runs rope only for position_embedding_type "rope"
    (None: none), mlx-lm for anything but "nope". Without experts (Granite-4.0-H micro, 1B,
    350M) the layer's MLP is transformers' shared_mlp, shared_intermediate_size wide; mlx-lm
    builds that dense MLP intermediate_size wide (the experts' width, else unused)."""
    names = {"linear_attention": "mamba", "full_attention": "attention"}
    types = config.get("layer_types") or config.get("layers_block_type")
    _one_group(config, "mamba_n_groups")
    rope = config.get("position_embedding_type") == "rope"
    out = {**_rope(config), "position_embedding_type": "rope" if rope else "nope"}
    if not config.get("num_local_experts") and config.get("shared_intermediate_size"):
        out["intermediate_size"] = config["shared_intermediate_size"]
    if types:
        out["layer_types"] = [names.get(t, t) for t in types]
    return out


def _one_group(config: Mapping, key: str) -> None:
    """mlx-lm's Mamba-2 (and Granite-4.0-H's) gated norm spans the whole inner width;
    transformers' normalises each of the n_groups groups apart: the same only for one group."""
    if int(config.get(key) or 1) != 1:
        raise ConfigError(f"{key}={config[key]}: mlx-lm {_version()}'s {config.get('model_type')} "
                          "normalises the state-space output over all groups at once and "
                          "transformers per group, so they compute other logits; only "
                          f"{key}=1 loads here")


def _nemotron_h(config: Mapping) -> dict:
    """transformers' Nemotron-H clips the time step to [time_step_min, inf), whatever its
    time_step_limit says; mlx-lm reads time_step_limit."""
    return {"time_step_limit": [float(config.get("time_step_min", 0.001)), float("inf")]}


def _mamba2(config: Mapping) -> dict:
    _one_group(config, "n_groups")
    return {"intermediate_size": config.get("intermediate_size")
            or config["num_heads"] * config["head_dim"]}


def _lfm2(config: Mapping) -> dict:
    if config.get("tie_word_embeddings") is False:
        raise ConfigError(f"tie_word_embeddings=false: mlx-lm {_version()}'s LFM2 always reads "
                          "its logits off the embeddings, so an LFM2 with its own lm_head "
                          "cannot load here")
    return {"block_dim": config.get("block_dim", config["hidden_size"]),
            "block_ff_dim": config.get("block_ff_dim", config["intermediate_size"]),
            **_rope(config)}


def _gemma4_text(config: Mapping) -> dict:
    """transformers 5.24 writes the full-attention layers' head size (and, with
    attention_k_eq_v, their key-value heads) per layer (per_layer_config); mlx-lm reads one
    global_head_dim and num_global_key_value_heads. Overrides it has no key for are refused."""
    out = {"final_logit_softcapping": config.get("final_logit_softcapping")}
    types = config.get("layer_types") or []
    overrides = {int(k): dict(v) for k, v in (config.get("per_layer_config") or {}).items()}
    full = {tuple(sorted(v.items())) for k, v in overrides.items()
            if k < len(types) and types[k] == "full_attention"}
    others = [k for k in overrides if k >= len(types) or types[k] != "full_attention"]
    keys = {name for v in overrides.values() for name in v}
    kv = next((dict(v).get("num_key_value_heads") for v in full), None)
    if (len(full) > 1 or others or keys - {"head_dim", "num_key_value_heads"}
            or (kv is not None and kv != config.get("num_key_value_heads")
                and not config.get("attention_k_eq_v"))):
        raise ConfigError(f"per_layer_config={config.get('per_layer_config')}: mlx-lm "
                          f"{_version()} builds Gemma 4 with one head size (and key-value head "
                          "count) for every full-attention layer and none per layer otherwise")
    if full:
        layer = dict(full.pop())
        if "head_dim" in layer and "global_head_dim" not in config:
            out["global_head_dim"] = layer["head_dim"]
        if kv is not None and "num_global_key_value_heads" not in config:
            out["num_global_key_value_heads"] = kv
    return out


def _split_convolutions(weights: Weights, config: Mapping, sizes: tuple[int, int, int],
                        prefix: str) -> Weights:
    """q/k/v depthwise convolutions re-split at the head sizes: transformers 5.24 saves the
    one fused kernel it runs in three equal parts (its Concatenate's reverse), whatever the
    sizes of q, k and v."""
    out = dict(weights)
    for name in [n for n in weights if n.endswith(f"{prefix}.q_conv1d.weight")]:
        base = name.removesuffix("q_conv1d.weight")
        parts = [out.pop(f"{base}{p}_conv1d.weight") for p in "qkv"]
        fused = mx.concatenate(parts, axis=0)
        if fused.shape[0] != sum(sizes):
            raise ConfigError(f"{base}q/k/v_conv1d: {fused.shape[0]} channels where the config "
                              f"says {sum(sizes)}: the folder does not match its config.json")
        q, k, v = mx.split(fused, [sizes[0], sizes[0] + sizes[1]], axis=0)
        out.update({f"{base}q_conv1d.weight": q, f"{base}k_conv1d.weight": k,
                    f"{base}v_conv1d.weight": v})
    return out


def _olmo_hybrid_weights(weights: Weights, config: Mapping) -> Weights:
    renamed = {n.replace("attention_layer_norm", "input_layernorm")
               .replace("feedforward_layer_norm", "post_attention_layernorm"): v
               for n, v in weights.items()}
    key = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    value = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    return _split_convolutions(renamed, config, (key, key, value), "linear_attn")


def _kimi_weights(weights: Weights, config: Mapping) -> Weights:
    """transformers 5.24 saves a dense layer's MLP under the MoE's checkpoint name
    (block_sparse_moe.gate_proj: its renaming's reverse); mlx-lm reads it as mlp."""
    dense = re.compile(r"(.+)\.block_sparse_moe\.((gate|up|down)_proj\.weight)")
    renamed = {}
    for name, value in weights.items():
        m = dense.fullmatch(name)
        renamed[f"{m.group(1)}.mlp.{m.group(2)}" if m else name] = value
    width = config["linear_num_heads"] * config["linear_head_dim"]
    return _split_convolutions(renamed, config, (width, width, width), "self_attn")


def _falcon_h1_weights(weights: Weights, config: Mapping) -> Weights:
    """mlx-lm folds Falcon-H1's multipliers into the weights, but not two of transformers':
    the attention input multiplier on v_proj and the key multiplier on k_proj. Folded here
    first, so the model computes what transformers does."""
    attn_in = float(config.get("attention_in_multiplier", 1.0))
    key = float(config.get("key_multiplier", 1.0))
    out = {}
    for name, value in weights.items():
        if name.endswith("v_proj.weight"):
            value = value * attn_in
        elif name.endswith("k_proj.weight"):
            value = value * key
        out[name] = value
    return out


def torch_layout(weights: Mapping[str, mx.array]) -> bool:
    """Whether the weights are a transformers folder's (a depthwise kernel (C, 1, K)), not
    mlx-lm's own ((C, K, 1), a checkpoint's rebuild)."""
    kernels = [v for n, v in weights.items() if "conv" in n and n.endswith(".weight")
               and v.ndim == 3]
    return bool(kernels) and kernels[0].shape[1] == 1 and kernels[0].shape[-1] != 1


def _same(config: Mapping) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    """What mlx-lm reads of one model_type's transformers folder (module docstring)."""

    config: Callable[[Mapping], dict] = _same
    weights: Callable[[Weights, Mapping], Weights] | None = None
    classes: str | None = None


FAMILIES: dict[str, Family] = {
    "qwen3_5_text": Family(_qwen3_5, classes="qwen3_5"),
    "qwen3_5": Family(_qwen3_5),
    "qwen3_next": Family(_qwen3_next),
    "kimi_linear": Family(_kimi_linear, _kimi_weights),
    "olmo_hybrid": Family(_olmo_hybrid, _olmo_hybrid_weights),
    "nemotron_h": Family(_nemotron_h),
    "falcon_h1": Family(weights=_falcon_h1_weights),
    "granitemoehybrid": Family(_granitemoehybrid),
    "mamba2": Family(_mamba2),
    "lfm2": Family(_lfm2),
    "gemma4_text": Family(_gemma4_text),
}


def family(config: Mapping) -> Family:
    return FAMILIES.get(str(config.get("model_type")), Family())


def mlx_lm_keys(config: Mapping) -> dict:
    """The keys to set over a transformers config.json so mlx-lm builds the model it
    describes (empty for a type the table does not name, or a config in the hub's keys)."""
    fixed = {k: decoded(v) for k, v in config.items() if decoded(v) != v}
    return {**fixed, **family(config).config({**config, **fixed})}


def mlx_lm_folder_config(config: Mapping) -> dict:
    """config.json of an mlx-lm folder (`mlxlab export --format mlx-lm`): the model_type named
    as mlx-lm's module is (Qwen3.5's text-only model_type has none of its own)."""
    alias = family(config).classes
    return {**config, "model_type": alias} if alias else dict(config)


def mlx_lm_weights(weights: Weights, config: Mapping) -> Weights:
    """The folder's tensors as mlx-lm's sanitize expects them (FAMILIES' weights), unchanged
    where they are mlx-lm's own already."""
    rule = family(config).weights
    if rule is None or not torch_layout(weights):
        return weights
    return rule(weights, config)
