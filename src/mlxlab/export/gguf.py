"""A float Hugging Face decoder folder as one GGUF file, the format llama.cpp, Ollama and LM Studio
read: tensors renamed and laid out as llama.cpp's own converter (convert_hf_to_gguf.py) writes
them, its metadata keys, the tokenizer as a GGUF vocabulary (tokens, token types, merges,
pre-tokenizer, special tokens, chat template), and the weights in F32 / F16 / BF16 / Q8_0 /
Q4_0 / Q4_1, quantized by the `gguf` package (llama.cpp's own Python; its Q8_0 is bit-exact with
the C code), or as llama-quantize's K-quant mixtures Q4_K_M / Q5_K_M / Q6_K, quantized by
llama.cpp's C code itself (gguf_kquants.py), weighted by a run's importance matrix (imatrix.py;
on the file's tensors, per expert of a stack: gguf_imatrix.py).

    write_gguf(folder, "model.gguf", quant="q8_0", description=None) -> report dict

The folder is what `mlxlab export --format hf` writes (LoRA already fused), a pretrained float
folder, or an mlx-lm quantized folder: its 4-bit weights at group size 32 go out as Q4_1 block for
block (the same affine layout: no round trip through float), other quantized weights through
float into the asked type. What differs per architecture is in `ARCHITECTURES`: the GGUF
architecture, its config as the generic keys read it (and the settings llama.cpp's graph does
not compute, refused), its own metadata keys, and the tensors llama.cpp stores differently from
transformers: Llama's query/key rows interleaved for its rotary layout; Gemma's norms stored as
1 + w; MoE experts stacked, fused or latent tensors split (gguf_regroup.py); the hybrids' sequence
mixers in llama.cpp's layout: the Mamba-2 families, Mamba-2, Granite 4 hybrids, Nemotron-H and
Falcon-H1 (gguf_mamba.py), and the gated delta nets, Qwen3.5 and Qwen3-Next
(gguf_gated_delta.py). Where llama.cpp stores a function of a checkpoint's values (a mixer's
A = -exp(A_log), Falcon-H1's multipliers folded into its matrices), the architecture carries that
map and its inverse (`Architecture.values`, which the read-back, gguf_readback.py, undoes).
Everything else is the `gguf` package's: the tensor-name map, the writer, the special-token and
merges reader, the quantizers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.errors import ConfigError
from mlxlab.export.gguf_gated_delta import (
    qwen3_5_columns,
    qwen3_5_config,
    qwen3_5_hparams,
    qwen3_5_tensors,
    qwen3_next_config,
    qwen3_next_hparams,
    qwen3_next_tensors,
    zero_centred_norms,
)
from mlxlab.export.gguf_imatrix import file_importance, unweighted_reason
from mlxlab.export.gguf_kimi import kimi_linear_config, kimi_linear_hparams, kimi_linear_tensors
from mlxlab.export.gguf_kquants import MIXTURES, FileLayout, Mixture, is_70b
from mlxlab.export.gguf_kquants import quantize as ggml_quantize
from mlxlab.export.gguf_mamba import (
    FALCON_H1_VALUES,
    MIXER_VALUES,
    falcon_h1_config,
    granite_hybrid_config,
    granite_hybrid_hparams,
    granite_hybrid_tensors,
    mamba2_config,
    mamba2_hparams,
    mamba2_mixers,
    nemotron_h_arch,
    nemotron_h_config,
    nemotron_h_hparams,
    nemotron_h_tensors,
)
from mlxlab.export.gguf_regroup import (
    StoredValues,
    Tensors,
    deepseek_v3_config,
    deepseek_v3_hparams,
    expert_hparams,
    lfm2_config,
    lfm2_hparams,
    qwen3_moe_config,
    split_granite_experts,
    split_latent_attention,
    squeeze_conv,
    stack_experts,
)

# --quant -> (GGML tensor type for 2-D weights, llama.cpp's file type); 1-D tensors (norms,
# biases) stay F32 as llama.cpp keeps them.
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", *MIXTURES)


class GGUFExportError(ConfigError):
    """The folder cannot be written as GGUF; the message says what is possible."""


def gguf_package():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dependency of the export path
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install gguf") from err
    return gguf


@contextmanager
def gguf_file(out: Path, arch_name: str) -> Iterator[Any]:
    """A GGUFWriter for `out`, writing beside it under a temporary name: what the block added
    is written and renamed into place when it ends, and an interrupted export leaves no half
    file."""
    g = gguf_package()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = g.GGUFWriter(str(partial), arch_name)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def file_types() -> dict[str, tuple]:
    """--quant -> (GGML tensor type for 2-D weights, llama.cpp's file type)."""
    g = gguf_package()
    T, F = g.GGMLQuantizationType, g.LlamaFileType
    return {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16),
            "bf16": (T.BF16, F.MOSTLY_BF16), "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
            "q4_0": (T.Q4_0, F.MOSTLY_Q4_0), "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
            "q5_0": (T.Q5_0, F.MOSTLY_Q5_0), "q5_1": (T.Q5_1, F.MOSTLY_Q5_1),
            **{q: (T[kind], F[file_type]) for q, (kind, file_type) in MIXTURES.items()}}


