"""Kimi-Linear (Kimi delta attention layers, NoPE latent attention layers among them, MoE
feed-forward layers after the leading dense ones) as llama.cpp reads it (its `kimi-linear`
architecture), laid out as llama.cpp's converter does.

A delta layer's tensors keep their checkpoint layout but for three: the q/k/v convolution
kernels (C, 1, K) stay 3-D (llama.cpp reads them as {K, 1, C}) and in F32, A = -exp(A_log)
keeps its (1, 1, heads, 1) shape (gguf_mamba.py `MIXER_VALUES`), and dt_bias is the dt
projection's bias. The latent layers are DeepSeek-V3's (kv_b_proj split per head into k_b and
v_b; gguf_regroup.py), their rotary part left unrotated as Kimi's MLA runs it; the experts are
stacked, the router's score-correction bias renamed, and a leading dense layer's MLP (saved by
transformers under block_sparse_moe) named as an MLP. The keys: DeepSeek-V3's (latent ranks and
head sizes, expert counts, sigmoid routing, routed scaling), key/value heads per layer (0 marks a
delta layer, 1 a latent layer: one shared latent head), the convolution kernel and the delta
head size.

llama.cpp's graph runs the delta layers with the latent layers' head count, every latent layer
without rotary embedding, dense layers only before the first MoE layer, sigmoid routing over
all experts (no expert groups), renormalized top-k weights and one shared expert block; a
config that says otherwise is refused, naming the setting.
"""

from __future__ import annotations

import re

from mlxlab.export.gguf_regroup import (
    GGUFLayoutError,
    Tensors,
    deepseek_v3_hparams,
    dt_bias_name,
    split_latent_attention,
)

_DENSE_MLP = re.compile(r"(.+)\.block_sparse_moe\.((gate|up|down)_proj\.weight)")
_ELSEWHERE = "use --format hf or mlx-lm"


def _linear(config: dict, key: str, hub_key: str):
    """A delta-attention setting under transformers' key, else the hub's linear_attn_config."""
    return config[key] if key in config else (config.get("linear_attn_config") or {})[hub_key]


def _layer_types(config: dict) -> list[str]:
    if config.get("layer_types"):
        return list(config["layer_types"])
    full = set((config.get("linear_attn_config") or {}).get("full_attn_layers") or [])
    return ["full_attention" if i + 1 in full else "linear_attention"
            for i in range(config["num_hidden_layers"])]


def _dense_layers(config: dict) -> int:
    """How many leading layers are dense; refused where an MoE layer comes before a dense one
    (llama.cpp builds the first k dense, every later one MoE)."""
    types = config.get("mlp_layer_types")
    if not types:
        if config.get("moe_layer_freq", 1) != 1:
            raise GGUFLayoutError(f"a Kimi-Linear with moe_layer_freq={config['moe_layer_freq']}"
                                  f" has no GGUF layout here: {_ELSEWHERE}")
        return int(config.get("first_k_dense_replace") or 0)
    dense = types.index("sparse") if "sparse" in types else len(types)
    if any(t != "sparse" for t in types[dense:]):
        raise GGUFLayoutError(f"a Kimi-Linear whose mlp_layer_types={types} are not its dense "
                              f"layers first, then MoE, has no GGUF layout here: {_ELSEWHERE}")
    return dense


def _refusal(config: dict) -> str | None:
    """The first setting llama.cpp's kimi-linear graph does not compute, named; else None."""
    c = config
    groups, picked = int(c.get("num_expert_group") or 1), int(c.get("topk_group") or 1)
    checks = (
        (_linear(c, "linear_num_heads", "num_heads") != c["num_attention_heads"],
         "linear_num_heads other than num_attention_heads (llama.cpp runs both with one head "
         "count)"),
        (c.get("moe_router_activation_func", "sigmoid") != "sigmoid",
         f"moe_router_activation_func={c.get('moe_router_activation_func')!r}"),
        (not c.get("moe_renormalize", True), "moe_renormalize=false"),
        (groups > 1 and picked < groups, f"topk_group={picked} of num_expert_group={groups}"),
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')!r}"),
        (bool(c.get("attention_bias")), "attention_bias=true"),
        (bool(c.get("tie_word_embeddings")), "tied embeddings (llama.cpp reads an output "
         "matrix)"),
        (not c.get("num_shared_experts"), "no shared expert"),
    )
    return next((reason for failed, reason in checks if failed), None)


def kimi_linear_config(config: dict) -> dict:
    """The config as the generic and DeepSeek-V3 keys read it, after the refusals."""
    reason = _refusal(config)
    if reason is not None:
        raise GGUFLayoutError(f"a Kimi-Linear with {reason} has no GGUF layout here: "
                              f"{_ELSEWHERE}")
    return {**config,
            "num_key_value_heads": [int(t == "full_attention") for t in _layer_types(config)],
            "first_k_dense_replace": _dense_layers(config),
            "max_position_embeddings": config.get("model_max_length",
                                                  config.get("max_position_embeddings", 2048)),
            "num_experts_per_tok": config.get("num_experts_per_token",
                                              config.get("num_experts_per_tok", 1)),
            "n_shared_experts": config["num_shared_experts"],
            "norm_topk_prob": True, "n_group": 1, "topk_group": 1}


def kimi_linear_hparams(writer, config: dict) -> None:
    deepseek_v3_hparams(writer, config)
    writer.add_ssm_conv_kernel(int(_linear(config, "linear_conv_kernel_dim",
                                           "short_conv_kernel_size")))
    writer.add_kda_head_dim(int(_linear(config, "linear_head_dim", "head_dim")))


def kimi_linear_tensors(tensors: Tensors, config: dict) -> Tensors:
    """The checkpoint's tensors in llama.cpp's layout (module docstring)."""
    for name, w in split_latent_attention(tensors, config):
        dense = _DENSE_MLP.fullmatch(name)
        if dense:
            yield f"{dense[1]}.mlp.{dense[2]}", w
        elif name.endswith("self_attn.dt_bias"):
            yield dt_bias_name(name), w
        elif name.endswith("conv1d.weight") and w.ndim == 2:
            yield name, w[:, None]
        else:
            yield name, w
