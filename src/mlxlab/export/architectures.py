"""How each decoder's mlx-lm weights go back to the Hugging Face checkpoint's layout, and the
model types mlxlab's tests prove.

mlx-lm loads a hub checkpoint through its architecture's `sanitize`, which for most types only
drops tensors, but for some rewrites them: MoE experts stacked into `switch_mlp.<proj>`,
DeepSeek-V3's `kv_b_proj` split into `embed_q` and `unembed_out`, Granite MoE's fused
`input_linear` split into gate and up, LFM2's convolution kernels transposed. `--format hf`
undoes that per architecture (`Layout.to_hf`; a type `LAYOUTS` does not name gets the default:
experts unstacked, names and config kept); `--format mlx-lm` writes mlx-lm's own names, which
its `load` reads back unchanged (what `mlx_lm.convert` writes: mlx-lm's sanitize must take its
own output back for every type it has, so that format needs no check).

What gates an export is its check (proof.py): transformers loads the written folder and must
give the fine-tune's logits, so a sanitize this table does not undo, or a forward that differs
between mlx-lm and transformers, is refused with the measured gap. `TESTED` is the list
tests/test_export_architectures.py trains and exports (transformers and mlx-lm, no missing or
unexpected tensor); it is what an export without PyTorch (nothing to check with) may rely on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mlx.core as mx

Weights = dict[str, mx.array]

# mlx-lm stacks a MoE layer's experts into switch_mlp.<proj> (E, out, in); Hugging Face
# checkpoints keep one tensor per expert: Mixtral's block_sparse_moe.experts.<e>.w1/w2/w3, the
# others' (Qwen MoE, DeepSeek-V3, ...) mlp.experts.<e>.<proj>.
_MIXTRAL_EXPERTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def unstack_experts(weights: Mapping[str, mx.array], config: Mapping | None = None) -> Weights:
    """mlx-lm's stacked MoE experts back to Hugging Face's one tensor per expert."""
    out = {}
    for name, value in weights.items():
        m = re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.(weight|bias)", name)
        if m is None:
            out[name] = value
            continue
        prefix, proj, leaf = m.groups()
        for e in range(value.shape[0]):
            if prefix.endswith("block_sparse_moe"):
                out[f"{prefix}.experts.{e}.{_MIXTRAL_EXPERTS[proj]}.{leaf}"] = value[e]
            else:
                out[f"{prefix}.experts.{e}.{proj}.{leaf}"] = value[e]
    return out


def _deepseek_v3(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """kv_b_proj from mlx-lm's two halves: per head, embed_q (H, rank, nope) transposed holds the
    key rows and unembed_out (H, v, rank) the value rows of kv_b_proj (H * (nope + v), rank)."""
    out = unstack_experts(weights)
    for name in [n for n in out if n.endswith(".embed_q.weight")]:
        prefix = name.removesuffix(".embed_q.weight")
        wk = out.pop(name).swapaxes(-1, -2)
        wv = out.pop(f"{prefix}.unembed_out.weight")
        out[f"{prefix}.kv_b_proj.weight"] = mx.concatenate([wk, wv], axis=1).reshape(
            -1, wk.shape[-1])
    return out


def _granitemoe(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """Granite MoE keeps its experts fused: input_linear (E, 2 * ffn, hidden) is gate over up,
    output_linear (E, hidden, ffn) is down."""
    out = dict(weights)
    for name in [n for n in out if n.endswith(".switch_mlp.gate_proj.weight")]:
        prefix = name.removesuffix(".switch_mlp.gate_proj.weight")
        gate, up = out.pop(name), out.pop(f"{prefix}.switch_mlp.up_proj.weight")
        out[f"{prefix}.input_linear.weight"] = mx.concatenate([gate, up], axis=1)
        out[f"{prefix}.output_linear.weight"] = out.pop(f"{prefix}.switch_mlp.down_proj.weight")
    return out


def _lfm2(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """LFM2's depthwise convolution: mlx-lm's (C, K, 1) kernel is PyTorch's (C, 1, K)."""
    return {n: v.swapaxes(1, 2) if n.endswith("conv.conv.weight") else v
            for n, v in weights.items()}


def _conv_axes(weights: Mapping[str, mx.array]) -> Weights:
    """A depthwise convolution's kernel: mlx-lm's (C, K, 1) is PyTorch's (C, 1, K)."""
    return {n: v.swapaxes(1, 2) if v.ndim == 3 and "conv" in n and n.endswith(".weight")
            and v.shape[-1] == 1 else v for n, v in weights.items()}