# --- per-architecture differences -------------------------------------------------------------

def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' Llama keeps each head's rotary pairs as two halves; llama.cpp's LLAMA graph
    rotates adjacent pairs, so its converter interleaves the rows of q_proj and k_proj (the
    inverse of what transformers' GGUF loader undoes)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _llama_tensor(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute_rotary(w, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return _permute_rotary(w, config.get("num_key_value_heads",
                                             config["num_attention_heads"]))
    return w


def _gemma_tensor(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight
    return w + 1 if name.endswith("norm.weight") else w


def _same(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    return w


def _no_hparams(writer, config: dict) -> None:
    return None


def _gemma2_hparams(writer, config: dict) -> None:
    """Gemma 2's soft-capping of attention scores and of the output logits; llama.cpp scales
    queries by 1 / sqrt(head_dim), so a query_pre_attn_scalar other than head_dim is refused."""
    if config.get("query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        raise GGUFExportError("a Gemma 2 whose query_pre_attn_scalar is not its head_dim (Gemma "
                              "2 27B) is not written to GGUF here")
    writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
    writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))


def _granite_hparams(writer, config: dict) -> None:
    """Granite's four multipliers: embeddings, residual branches, attention scores, logits."""
    writer.add_embedding_scale(float(config.get("embedding_multiplier", 1.0)))
    writer.add_residual_scale(float(config.get("residual_multiplier", 1.0)))
    writer.add_attention_scale(float(config.get("attention_multiplier", 1.0)))
    writer.add_logit_scale(float(config.get("logits_scaling", 1.0)))


def _granite_moe_hparams(writer, config: dict) -> None:
    _granite_hparams(writer, config)
    expert_hparams(writer, config)


def _layer_norm_hparams(writer, config: dict) -> None:
    """StarCoder 2's LayerNorm (with a bias) has its own epsilon key."""
    writer.add_layer_norm_eps(float(config.get("norm_epsilon", config.get("layer_norm_eps",
                                                                             1e-5))))


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type becomes llama.cpp's architecture."""

    gguf_arch: str                  # gguf.MODEL_ARCH member name
    tensor: Callable[[str, np.ndarray, dict], np.ndarray] = _same
    rope_dims: bool = False         # writes rope.dimension_count (head_dim * partial rotary)
    head_dims: bool = False         # writes attention.key_length / value_length (head_dim)
    sliding_window: bool = False    # writes attention.sliding_window
    hparams: Callable = _no_hparams  # (writer, config): the architecture's own metadata keys
    # tensors llama.cpp groups or lays out otherwise (stacked experts, split fusions:
    # gguf_regroup.py; the hybrids' mixers: gguf_mamba.py, gguf_gated_delta.py)
    regroup: Callable[[Tensors, dict], Tensors] | None = None
    config: Callable[[dict], dict] = dict  # the config as the generic keys read it
    # the GGUF architecture where it depends on the config (Nemotron-H with or without experts)
    variant: Callable[[dict], str] | None = None
    # values llama.cpp stores in place of the checkpoint's, and their inverse (gguf_regroup.py)
    values: StoredValues | None = None
    # (GGUF name, per-input-column vector, config): the vector in the order the file holds the
    # matrix's columns (Qwen3.5's tiled value heads), for an importance matrix
    columns: Callable[[str, np.ndarray, dict], np.ndarray] | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LLAMA", _llama_tensor, rope_dims=True),
    "mistral": Architecture("LLAMA", _llama_tensor, rope_dims=True),
    "qwen2": Architecture("QWEN2"),
    "qwen3": Architecture("QWEN3", head_dims=True),
    "gemma3_text": Architecture("GEMMA3", _gemma_tensor, head_dims=True, sliding_window=True),
    "phi3": Architecture("PHI3", rope_dims=True),
    "gemma2": Architecture("GEMMA2", _gemma_tensor, head_dims=True, sliding_window=True,
                           hparams=_gemma2_hparams),
    "granite": Architecture("GRANITE", _llama_tensor, rope_dims=True, hparams=_granite_hparams),
    "olmo2": Architecture("OLMO2"),
    "starcoder2": Architecture("STARCODER2", hparams=_layer_norm_hparams),
    "mixtral": Architecture("LLAMA", _llama_tensor, rope_dims=True, hparams=expert_hparams,
                            regroup=stack_experts),
    "qwen3_moe": Architecture("QWEN3MOE", head_dims=True, hparams=expert_hparams,
                              regroup=stack_experts, config=qwen3_moe_config),
    "granitemoe": Architecture("GRANITE_MOE", _llama_tensor, rope_dims=True,
                               hparams=_granite_moe_hparams, regroup=split_granite_experts),
    "lfm2": Architecture("LFM2", hparams=lfm2_hparams, regroup=squeeze_conv, config=lfm2_config),
    "deepseek_v3": Architecture("DEEPSEEK2", hparams=deepseek_v3_hparams,
                                regroup=split_latent_attention, config=deepseek_v3_config),
    # the Mamba-2 families (gguf_mamba.py)
    "mamba2": Architecture("MAMBA2", hparams=mamba2_hparams, regroup=mamba2_mixers,
                           config=mamba2_config, values=MIXER_VALUES),
    "granitemoehybrid": Architecture("GRANITE_HYBRID", _llama_tensor, rope_dims=True,
                                     hparams=granite_hybrid_hparams,
                                     regroup=granite_hybrid_tensors,
                                     config=granite_hybrid_config, values=MIXER_VALUES),
    "nemotron_h": Architecture("NEMOTRON_H", head_dims=True, hparams=nemotron_h_hparams,
                               regroup=nemotron_h_tensors, config=nemotron_h_config,
                               variant=nemotron_h_arch, values=MIXER_VALUES),
    "falcon_h1": Architecture("FALCON_H1", head_dims=True, hparams=mamba2_hparams,
                              regroup=mamba2_mixers, config=falcon_h1_config,
                              values=FALCON_H1_VALUES),
    # Qwen3.5's text model: gated delta layers (gguf_gated_delta.py)
    "qwen3_5_text": Architecture("QWEN35", zero_centred_norms, rope_dims=True, head_dims=True,
                                 hparams=qwen3_5_hparams, regroup=qwen3_5_tensors,
                                 config=qwen3_5_config, values=MIXER_VALUES,
                                 columns=qwen3_5_columns),
    "qwen3_next": Architecture("QWEN3NEXT", zero_centred_norms, rope_dims=True, head_dims=True,
                               hparams=qwen3_next_hparams, regroup=qwen3_next_tensors,
                               config=qwen3_next_config, values=MIXER_VALUES),
    # Kimi-Linear: Kimi delta attention and latent attention layers (gguf_kimi.py)
    "kimi_linear": Architecture("KIMI_LINEAR", hparams=kimi_linear_hparams,
                                regroup=kimi_linear_tensors, config=kimi_linear_config,
                                values=MIXER_VALUES),
}
# llama.cpp reads these in F32 whatever the file type (its converter never quantizes them): the
# MoE router, whose top-k choice a rounding would flip, the convolution kernels (LFM2's, a Mamba
# or gated delta mixer's, Kimi-Linear's q/k/v ones), norms (a Mamba-2 group norm is 2-D), and
# tensors that are not a `.weight` (biases, Mamba's A and D).
_F32_TENSORS = ("ffn_gate_inp", "shortconv.conv", "ssm_conv1d", "ssm_conv1d_q", "ssm_conv1d_k",
                "ssm_conv1d_v", "_norm")


