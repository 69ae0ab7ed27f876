"""Qwen3.5's text model and Qwen3-Next (a gated delta net every layer but every n-th, full
attention there; Qwen3-Next's feed-forward layers route experts) as llama.cpp reads them (its
`qwen35` and `qwen3next` architectures), laid out as llama.cpp's converter does.

Qwen3.5: where a gated delta layer has more value heads than key heads, the checkpoint keeps
each key head's value heads together (k0: v0 v1, k1: v0 v1); llama.cpp's qwen35 broadcasts key
heads over value heads tiled (k0 v0, k1 v0, k0 v1, k1 v1), so every value-head axis is
reordered: the value rows of in_proj_qkv and the convolution kernel, in_proj_z's rows,
in_proj_a's and in_proj_b's (one per head), A_log and dt_bias, out_proj's columns. Qwen3-Next:
its fused in_proj_qkvz (per key head: q, k, that head's v, its z) split as llama.cpp's attn_qkv
(every q, every k, every v) and attn_gate, its value heads left grouped (qwen3next broadcasts
them so). Both: the kernel (C, 1, K) 2-D, dt_bias as the dt projection's bias, A = -exp(A_log)
(gguf_mamba.py `MIXER_VALUES`), and the zero-centred RMSNorms (weight 1 + w) stored as 1 + w,
the gated delta's own norm excepted (a plain weight). The keys: the delta net's sizes under
ssm.* (kernel, key head size as the state size, key heads as groups, value heads as the
time-step rank, the value width as the inner size), the interval of full-attention layers, the
rotary width, Qwen3.5's (multimodal) rope sections, Qwen3-Next's expert counts.
"""

from __future__ import annotations

import numpy as np

from mlxlab.export.gguf_regroup import (
    GGUFLayoutError,
    Tensors,
    dt_bias_name,
    expert_hparams,
    kernel_2d,
    qwen3_moe_config,
    stack_experts,
)


def _full_attention_interval(config: dict) -> int:
    """n where layers n-1, 2n-1, ... are full attention and the rest gated delta; else refused
    (llama.cpp places them by the interval alone). transformers 5 saves the per-layer
    layer_types, the hub's configs the interval itself (full_attention_interval)."""
    if not config.get("layer_types"):
        if not config.get("full_attention_interval"):
            raise GGUFLayoutError(f"a {config['model_type']} config with neither layer_types nor "
                                  "full_attention_interval does not say which layers are full "
                                  "attention: add full_attention_interval to its config.json, "
                                  "or use --format hf or mlx-lm")
        return int(config["full_attention_interval"])
    full = [t == "full_attention" for t in config["layer_types"]]
    n = full.index(True) + 1 if any(full) else 0
    if not n or any(f != ((i + 1) % n == 0) for i, f in enumerate(full)):
        raise GGUFLayoutError(f"a {config['model_type']} whose full-attention layers are not "
                              "every n-th has no GGUF layout here: use --format hf or mlx-lm")
    return n


def qwen3_5_config(config: dict) -> dict:
    _full_attention_interval(config)
    if config["linear_num_value_heads"] % config["linear_num_key_heads"]:
        raise GGUFLayoutError(f"a {config['model_type']} whose value heads are not a multiple "
                              "of its key heads has no GGUF layout here: use --format hf or "
                              "mlx-lm")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFLayoutError(f"a {config['model_type']} with rope_type {rope['rope_type']!r} "
                              "has no GGUF layout here: use --format hf or mlx-lm")
    # each from rope_parameters (transformers 5), else the top level (the hub's configs), else
    # transformers' default
    return {**config, "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "partial_rotary_factor": rope.get("partial_rotary_factor",
                                              config.get("partial_rotary_factor", 0.25))}


def _delta_hparams(writer, config: dict) -> None:
    c = config
    writer.add_ssm_conv_kernel(int(c["linear_conv_kernel_dim"]))
    writer.add_ssm_state_size(int(c["linear_key_head_dim"]))
    writer.add_ssm_group_count(int(c["linear_num_key_heads"]))
    writer.add_ssm_time_step_rank(int(c["linear_num_value_heads"]))
    writer.add_ssm_inner_size(int(c["linear_value_head_dim"] * c["linear_num_value_heads"]))
    writer.add_full_attention_interval(_full_attention_interval(c))


def qwen3_5_hparams(writer, config: dict) -> None:
    _delta_hparams(writer, config)
    writer.add_rope_dimension_sections(_rope_sections(config))


