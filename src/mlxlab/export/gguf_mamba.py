"""The Mamba-2 families as llama.cpp reads them: Mamba-2 itself, Granite 4 hybrids
(granitemoehybrid), Nemotron-H and Falcon-H1, each with its tensors laid out and its metadata keys
written as llama.cpp's converter (convert_hf_to_gguf.py) does (a dense Granite hybrid's
feed_forward_length excepted: its MLP's width, shared_intermediate_size, which llama.cpp's
loader reads its tensors by, where the converter writes intermediate_size).

A Mamba-2 mixer's tensors differ from the checkpoint's in four ways: llama.cpp keeps A itself
(A = -exp(A_log), a map of values the read-back inverts: `MIXER_VALUES`) and D as (heads, 1)
columns, the depthwise convolution kernel (C, 1, K) as 2-D
(C, K), the gated RMSNorm's weight as (groups, d_inner / groups) (it normalizes each group on
its own), and dt_bias under the name of a dt projection's bias. The hybrids add their own blocks:
Granite's fused expert and shared-expert projections split into gate and up, Nemotron-H's
per-expert tensors stacked. The metadata keys say the mixer's sizes (ssm.conv_kernel,
ssm.inner_size, ssm.state_size, ssm.group_count, ssm.time_step_rank: the head count) and, for a
hybrid, which layers are attention: a key/value head count per layer, 0 where a layer is a
Mamba-2 (or MLP) block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlxlab.export.gguf_regroup import (
    GGUFLayoutError,
    StoredValues,
    Tensors,
    dt_bias_name,
    expert_hparams,
    kernel_2d,
    split_granite_experts,
    stack_experts,
)

_NO_LIMIT = (0.0, math.inf)


@dataclass(frozen=True)
class Mixer:
    """A Mamba-2 mixer's sizes, from whichever keys the family's config spells them with."""

    d_conv: int
    d_state: int
    n_group: int
    n_head: int
    d_head: int

    @property
    def d_inner(self) -> int:
        return self.n_head * self.d_head

    def in_proj_rows(self) -> int:
        """z and x (d_inner each), B and C (groups x state each), dt (one per head)."""
        return 2 * self.d_inner + 2 * self.n_group * self.d_state + self.n_head


def mixer_of(config: dict) -> Mixer:
    kind = config["model_type"]
    if kind == "mamba2":
        return Mixer(config["conv_kernel"], config["state_size"], config["n_groups"],
                     config["num_heads"], config["head_dim"])
    if kind in ("granitemoehybrid", "falcon_h1"):
        return Mixer(config["mamba_d_conv"], config["mamba_d_state"], config["mamba_n_groups"],
                     config["mamba_n_heads"], config["mamba_d_head"])
    return Mixer(config["conv_kernel"], config["ssm_state_size"], config["n_groups"],
                 config["mamba_num_heads"], config["mamba_head_dim"])


def _check_mixer(config: dict) -> None:
    """What llama.cpp's Mamba-2 layer does not compute: a projection bias, a clamped time
    step."""
    kind = config["model_type"]
    if config.get("use_bias") or config.get("mamba_proj_bias"):
        raise GGUFLayoutError(f"a {kind} with biases on its Mamba-2 projections (use_bias / "
                              "mamba_proj_bias) has no GGUF layout here: use --format hf or "
                              "mlx-lm")
    limit = config.get("time_step_limit") or _NO_LIMIT
    bounds = tuple(float(x["__float__"]) if isinstance(x, dict) else float(x) for x in limit)
    if bounds != _NO_LIMIT:
        raise GGUFLayoutError(f"a {kind} with a time_step_limit of {list(limit)} has no GGUF "
                              "layout here (llama.cpp does not clamp the time step): use "
                              "--format hf or mlx-lm")


def mamba2_mixers(tensors: Tensors, config: dict) -> Tensors:
    """Every Mamba-2 mixer tensor in llama.cpp's layout (module docstring); an in_proj whose rows
    are not the mixer's z, x, B, C and dt is refused by name."""
    m = mixer_of(config)
    for name, w in tensors:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "D") and w.ndim == 1:
            yield name, w.reshape(-1, 1)
        elif leaf == "dt_bias":
            yield dt_bias_name(name), w
        elif name.endswith("conv1d.weight"):
            yield name, kernel_2d(w)
        elif name.endswith(("mixer.norm.weight", "mamba.norm.weight")) and w.size == m.d_inner:
            yield name, w.reshape(m.n_group, m.d_inner // m.n_group)
        elif name.endswith("in_proj.weight") and w.shape[0] != m.in_proj_rows():
            raise GGUFLayoutError(f"tensor {name} has {w.shape[0]} rows; a Mamba-2 in_proj of "
                                  f"this config has {m.in_proj_rows()} (z, x, B, C, dt): not "
                                  "written to GGUF; use --format hf or mlx-lm")
        else:
            yield name, w


def _a_from_a_log(gguf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if not gguf_name.endswith(".ssm_a"):
        return w
    return (-np.exp(w.astype(np.float64))).astype(np.float32)


def _a_log_from_a(gguf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if not gguf_name.endswith(".ssm_a"):
        return w
    return np.log(-w.astype(np.float64)).astype(np.float32)


MIXER_VALUES = StoredValues(_a_from_a_log, _a_log_from_a)


def mamba2_hparams(writer, config: dict) -> None:
    """The mixer's sizes (ssm.*), the keys a Mamba-2 adds."""
    m = mixer_of(config)
    writer.add_ssm_conv_kernel(m.d_conv)
    writer.add_ssm_inner_size(m.d_inner)
    writer.add_ssm_state_size(m.d_state)
    writer.add_ssm_group_count(m.n_group)
    writer.add_ssm_time_step_rank(m.n_head)  # llama.cpp reads the head count here


# --- Mamba-2 ----------------------------------------------------------------------------------

def mamba2_config(config: dict) -> dict:
    """No attention, no MLP: llama.cpp's Mamba-2 reads head_count and feed_forward_length as 0,
    and any context length (the state does not grow)."""
    _check_mixer(config)
    if mixer_of(config).d_inner != config.get("expand", 2) * config["hidden_size"]:
        raise GGUFLayoutError("a Mamba-2 whose heads x head_dim is not expand x hidden_size has "
                              "no GGUF layout here: use --format hf or mlx-lm")
    return {**config, "intermediate_size": 0, "num_attention_heads": 0,
            "num_key_value_heads": 0, "max_position_embeddings": 2**20,
            "rms_norm_eps": config.get("layer_norm_epsilon", 1e-5)}


# --- Granite 4 hybrids ------------------------------------------------------------------------

def _attention_layers(config: dict, types_key: str) -> list[bool]:
    """Which layers are attention, from the config's per-layer types (transformers 5 spells them
    full_attention / linear_attention; the hub's configs attention / mamba)."""
    return [t in ("attention", "full_attention") for t in config[types_key]]


def granite_hybrid_config(config: dict) -> dict:
    _check_mixer(config)
    if config.get("position_embedding_type") not in (None, "nope", "rope"):
        raise GGUFLayoutError(f"a Granite hybrid with position_embedding_type="
                              f"{config['position_embedding_type']!r} has no GGUF layout here: "
                              "use --format hf or mlx-lm")
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    heads = [kv if a else 0 for a in _attention_layers(config, "layer_types")]
    if config.get("num_local_experts"):
        return {**config, "num_key_value_heads": heads}
    # without experts the layer's MLP is the shared one, shared_intermediate_size wide (llama.cpp
    # reads a dense layer's width as feed_forward_length; intermediate_size is the experts')
    return {**config, "num_key_value_heads": heads,
            "intermediate_size": config["shared_intermediate_size"]}


def granite_hybrid_hparams(writer, config: dict) -> None:
    """Granite's multipliers, the experts (where the layers have them), the shared MLP's
    width, the mixer's sizes; rope only where the config asks for it."""
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))
    if config.get("num_local_experts"):
        expert_hparams(writer, config)
        writer.add_expert_shared_feed_forward_length(int(config["shared_intermediate_size"]))
    writer.add_rope_scaling_finetuned(config.get("position_embedding_type") == "rope")
    mamba2_hparams(writer, config)


def granite_shared_mlp(config: dict) -> str:
    """Where a Granite hybrid's shared MLP is written: as the shared expert where the layer has
    experts, as the dense MLP where not."""
    return "mlp.shared_expert" if config.get("num_local_experts") else "mlp"


def granite_hybrid_tensors(tensors: Tensors, config: dict) -> Tensors:
    """The mixers; the routed experts' fused input_linear split (gate, up); the shared MLP's
    too, under granite_shared_mlp's name."""
    mlp = granite_shared_mlp(config)
    for name, w in mamba2_mixers(split_granite_experts(tensors, config), config):
        if name.endswith("shared_mlp.input_linear.weight"):
            prefix, half = name.removesuffix("shared_mlp.input_linear.weight"), w.shape[0] // 2
            yield f"{prefix}{mlp}.gate_proj.weight", w[:half]
            yield f"{prefix}{mlp}.up_proj.weight", w[half:]
        elif name.endswith("shared_mlp.output_linear.weight"):
            yield name.replace("shared_mlp.output_linear", f"{mlp}.down_proj"), w
        else:
            yield name, w


# --- Nemotron-H -------------------------------------------------------------------------------

def _nemotron_types(config: dict) -> list[str]:
    """Each layer's block: mamba, attention, mlp or moe (the hub's pattern string "M*-E" too)."""
    types = config.get("layers_block_type") or config.get("hybrid_override_pattern")
    if not types:
        raise GGUFLayoutError("a nemotron_h config with neither layers_block_type nor "
                              "hybrid_override_pattern does not say which block each layer is: "
                              "add one to its config.json, or use --format hf or mlx-lm")
    letters = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    names = {"linear_attention": "mamba", "full_attention": "attention"}
    return [letters.get(t, names.get(t, t)) for t in types]


def nemotron_h_is_moe(config: dict) -> bool:
    return "moe" in _nemotron_types(config)


def nemotron_h_config(config: dict) -> dict:
    """Key/value heads and the MLP width per layer (0 where the layer has none). llama.cpp's
    MoE Nemotron-H has no dense-MLP layer (every feed-forward layer routes through experts), and
    both graphs square a ReLU: a config that says otherwise is refused."""
    _check_mixer(config)
    types = _nemotron_types(config)
    if nemotron_h_is_moe(config) and "mlp" in types:
        raise GGUFLayoutError("a Nemotron-H with both dense-MLP and MoE layers has no GGUF layout "
                              "here (llama.cpp's MoE graph routes every feed-forward layer): use "
                              "--format hf or mlx-lm")
    if config.get("mlp_hidden_act", "relu2") != "relu2":
        raise GGUFLayoutError(f"a Nemotron-H with mlp_hidden_act={config['mlp_hidden_act']!r} "
                              "has no GGUF layout here (llama.cpp squares a ReLU): use --format "
                              "hf or mlx-lm")
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    ff = "moe" if nemotron_h_is_moe(config) else "mlp"
    width = config["moe_intermediate_size" if ff == "moe" else "intermediate_size"]
    return {**config, "num_hidden_layers": len(types),
            "num_key_value_heads": [kv if t == "attention" else 0 for t in types],
            "intermediate_size": [width if t == ff else 0 for t in types],
            "rms_norm_eps": config.get("layer_norm_epsilon", 1e-5)}


def nemotron_h_hparams(writer, config: dict) -> None:
    """The mixer's sizes; the experts where the layers route them. llama.cpp's Nemotron-H reads
    its norms' epsilon under the LayerNorm key too."""
    mamba2_hparams(writer, config)
    writer.add_layer_norm_eps(float(config["rms_norm_eps"]))
    if not nemotron_h_is_moe(config):
        return
    writer.add_expert_count(int(config["n_routed_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    writer.add_expert_shared_feed_forward_length(
        int(config["moe_shared_expert_intermediate_size"]))
    writer.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", True)))
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_group_count(int(config.get("n_group") or 1))


def nemotron_h_tensors(tensors: Tensors, config: dict) -> Tensors:
    """The mixers; the experts (up and down, no gate: a squared ReLU) stacked under the
    converter's merged name; the router's score-correction bias as its bias."""
    stacked = stack_experts(tensors, {**config, "num_experts": config.get("n_routed_experts")})
    for name, w in mamba2_mixers(stacked, config):
        if ".mixer.experts." in name:
            layer = name.split(".")[2]
            yield f"model.layers.{layer}.mlp.experts.{name.rsplit('.', 2)[-2]}.weight", w
        elif name.endswith("e_score_correction_bias"):
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), w
        else:
            yield name, w


def nemotron_h_arch(config: dict) -> str:
    """llama.cpp's architecture: nemotron_h_moe where the feed-forward layers route experts."""
    return "NEMOTRON_H_MOE" if nemotron_h_is_moe(config) else "NEMOTRON_H"


# --- Falcon-H1 --------------------------------------------------------------------------------

def falcon_h1_config(config: dict) -> dict:
    """Attention and a Mamba-2 mixer side by side in every layer, then an MLP."""
    _check_mixer(config)
    if config.get("mamba_rms_norm") or any(config.get(k) for k in ("projectors_bias",
                                                                    "mlp_bias",
                                                                    "attention_bias")):
        raise GGUFLayoutError("a falcon_h1 with a gated mixer norm (mamba_rms_norm) or biases "
                              "has no GGUF layout here: use --format hf or mlx-lm")
    if config.get("tie_word_embeddings") and (config.get("embedding_multiplier", 1.0)
                                              != config.get("lm_head_multiplier", 1.0)):
        raise GGUFLayoutError("a falcon_h1 with tied embeddings but its own lm_head_multiplier "
                              "has no GGUF layout here (one tensor cannot fold both): use "
                              "--format hf or mlx-lm")
    return config


def _falcon_h1_scale(gguf_name: str, config: dict) -> np.ndarray | float:
    """What llama.cpp's Falcon-H1 graph expects folded into a stored matrix: the multipliers
    transformers applies to its input or output (in_proj's per part of z, x, B, C, dt). The
    tensor's kind is the name's token after the layer (`blk.0.ssm_in.weight`, `blk.0.ssm_a`)
    or its first (`token_embd.weight`, `output.weight`)."""
    tokens = gguf_name.split(".")
    c, kind = config, tokens[2] if tokens[0] == "blk" else tokens[0]
    attention_in = float(c.get("attention_in_multiplier", 1.0))
    scales = {"token_embd": c.get("embedding_multiplier", 1.0),
              "output": c.get("lm_head_multiplier", 1.0),
              "ffn_gate": (c.get("mlp_multipliers") or [1.0, 1.0])[0],
              "ffn_down": (c.get("mlp_multipliers") or [1.0, 1.0])[1],
              "attn_q": attention_in, "attn_v": attention_in,
              "attn_k": attention_in * float(c.get("key_multiplier", 1.0)),
              "attn_output": c.get("attention_out_multiplier", 1.0),
              "ssm_out": c.get("ssm_out_multiplier", 1.0)}
    if kind != "ssm_in":
        return float(scales.get(kind, 1.0))
    m = mixer_of(c)
    parts = [m.d_inner, m.d_inner, m.n_group * m.d_state, m.n_group * m.d_state, m.n_head]
    per_part = c.get("ssm_multipliers") or [1.0] * 5
    column = np.repeat(np.asarray(per_part, np.float64), parts)[:, None]
    return column * float(c.get("ssm_in_multiplier", 1.0))


def _falcon_h1_folded(gguf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    w = _a_from_a_log(gguf_name, w, config)
    return (w * _falcon_h1_scale(gguf_name, config)).astype(np.float32)


def _falcon_h1_unfolded(gguf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    w = (w / _falcon_h1_scale(gguf_name, config)).astype(np.float32)
    return _a_log_from_a(gguf_name, w, config)


FALCON_H1_VALUES = StoredValues(_falcon_h1_folded, _falcon_h1_unfolded)