def _kept_in_f32(full_name: str) -> bool:
    base, _, leaf = full_name.rpartition(".")
    return leaf != "weight" or base.endswith(_F32_TENSORS)


# model types llama.cpp itself has no architecture for (its `gguf` package lists none)
_NOT_IN_LLAMA_CPP = {"olmo_hybrid": "OLMo-Hybrid"}


def architecture_of(config: dict) -> Architecture:
    kind = config.get("model_type")
    if kind in _NOT_IN_LLAMA_CPP:
        raise GGUFExportError(f"model_type={kind!r}: llama.cpp has no architecture for "
                              f"{_NOT_IN_LLAMA_CPP[kind]}, so no GGUF file of it would load; "
                              "export it as --format hf or mlx-lm (a run)")
    if kind not in ARCHITECTURES:
        raise GGUFExportError(
            f"model_type={kind!r} has no GGUF export here; mlxlab writes GGUF for "
            f"{sorted(ARCHITECTURES)}; others go out as --format hf or mlx-lm (a run), or through "
            "llama.cpp's convert_hf_to_gguf.py")
    scaling = config.get("rope_scaling") or {}
    kind_of_scaling = scaling.get("rope_type", scaling.get("type"))
    if kind_of_scaling not in (None, "default", "linear", "llama3"):
        raise GGUFExportError(f"rope_scaling type {kind_of_scaling!r} is not written to GGUF "
                              "here (default, linear and llama3 are)")
    arch = ARCHITECTURES[kind]
    arch.config(config)  # refuses a setting llama.cpp's graph does not compute
    return arch if arch.variant is None else replace(arch, gguf_arch=arch.variant(config))