def _renamed(weights: Mapping[str, mx.array], pairs: tuple[tuple[str, str], ...]) -> Weights:
    out = {}
    for name, value in weights.items():
        for old, new in pairs:
            name = re.sub(old, new, name)
        out[name] = value
    return out


# The norms mlx-lm's Qwen3-Next / Qwen3.5 sanitize stores as 1 + w (transformers' weight is w:
# its RMSNorm computes x * (1 + w))
_OFFSET_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                 "model.norm.weight", ".q_norm.weight", ".k_norm.weight")


def _offset_norms_back(weights: Weights) -> Weights:
    return {n: v - 1.0 if v.ndim == 1 and n.endswith(_OFFSET_NORMS) else v
            for n, v in weights.items()}


def _qwen3_next(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    return _offset_norms_back(_conv_axes(unstack_experts(weights)))


def _qwen3_5(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """mlx-lm keeps Qwen3.5's text model under language_model.; the export is the text-only
    checkpoint (Qwen3_5ForCausalLM: model. / lm_head), also of a multimodal folder, whose
    vision tower mlx-lm drops at load (_qwen3_5_text_config)."""
    prefix = (("^language_model\\.model\\.", "model."), ("^language_model\\.lm_head", "lm_head"))
    return _offset_norms_back(_conv_axes(unstack_experts(_renamed(weights, prefix))))


# the multimodal config's keys a text-only Qwen3.5 config carries too
_TEXT_KEYS = ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id", "dtype",
              "torch_dtype")


def _qwen3_5_text_config(config: dict) -> dict:
    """A multimodal Qwen3.5 config.json as the text model's (what the run trained: mlx-lm
    loads no vision tower), so transformers loads the export as Qwen3_5ForCausalLM rather
    than a multimodal model whose vision weights are missing."""
    if not isinstance(config.get("text_config"), Mapping):
        return config
    text = {**config["text_config"], **{k: config[k] for k in _TEXT_KEYS if k in config}}
    return {**text, "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"]}