def _rope_sections(config: dict) -> list[int]:
    """The rotary pairs per position axis (time, height, width) of Qwen3.5's multimodal rope,
    which llama.cpp interleaves: pair i rotates by axis i % 3's position while that axis has
    pairs left, else by none. On text the three positions are one, so a config without its own
    sections gets them such that every pair rotates: ceil-thirds of the pairs (Qwen3.5's own
    [11, 11, 10] for its 32)."""
    sections = (config.get("rope_parameters") or {}).get("mrope_section")
    if not sections:
        head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        pairs = int(head * config["partial_rotary_factor"]) // 2
        sections = [len(range(axis, pairs, 3)) for axis in range(3)]
    return (list(sections) + [0] * 4)[:4]


def zero_centred_norms(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """Qwen3.5's RMSNorms multiply by 1 + weight; llama.cpp's by weight. The gated delta's own
    norm multiplies by its weight."""
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return w + 1
    return w


def _tiled(w: np.ndarray, axis: int, k_heads: int, head: int) -> np.ndarray:
    """The value heads along `axis` from grouped by key head to tiled over key heads."""
    w = np.moveaxis(w, axis, 0)
    grouped = w.reshape(k_heads, -1, head, *w.shape[1:])
    return np.moveaxis(np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(w.shape), 0, axis)


def qwen3_5_tensors(tensors: Tensors, config: dict) -> Tensors:
    """The gated delta layers' tensors in llama.cpp's layout (module docstring)."""
    k_heads, v_dim = config["linear_num_key_heads"], config["linear_value_head_dim"]
    qk = 2 * k_heads * config["linear_key_head_dim"]  # q and k rows (channels), before v
    for name, w in tensors:
        if ".linear_attn." not in name:
            yield name, w
            continue
        leaf = name.rsplit(".linear_attn.", 1)[1]
        if leaf in ("in_proj_qkv.weight", "conv1d.weight"):
            w = kernel_2d(w)
            w = np.concatenate([w[:qk], _tiled(w[qk:], 0, k_heads, v_dim)])
        elif leaf == "in_proj_z.weight":
            w = _tiled(w, 0, k_heads, v_dim)
        elif leaf in ("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias"):
            w = _tiled(w, 0, k_heads, 1)
        elif leaf == "out_proj.weight":
            w = _tiled(w, 1, k_heads, v_dim)
        yield (dt_bias_name(name) if leaf == "dt_bias" else name), w


def qwen3_5_columns(gguf_name: str, vector: np.ndarray, config: dict) -> np.ndarray:
    """A per-input-column vector of a Qwen3.5 matrix (an importance matrix's, in the
    checkpoint's column order) in the file's order: the delta layer's out_proj (`ssm_out`)
    reads the value heads tiled (qwen3_5_tensors)."""
    if not gguf_name.endswith(".ssm_out.weight"):
        return vector
    return _tiled(vector, vector.ndim - 1, config["linear_num_key_heads"],
                  config["linear_value_head_dim"])


# --- Qwen3-Next -------------------------------------------------------------------------------

def qwen3_next_config(config: dict) -> dict:
    """Qwen3.5's checks, and Qwen3-MoE's: every layer routes through experts, renormalized."""
    return qwen3_5_config(qwen3_moe_config(config))


def qwen3_next_hparams(writer, config: dict) -> None:
    _delta_hparams(writer, config)
    expert_hparams(writer, config)
    writer.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))


def qwen3_next_tensors(tensors: Tensors, config: dict) -> Tensors:
    """Experts stacked; the fused in_proj_qkvz (per key head: q, k, its value heads' v, their z)
    as llama.cpp's attn_qkv (every q, every k, every v) and attn_gate (every z); the kernel 2-D,
    dt_bias as the dt projection's bias."""
    k_heads, k_dim = config["linear_num_key_heads"], config["linear_key_head_dim"]
    v_width = config["linear_num_value_heads"] // k_heads * config["linear_value_head_dim"]
    for name, w in stack_experts(tensors, config):
        if name.endswith("linear_attn.in_proj_qkvz.weight"):
            prefix = name.removesuffix("in_proj_qkvz.weight")
            per_head = w.reshape(k_heads, -1, w.shape[-1])
            q, k, v, z = np.split(per_head, [k_dim, 2 * k_dim, 2 * k_dim + v_width], axis=1)
            yield f"{prefix}in_proj_qkv.weight", np.concatenate(
                [part.reshape(-1, w.shape[-1]) for part in (q, k, v)])
            yield f"{prefix}in_proj_z.weight", z.reshape(-1, w.shape[-1])
        elif name.endswith("linear_attn.conv1d.weight"):
            yield name, kernel_2d(w)
        elif name.endswith("linear_attn.dt_bias"):
            yield dt_bias_name(name), w
        else:
            yield name, w
