"""Tensors llama.cpp groups differently from a Hugging Face checkpoint, regrouped as its
converter (convert_hf_to_gguf.py) does, and the metadata keys of those architectures.

A Hugging Face MoE checkpoint holds one tensor per expert (Mixtral's
`block_sparse_moe.experts.<e>.w1`, Qwen MoE's and DeepSeek-V3's `mlp.experts.<e>.gate_proj`);
llama.cpp holds a layer's experts as one stacked tensor per projection (`ffn_gate_exps`,
`ffn_up_exps`, `ffn_down_exps`, each (experts, out, in)). Granite MoE fuses gate and up
(`input_linear`, gate rows first): llama.cpp splits them. DeepSeek-V3's latent attention keeps
`kv_b_proj` whole; llama.cpp's absorbed form wants it split per head into `attn_k_b` (transposed)
and `attn_v_b`. LFM2's depthwise convolution kernel (C, 1, K) is 2-D (C, K) there.

Each regrouping is a generator over the folder's (name, float array) stream that yields names
the `gguf` package's tensor-name map knows (the merged names the converter yields, e.g.
`model.layers.0.mlp.experts.gate_proj.weight`), so gguf.py maps them like any other tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from mlxlab.errors import ConfigError

Tensors = Iterator[tuple[str, np.ndarray]]
_EXPERT = re.compile(r"(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<leaf>weight|bias)")


class GGUFLayoutError(ConfigError):
    """A setting of the model that llama.cpp's graph for its architecture does not compute."""


# (GGUF name, array, config) -> array
ValueMap = Callable[[str, np.ndarray, dict], np.ndarray]


class StoredValues(NamedTuple):
    """An elementwise map of the values llama.cpp stores in place of the checkpoint's, by GGUF
    name (Mamba's A = -exp(A_log), Falcon-H1's multipliers folded in), and its inverse, the
    checkpoint's values back, which the read-back (gguf_readback.py) applies."""

    stored: ValueMap
    restored: ValueMap


def expert_count(config: dict) -> int:
    return int(config.get("num_local_experts") or config.get("num_experts")
               or config["n_routed_experts"])


def stack_experts(tensors: Tensors, config: dict) -> Tensors:
    """Each layer's per-expert tensors stacked, expert 0 first, under the converter's merged name
    (`...experts.<proj>.weight`), yielded once the layer's last expert of that projection is
    read (a sharded checkpoint may spread them over files); every other tensor passes."""
    count, groups = expert_count(config), {}
    for name, w in tensors:
        m = _EXPERT.fullmatch(name)
        if m is None:
            yield name, w
            continue
        merged = f"{m['prefix']}.experts.{m['proj']}.{m['leaf']}"
        group = groups.setdefault(merged, {})
        group[int(m["e"])] = w
        if len(group) == count:
            yield merged, np.stack([group[e] for e in range(count)])
            del groups[merged]
    if groups:
        raise GGUFLayoutError(f"the folder lacks experts of {sorted(groups)[0]} (config.json "
                              f"says {count} experts): not a whole checkpoint")


def split_granite_experts(tensors: Tensors, config: dict) -> Tensors:
    """Granite MoE's input_linear (E, 2 * ffn, hidden): gate rows, then up rows."""
    for name, w in tensors:
        if name.endswith(".block_sparse_moe.input_linear.weight"):
            prefix = name.removesuffix(".input_linear.weight")
            half = w.shape[1] // 2
            yield f"{prefix}.experts.w1.weight", w[:, :half]
            yield f"{prefix}.experts.w3.weight", w[:, half:]
        else:
            yield name, w


def split_latent_attention(tensors: Tensors, config: dict) -> Tensors:
    """DeepSeek-V3: kv_b_proj (H * (nope + v), rank) as k_b (H, rank, nope) and v_b (H, v, rank);
    the router's score-correction bias under the converter's name; experts stacked."""
    heads, nope, v = (config["num_attention_heads"], config["qk_nope_head_dim"],
                      config["v_head_dim"])
    for name, w in stack_experts(tensors, config):
        if name.endswith("self_attn.kv_b_proj.weight"):
            kv = w.reshape(heads, nope + v, w.shape[-1])
            yield name.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(
                kv[:, :nope].swapaxes(1, 2))
            yield name.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(kv[:, nope:])
        elif name.endswith("e_score_correction_bias"):
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), w
        else:
            yield name, w


def kernel_2d(w: np.ndarray) -> np.ndarray:
    """A depthwise convolution kernel (C, 1, K) as llama.cpp's 2-D (C, K); a 2-D array as is."""
    return w[:, 0] if w.ndim == 3 else w


def dt_bias_name(name: str) -> str:
    """A Mamba-2, gated delta or Kimi delta mixer's dt_bias under the name llama.cpp's converter
    gives it, the dt projection's bias (`...mixer.dt_bias` -> `...mixer.dt_proj.bias`)."""
    return name.removesuffix("dt_bias") + "dt_proj.bias"