def _olmo_hybrid(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """OLMo-Hybrid's checkpoint names its norms attention_layer_norm / feedforward_layer_norm
    (transformers renames them at load, and back at save)."""
    return _conv_axes(_renamed(weights, (("input_layernorm", "attention_layer_norm"),
                                         ("post_attention_layernorm", "feedforward_layer_norm"))))


def _nemotron_h(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """Nemotron-H's experts are fc1 (up) / fc2 (down) in mlx-lm, up_proj / down_proj in the
    checkpoint."""
    out = unstack_experts(weights)
    return _conv_axes(_renamed(out, ((r"(experts\.\d+)\.fc1\.", r"\1.up_proj."),
                                     (r"(experts\.\d+)\.fc2\.", r"\1.down_proj."))))


def _granitemoehybrid(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """Granite MoE's experts; without experts, mlx-lm's dense mlp.{gate,up,down}_proj are the
    checkpoint's shared_mlp: input_linear (gate rows over up rows) and output_linear. (A lone
    projection, as an adapter's update goes through alone, keeps its name: GGUF splits the
    fused one into those names again.)"""
    out = _granitemoe(weights, config)
    for name in [n for n in out if n.endswith(".mlp.gate_proj.weight")]:
        prefix = name.removesuffix(".mlp.gate_proj.weight")
        if f"{prefix}.mlp.up_proj.weight" not in out:
            continue
        gate, up = out.pop(name), out.pop(f"{prefix}.mlp.up_proj.weight")
        out[f"{prefix}.shared_mlp.input_linear.weight"] = mx.concatenate([gate, up], axis=0)
        if f"{prefix}.mlp.down_proj.weight" in out:
            out[f"{prefix}.shared_mlp.output_linear.weight"] = out.pop(
                f"{prefix}.mlp.down_proj.weight")
    return _conv_axes(out)


def _mamba2(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    return _conv_axes(unstack_experts(weights))


def _falcon_h1(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """mlx-lm folds Falcon-H1's multipliers into the weights (and mlxlab's reader the two it
    does not: models/hf_normalise.py); transformers applies them at run time, so the
    checkpoint holds the weights before the fold."""
    from mlx_lm.models.falcon_h1 import ModelArgs, compute_mup_vector

    args = ModelArgs.from_dict(dict(config))
    attn_in = args.attention_in_multiplier
    divisors = {"embed_tokens.weight": args.embedding_multiplier,
                "lm_head.weight": args.lm_head_multiplier, "q_proj.weight": attn_in,
                "k_proj.weight": attn_in * args.key_multiplier, "v_proj.weight": attn_in,
                "o_proj.weight": args.attention_out_multiplier,
                "out_proj.weight": args.ssm_out_multiplier,
                "gate_proj.weight": args.mlp_multipliers[0],
                "down_proj.weight": args.mlp_multipliers[1]}
    mup = compute_mup_vector(args)
    out = {}
    for name, value in _conv_axes(weights).items():
        suffix = next((s for s in divisors if name.endswith(s)), None)
        if suffix is not None:
            value = value / divisors[suffix]
        elif name.endswith("in_proj.weight"):
            value = value / (args.ssm_in_multiplier * mup.astype(value.dtype)[:, None])
        out[name] = value
    return out


def _kimi_linear(weights: Mapping[str, mx.array], config: Mapping) -> Weights:
    """Kimi-Linear's checkpoint: the MLA kv_b_proj whole (as DeepSeek-V3's), the MoE under
    block_sparse_moe (experts w1 / w2 / w3, the router's bias under gate), a dense layer's MLP
    there too (transformers 5 saves it so), q/k/v convolutions as q_conv1d (C, 1, K)."""
    out = _deepseek_v3(weights, config)
    out = _renamed(out, (
        (r"\.self_attn\.([qkv])_conv\.conv\.weight$", r".self_attn.\1_conv1d.weight"),
        (r"\.mlp\.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias"),
        (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".mlp.experts.\1.w1."),
        (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".mlp.experts.\1.w2."),
        (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".mlp.experts.\1.w3."),
        (r"\.mlp\.", ".block_sparse_moe.")))
    return _conv_axes(out)


def _exact_gelu(config: dict) -> dict:
    """mlx-lm's StarCoder2 MLP is the exact GELU (nn.gelu) whatever hidden_act says; the config
    names what the model computed in mlxlab, so transformers computes the same."""
    return {**config, "hidden_act": "gelu"}


def _same_config(config: dict) -> dict:
    return config


@dataclass(frozen=True)
class Layout:
    """How one model_type's mlx-lm weights and config.json become the Hugging Face checkpoint's."""

    to_hf: Callable[[Mapping[str, mx.array], Mapping], Weights] = unstack_experts
    hf_config: Callable[[dict], dict] = _same_config


# The types whose to_hf or config is not the default's
LAYOUTS: dict[str, Layout] = {
    "starcoder2": Layout(hf_config=_exact_gelu),
    "deepseek_v3": Layout(_deepseek_v3),
    "granitemoe": Layout(_granitemoe),
    "lfm2": Layout(_lfm2),
    "qwen3_5": Layout(_qwen3_5, _qwen3_5_text_config),
    "qwen3_5_text": Layout(_qwen3_5),
    "qwen3_next": Layout(_qwen3_next),
    "kimi_linear": Layout(_kimi_linear),
    "olmo_hybrid": Layout(_olmo_hybrid),
    "nemotron_h": Layout(_nemotron_h),
    "falcon_h1": Layout(_falcon_h1),
    "granitemoehybrid": Layout(_granitemoehybrid),
    "mamba2": Layout(_mamba2),
}

# The types tests/test_export_architectures.py exports and loads in transformers and mlx-lm
# (its parametrization: a type here without a tiny model there fails the tests)
TESTED = ("cohere2", "deepseek_v3", "exaone4", "gemma2", "gemma3_text", "glm4", "granite",
          "granitemoe", "lfm2", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2",
          "qwen3", "qwen3_moe", "starcoder2")


# The hybrid types tests/test_hybrid_io.py fine-tunes, exports and loads in transformers (its
# parametrization, from tests/hybrid_families.py: a type here without a tiny model there fails)
HYBRIDS_TESTED = ("qwen3_5_text", "qwen3_5", "qwen3_next", "kimi_linear", "olmo_hybrid",
                  "nemotron_h", "falcon_h1", "granitemoehybrid", "mamba2", "gemma4_text")


def layout_of(model_type: str | None) -> Layout:
    """How a model_type's weights and config go back to the Hugging Face layout (the default
    for a type LAYOUTS does not name; its check says whether that is right)."""
    return LAYOUTS.get(model_type or "", Layout())