# --- reading the folder -----------------------------------------------------------------------

def _read_tensors(folder: Path, quantization: dict | None
                  ) -> Iterator[tuple[str, np.ndarray | None, tuple | None]]:
    """(transformers name, float32 array, None) of each tensor in the folder's safetensors; for
    a weight mlx-lm quantized, (name, None, (packed, scales, biases, group_size, bits)) instead,
    its scales and biases not listed apart."""
    import mlx.core as mx  # reads bf16 and mlx-lm's packed uint32 weights alike

    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("adapters"))
    if not files:
        raise GGUFExportError(f"no *.safetensors in {folder}")
    for file in files:
        tensors = mx.load(str(file))
        for name, value in tensors.items():
            base = name.rsplit(".", 1)[0]
            if name.endswith((".scales", ".biases")) and base + ".weight" in tensors:
                continue
            if value.dtype == mx.uint32 and base + ".scales" in tensors:
                layer = (quantization or {}).get(base, quantization) or {}
                yield name, None, (value, tensors[base + ".scales"], tensors[base + ".biases"],
                                   layer.get("group_size", 64), layer.get("bits", 4))
            else:
                yield name, np.array(value.astype(mx.float32)), None


def _check_quantized(config: dict) -> None:
    """mlx-lm's affine layout, or a float folder; a folder transformers made from a GGUF file
    keeps quantization_config {quant_method: gguf} over the float weights it dequantized to."""
    q = config.get("quantization")
    made_from_gguf = (config.get("quantization_config") or {}).get("quant_method") == "gguf"
    if "quantization_config" in config and q is None and not made_from_gguf:
        raise GGUFExportError("the folder's quantization_config is not mlx-lm's layout: export a "
                              "float folder")
    if q is not None and q.get("mode", "affine") != "affine":
        raise GGUFExportError(f"mlx-lm quantization mode {q['mode']!r} has no GGUF type: export a "
                              "float folder")


def _dequantize(packed: tuple) -> np.ndarray:
    import mlx.core as mx

    w, scales, biases, group_size, bits = packed
    return np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
                    .astype(mx.float32))


def _as_q4_1(packed: tuple, rows: Callable[[np.ndarray], np.ndarray]):
    """mlx-lm's 4-bit affine layout at group size 32 is GGUF's Q4_1 block for block: w = scale * q
    + bias = d * q + m. Repacked without going through float: MLX keeps 8 values in a uint32,
    lowest nibble first; a Q4_1 block is d, m (f16) and 16 bytes whose low nibbles are values
    0-15 and high nibbles values 16-31. `rows` reorders rows (Llama's rotary interleave)."""
    w, scales, biases, _, _ = packed
    q = np.array(w).view(np.uint8)  # little-endian: byte k holds values 2k (low), 2k+1 (high)
    values = np.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1)  # (out, in)
    values = rows(values)
    blocks = values.reshape(values.shape[0], -1, 32)
    nibbles = (blocks[..., :16] | (blocks[..., 16:] << 4)).astype(np.uint8)
    d = rows(np.array(scales.astype(_mx().float16))).view(np.uint8).reshape(*blocks.shape[:2], 2)
    m = rows(np.array(biases.astype(_mx().float16))).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return np.concatenate([d, m, nibbles], axis=-1).reshape(values.shape[0], -1)