def squeeze_conv(tensors: Tensors, config: dict) -> Tensors:
    """LFM2's depthwise kernel 2-D (kernel_2d)."""
    for name, w in tensors:
        yield (name, kernel_2d(w)) if name.endswith("conv.conv.weight") else (name, w)


# --- metadata ---------------------------------------------------------------------------------

def expert_hparams(writer, config: dict) -> None:
    """How many experts a layer has and routes each token to; the expert width where it differs
    from the dense one."""
    writer.add_expert_count(expert_count(config))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))


def qwen3_moe_config(config: dict) -> dict:
    """llama.cpp's Qwen3-MoE (and Qwen3-Next) graph routes every layer through experts and
    renormalizes the chosen experts' weights: a config that says otherwise is refused."""
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise GGUFLayoutError(f"a {config['model_type']} with dense layers (mlp_only_layers / "
                              "decoder_sparse_step) has no GGUF layout here: use --format hf or "
                              "mlx-lm")
    if not config.get("norm_topk_prob", True):
        raise GGUFLayoutError(f"a {config['model_type']} with norm_topk_prob=false has no GGUF "
                              "layout here (llama.cpp renormalizes the top-k weights): use "
                              "--format hf or mlx-lm")
    return config


def deepseek_v3_config(config: dict) -> dict:
    """Latent attention runs as one shared key/value head in llama.cpp (MQA over the latent)."""
    if config.get("scoring_func", "sigmoid") != "sigmoid" or config.get("rope_interleave",
                                                                        True) is False:
        raise GGUFLayoutError("a DeepSeek-V3 whose router is not sigmoid-scored or whose rope is "
                              "not interleaved has no GGUF layout here: use --format hf or mlx-lm")
    return {**config, "num_key_value_heads": 1}


def deepseek_v3_hparams(writer, config: dict) -> None:
    """The keys convert_hf_to_gguf.py writes for DeepSeek-V3 (llama.cpp's deepseek2)."""
    from gguf import ExpertGatingFuncType

    c, rank, rope = config, config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
    if c.get("q_lora_rank"):
        writer.add_q_lora_rank(c["q_lora_rank"])
    writer.add_kv_lora_rank(rank)
    writer.add_key_length(rank + rope)
    writer.add_value_length(rank)
    writer.add_key_length_mla(c["qk_nope_head_dim"] + rope)
    writer.add_value_length_mla(c["v_head_dim"])
    writer.add_rope_dimension_count(rope)
    expert_hparams(writer, c)
    writer.add_expert_shared_count(int(c.get("n_shared_experts") or 0))
    writer.add_expert_weights_scale(float(c.get("routed_scaling_factor", 1.0)))
    if c.get("norm_topk_prob", True):  # transformers' and mlx-lm's default
        writer.add_expert_weights_norm(True)
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(int(c.get("n_group") or 1))
    writer.add_expert_group_used_count(int(c.get("topk_group") or 1))


def _lfm2_attention_layers(config: dict) -> list[bool]:
    types = config.get("layer_types")
    if types:
        return [t == "full_attention" for t in types]
    full = set(config.get("full_attn_idxs") or [])
    return [i in full for i in range(config["num_hidden_layers"])]


def _lfm2_ff_dim(config: dict) -> int:
    """The MLP width as LFM2 computes it from block_ff_dim (2/3 of it, times the multiplier,
    rounded up to block_multiple_of, when block_auto_adjust_ff_dim)."""
    ff = config.get("block_ff_dim") or config["intermediate_size"]
    if config.get("block_auto_adjust_ff_dim"):
        ff = int(2 * ff / 3)
        if config.get("block_ffn_dim_multiplier") is not None:
            ff = int(config["block_ffn_dim_multiplier"] * ff)
        multiple = config.get("block_multiple_of", 256)
        ff = multiple * ((ff + multiple - 1) // multiple)
    return ff


def lfm2_config(config: dict) -> dict:
    """LFM2's keys under the generic ones: key/value heads per layer (0 for a convolution block),
    its MLP width, its norm epsilon."""
    if config.get("conv_bias"):
        raise GGUFLayoutError("an LFM2 with convolution biases (conv_bias) has no GGUF layout "
                              "here: use --format hf or mlx-lm")
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    return {**config, "num_key_value_heads": [kv if a else 0
                                              for a in _lfm2_attention_layers(config)],
            "intermediate_size": _lfm2_ff_dim(config),
            "rms_norm_eps": config.get("norm_eps", config.get("rms_norm_eps", 1e-5))}


def lfm2_hparams(writer, config: dict) -> None:
    writer.add_shortconv_l_cache(int(config["conv_L_cache"]))