def _mx():
    import mlx.core as mx

    return mx


# --- the tokenizer ----------------------------------------------------------------------------

_PRE_TOKENIZERS = {
    # tokenizer.json's split pattern -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before merging: GPT-2's byte-level
    regex, or a Split pattern it knows; anything else is refused (llama.cpp would split text
    differently and encode other ids)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {}).get("Regex")
            if pattern in _PRE_TOKENIZERS:
                return _PRE_TOKENIZERS[pattern]
            raise GGUFExportError(f"tokenizer.json splits text with a pattern llama.cpp has no "
                                  f"name for ({str(pattern)[:40]}...): not exported")
    if any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    raise GGUFExportError("tokenizer.json is not a byte-level BPE (GGUF export here writes "
                          "byte-level BPE vocabularies, as Llama 3, Qwen and Phi-4 use)")


def _token_table(spec: dict, vocab_size: int, kind_of, g) -> tuple[list[str], list]:
    """Tokens in id order (ids the file's tokenizer does not use: `[PADn]`, UNUSED) and their
    GGUF types: added special tokens CONTROL, other added tokens USER_DEFINED, `kind_of(text)`
    for the model's own vocabulary."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [g.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        token = added.get(text)
        types[index] = (kind_of(text) if token is None else
                        g.TokenType.CONTROL if token.get("special") else g.TokenType.USER_DEFINED)
    return tokens, types


def _write_vocab(writer, folder: Path, vocab_size: int) -> dict:
    """tokens, token types, merges or scores, pre-tokenizer, special ids and the chat template.

    Two kinds of BPE: byte-level (GPT-2's byte alphabet: Llama 3, Qwen, Phi-4), written as
    llama.cpp's "gpt2" model with its merges and pre-tokenizer; and sentencepiece-style with
    byte fallback (a "▁" for the space, `<0xNN>` byte tokens: Llama 2, Mistral, Gemma's
    tokenizer.json), written as its "llama" model, where merge order is the score (-id: a BPE
    vocabulary numbers its tokens in the order their merges were learned)."""
    g = gguf_package()
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json (a GGUF carries its tokenizer)")
    spec = json.loads(file.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError("only BPE tokenizers (tokenizer.json model.type BPE) export to GGUF "
                              "here; a unigram sentencepiece model needs llama.cpp's converter")
    if model.get("byte_fallback"):
        unk = model.get("unk_token")

        def kind_of(text: str):
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return g.TokenType.BYTE
            return g.TokenType.UNKNOWN if text == unk else g.TokenType.NORMAL

        tokens, types = _token_table(spec, vocab_size, kind_of, g)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_token_types(types)
        writer.add_add_space_prefix(_prepends_space(spec))
        special = g.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
        pre, merges = "default", 0
    else:
        pre = _pre_tokenizer(spec)
        tokens, types = _token_table(spec, vocab_size, lambda text: g.TokenType.NORMAL, g)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = g.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
        merges = len(special.merges)
    special.add_to_gguf(writer)  # merges, bos/eos/pad/unk ids, add_bos flag, chat template
    return {"tokens": len(tokens), "model": "llama" if model.get("byte_fallback") else "gpt2",
            "pre_tokenizer": pre, "merges": merges, "special": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template)}


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (sentencepiece's add_dummy_prefix): a
    Metaspace pre-tokenizer that prepends, or a normalizer that does."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    norm = spec.get("normalizer") or {}
    parts = norm.get("normalizers", [norm])
    return any(p.get("type") == "Prepend" for p in parts)


# --- metadata ---------------------------------------------------------------------------------

def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _write_hparams(writer, config: dict, arch: Architecture, file_type) -> None:
    c = arch.config(config)
    writer.add_context_length(c.get("max_position_embeddings", 2048))
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    rope = c.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(c.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(file_type)
    if arch.rope_dims:
        writer.add_rope_dimension_count(int(_head_dim(c) * c.get("partial_rotary_factor", 1.0)))
    if arch.head_dims:
        writer.add_key_length(_head_dim(c))
        writer.add_value_length(_head_dim(c))
    if arch.sliding_window and c.get("sliding_window"):
        writer.add_sliding_window(c["sliding_window"])
    arch.hparams(writer, c)
    scaling = c.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf_package().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def _llama3_rope_factors(config: dict) -> np.ndarray:
    """llama.cpp keeps Llama 3's frequency-dependent rope scaling as a tensor (rope_freqs) of
    one factor per rotary frequency, computed as its converter computes it."""
    s, dim = config["rope_scaling"], _head_dim(config)
    base = float(config.get("rope_theta", 10000.0))
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- tensors ----------------------------------------------------------------------------------

def encode_tensor(w: np.ndarray, qtype):
    """(data, raw dtype) for the writer: 1-D tensors in F32; a 2-D one whose rows are not whole
    32-value blocks falls back to F16, as llama.cpp's converter does."""
    g = gguf_package()
    T = g.GGMLQuantizationType
    if w.ndim <= 1 or qtype == T.F32:
        return w.astype(np.float32), T.F32
    if qtype == T.F16:
        return w.astype(np.float16), T.F16
    block = g.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        return w.astype(np.float16), T.F16
    return g.quants.quantize(w, qtype), qtype


def _float_tensors(tensors) -> Tensors:
    """(name, float32 array): mlx-lm's quantized weights dequantized, for a regrouping."""
    for name, w, packed in tensors:
        yield name, _dequantize(packed) if packed is not None else w


def _k_quant(mixture: Mixture, gguf_name: str, w: np.ndarray,
             importance: np.ndarray | None) -> tuple[np.ndarray, object]:
    """A weight of a K-quant file: a matrix (or a stack of experts' matrices, quantized row by
    row as llama-quantize does) as the mixture's type, quantized by llama.cpp; what
    llama-quantize leaves as it is (a vector, a single row) in F32. `importance` is the
    matrix's vector (in,), or a stack's one per matrix (experts, in): each expert's rows are
    weighted by its own, as llama-quantize reads an imatrix of a 3-D tensor."""
    if _ggml_dims(w.shape) < 2:
        return encode_tensor(w, gguf_package().GGMLQuantizationType.F32)
    kind = mixture.type_of(gguf_name, w.shape[-1])
    if kind.name == "F16":
        return w.astype(np.float16), kind
    if importance is not None and importance.ndim == 2 and w.ndim == 3:
        if importance.shape != (w.shape[0], w.shape[-1]):
            raise ValueError(f"importance {importance.shape} for {gguf_name} {w.shape}")
        data = np.stack([ggml_quantize(m, kind, v) for m, v in zip(w, importance)])
        return data, kind
    data = ggml_quantize(w.reshape(-1, w.shape[-1]), kind, importance)
    return data.reshape(*w.shape[:-1], data.shape[-1]), kind


def quantized_by_llama_cpp(kind) -> bool:
    """Whether a K-quant file's tensor of GGML type `kind` went through ggml_quantize_chunk
    (what an importance matrix weights): everything but F32 and F16."""
    return kind.name not in ("F32", "F16")


def tensor_names(arch: Architecture, config: dict) -> Callable[[str], str | None]:
    """transformers tensor name -> llama.cpp's (`model.layers.0.self_attn.q_proj.weight` ->
    `blk.0.attn_q.weight`), or None where the `gguf` package's map has none; the base export
    and its LoRA adapter (gguf_lora.py) name tensors alike, so the adapter's pairs land on the
    base's tensors."""
    g = gguf_package()
    layers = arch.config(config)["num_hidden_layers"]  # Nemotron-H's counts its pattern
    name_map = g.get_tensor_name_map(g.MODEL_ARCH[arch.gguf_arch], layers)

    def llama_cpp_name(name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):  # a parameter named as itself: Mamba's A_log, D
            return name_map.get_name(name)
        mapped = name_map.get_name(base)
        if mapped is None:  # a key the map spells with its `.weight` (Falcon-H1's pre-MLP norm)
            return name_map.get_name(name)
        return f"{mapped}.{suffix}"

    return llama_cpp_name


def stored_tensor(arch: Architecture, config: dict, name: str, full_name: str,
                  w: np.ndarray) -> np.ndarray:
    """A float tensor (by its transformers `name`, its llama.cpp `full_name`) as the file holds
    it: the architecture's per-tensor layout (Llama's rotary interleave, Gemma's 1 + w), then
    the values llama.cpp stores (Mamba's A = -exp(A_log), Falcon-H1's folded multipliers); the
    LoRA adapter of a regrouped family (gguf_lora_regroup.py) goes through it too."""
    w = arch.tensor(name, w, config)
    return w if arch.values is None else arch.values.stored(full_name, w, config)


@dataclass(frozen=True)
class TensorTypes:
    """What the matrices are written as: `qtype` (the file's type), or a K-quant `mixture`'s
    type for each (gguf_kquants.py), weighted by `importance` (per mlx-lm weight name,
    imatrix.py; put on the file's tensors by gguf_imatrix.py) where it has the matrix."""

    qtype: Any
    mixture: Mixture | None = None
    importance: dict[str, np.ndarray] | None = None


def _named_tensors(folder: Path, config: dict, arch: Architecture
                   ) -> Iterator[tuple[str, str, np.ndarray | None, tuple | None]]:
    """(transformers name, llama.cpp name, float32 array or None, mlx-lm's packed weight or
    None) of every tensor the file holds, regrouped as llama.cpp lays it out."""
    llama_cpp_name = tensor_names(arch, config)
    tied = config.get("tie_word_embeddings", False)
    tensors = _read_tensors(folder, config.get("quantization"))
    if arch.regroup is not None:
        tensors = ((n, w, None) for n, w in arch.regroup(_float_tensors(tensors), config))
    for name, w, packed in tensors:
        if tied and name == "lm_head.weight":
            continue  # the GGUF reads the embedding as the output (no output.weight)
        full_name = llama_cpp_name(name)
        if full_name is None and ".switch_mlp." in name:
            raise GGUFExportError(f"{folder} holds mlx-lm's stacked experts ({name}): give the "
                                  "Hugging Face folder, or export the run itself to GGUF")
        if full_name is None:
            raise GGUFExportError(f"tensor {name} has no llama.cpp name for {arch.gguf_arch}")
        yield name, full_name, w, packed


def _ggml_dims(shape: tuple[int, ...]) -> int:
    """The dimensions ggml counts (ggml_n_dims): up to the last of its axes (numpy's first) that
    is longer than 1. llama-quantize quantizes only tensors of 2 or more; a (1, n) matrix,
    Qwen3-Next's shared expert's gate, stays as it is."""
    return next((len(shape) - i for i, n in enumerate(shape) if n > 1), 1)


def _file_names(folder: Path, config: dict, arch: Architecture) -> tuple[str, ...]:
    """The llama.cpp name of every tensor the file will hold, before any is written (what
    llama-quantize reads first): from the safetensors' headers, or, where the architecture
    regroups its tensors, from a first pass through the regrouping (the arrays dropped as it
    goes)."""
    if arch.regroup is not None:
        return tuple(full for _, full, _, _ in _named_tensors(folder, config, arch))
    llama_cpp_name = tensor_names(arch, config)
    names = []
    for file in sorted(f for f in folder.glob("*.safetensors")
                       if not f.name.startswith("adapters")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        stored = set(header) - {"__metadata__"}
        for name in stored:
            base = name.rsplit(".", 1)[0]
            packed_part = name.endswith((".scales", ".biases")) and base + ".weight" in stored
            tied = config.get("tie_word_embeddings", False) and name == "lm_head.weight"
            if not packed_part and not tied and llama_cpp_name(name) is not None:
                names.append(llama_cpp_name(name))
    return tuple(names)


def _write_tensors(writer, folder: Path, config: dict, arch: Architecture,
                   types: TensorTypes) -> tuple[dict, dict | None]:
    """Every tensor under llama.cpp's name and layout; returns how many went out as which type
    ("Q4_1 (direct)": an mlx-lm 4-bit weight repacked without a float round trip) and, given an
    importance matrix, which of the tensors llama.cpp quantized it weighted."""
    qtype, mixture = types.qtype, types.mixture
    g = gguf_package()
    importance = None
    if types.importance is not None:
        importance = file_importance(types.importance, config, tensor_names(arch, config),
                                     arch.columns)
    counts: dict[str, int] = {}
    weighted, unweighted = 0, {}
    for name, full_name, w, packed in _named_tensors(folder, config, arch):
        if packed is not None and qtype == g.GGMLQuantizationType.Q4_1 and packed[3:] == (32, 4):
            rows = lambda a, name=name: arch.tensor(name, a, config)  # noqa: E731
            data, kind, label = _as_q4_1(packed, rows), qtype, "Q4_1 (direct)"
        else:
            if packed is not None:
                w = _dequantize(packed)  # another group size or type: through float
            w = stored_tensor(arch, config, name, full_name, w)
            kept = g.GGMLQuantizationType.F32 if _kept_in_f32(full_name) else qtype
            if mixture is not None and kept == qtype:
                vector = None if importance is None else importance.get(full_name)
                data, kind = _k_quant(mixture, full_name, w, vector)
                if importance is not None and quantized_by_llama_cpp(kind):
                    if vector is None:
                        unweighted[full_name] = unweighted_reason(full_name)
                    else:
                        weighted += 1
            else:
                data, kind = encode_tensor(w, kept)
            label = kind.name
        writer.add_tensor(full_name, data, raw_dtype=kind)
        counts[label] = counts.get(label, 0) + 1
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        writer.add_tensor(g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(config))
        counts["F32"] = counts.get("F32", 0) + 1
    coverage = None
    if importance is not None:
        coverage = {"weighted": weighted, "quantized": weighted + len(unweighted),
                    "unweighted": dict(sorted(unweighted.items()))}
    return counts, coverage


def _file_layout(writer, folder: Path, config: dict, arch: Architecture) -> FileLayout:
    """What llama-quantize reads of the file before it picks each tensor's type: its tensors'
    names, and the block and expert counts as the metadata just written says them."""
    written = writer.kv_data[0]

    def count(key: str) -> int:
        value = written.get(f"{writer.arch}.{key}")
        return 0 if value is None else int(value.value)

    return FileLayout(_file_names(folder, config, arch), count("block_count"),
                      count("expert_count"), is_70b(arch.gguf_arch, config))


def write_gguf(folder: str | Path, out: str | Path, quant: str = "f16",
               description: str | None = None, name: str | None = None,
               importance: dict[str, np.ndarray] | None = None) -> dict:
    """Write the float decoder folder as one GGUF file at `out` (written beside it under a
    temporary name, then renamed: an interrupted export leaves no half file); returns what was
    written (architecture, tensor types, vocabulary). A K-quant (q4_k_m, q5_k_m, q6_k) is
    llama-quantize's mixture, quantized by llama.cpp (gguf_kquants.py), weighted by the
    `importance` matrix where given (by mlx-lm weight name: imatrix.py; gguf_imatrix.py); the
    report's "imatrix" then says how many of the tensors llama.cpp quantized it weighted and
    why each other one is not."""
    g = gguf_package()
    folder, out = Path(folder), Path(out)
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: use one of {list(QUANTS)}")
    config = json.loads((folder / "config.json").read_text())
    _check_quantized(config)
    arch = architecture_of(config)
    qtype, file_type = file_types()[quant]
    with gguf_file(out, g.MODEL_ARCH_NAMES[g.MODEL_ARCH[arch.gguf_arch]]) as writer:
        writer.add_name(name or folder.name)
        if description:
            writer.add_description(description)
        _write_hparams(writer, config, arch, file_type)
        vocab = _write_vocab(writer, folder, config["vocab_size"])
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
        mixture = None
        if quant in MIXTURES:
            mixture = Mixture(quant, _file_layout(writer, folder, config, arch))
        tensors, coverage = _write_tensors(writer, folder, config, arch,
                                           TensorTypes(qtype, mixture, importance))
    report = {"gguf": str(out), "architecture": g.MODEL_ARCH_NAMES[g.MODEL_ARCH[arch.gguf_arch]],
              "quant": quant, "tensor_types": tensors, "vocab": vocab,
              "bytes": out.stat().st_size}
    if coverage is not None:
        report["imatrix"] = coverage
    return report
