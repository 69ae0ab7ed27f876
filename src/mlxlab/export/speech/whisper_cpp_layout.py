"""A Whisper in mlxlab (transformers' names and shapes) laid out as whisper.cpp's model file
holds it (ggml_file.py): the header from the folder's config, the mel filter bank, the
vocabulary, and every tensor under whisper.cpp's name, shape and type.

Names and shapes follow whisper.cpp's models/convert-h5-to-ggml.py (transformers' folder to
ggml): `model.` dropped, `layers` -> `blocks`, `self_attn.q_proj` -> `attn.query`,
`encoder_attn.k_proj` -> `cross_attn.key`, `fc1` / `fc2` -> `mlp.0` / `mlp.2`, the LayerNorms
-> `attn_ln`, `cross_attn_ln`, `mlp_ln`, `ln_post` (encoder) and `ln` (decoder); the
convolutions' biases as (n, 1); `proj_out` not written (tied to the token embedding). Types
follow the converter (f16: 2-D and 3-D tensors f16, the rest and both positional embeddings
and the convolutions' biases f32; f32: all f32) and whisper.cpp's quantize tool (q8_0, q5_0,
q5_1, q4_0: the 2-D tensors quantized, but for the positional embeddings and the
convolutions' biases; the convolutions' 3-D weights f16; the 1-D tensors f32).

whisper.cpp fixes Whisper's special tokens at Whisper's own ids (src/whisper.cpp's
whisper_vocab, from n_vocab); a model whose tokenizer puts them elsewhere is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mlxlab.export.speech.ggml_file import F16, F32, QUANTIZED, QUANTS, GGMLTensor, file_ftype

RENAMED = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
TOP = {
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.layer_norm.bias": "decoder.ln.bias",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
}
# kept in f32 whatever the type (the converter's list and the quantize tool's to_skip)
KEPT_F32 = ("encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
            "decoder.positional_embedding")
MULTILINGUAL_VOCAB = 51865   # whisper.cpp: a vocabulary this large is multilingual


def whisper_cpp_name(name: str) -> str | None:
    """whisper.cpp's name of transformers' parameter `name` (None: not written)."""
    if name == "proj_out.weight":
        return None
    parts = name.removeprefix("model.").split(".")
    if len(parts) > 3 and parts[1] == "layers":
        inner = ".".join(parts[3:-1])
        if inner not in RENAMED:
            raise ValueError(f"{name}: whisper.cpp has no tensor for it")
        return ".".join([parts[0], "blocks", parts[2], RENAMED[inner], parts[-1]])
    joined = ".".join(parts)
    return TOP.get(joined, joined)


def tensor_type(name: str, ndim: int, quant: str) -> int:
    """The ggml type whisper.cpp expects `name` (whisper.cpp's name, `ndim` axes) to be in a
    file of type `quant`."""
    if quant == "f32" or ndim < 2 or name in KEPT_F32:
        return F32
    if ndim == 3 or quant == "f16":
        return F16
    return QUANTS[quant][0]


def ggml_tensors(weights: Mapping[str, np.ndarray], quant: str) -> dict[str, GGMLTensor]:
    """transformers-named float32 `weights` as whisper.cpp's tensors of a `quant` file."""
    out: dict[str, GGMLTensor] = {}
    for name, values in weights.items():
        target = whisper_cpp_name(name)
        if target is None:
            continue
        values = np.asarray(values, np.float32)
        if target in ("encoder.conv1.bias", "encoder.conv2.bias"):
            values = values.reshape(-1, 1)
        out[target] = GGMLTensor(target, values.shape, tensor_type(target, values.ndim, quant),
                                 values)
    return out


def hparams(config: Mapping[str, Any], quant: str) -> dict[str, int]:
    """The file's header from a Whisper config.json."""
    return {"n_vocab": config["vocab_size"], "n_audio_ctx": config["max_source_positions"],
            "n_audio_state": config["d_model"], "n_audio_head": config["encoder_attention_heads"],
            "n_audio_layer": config["encoder_layers"],
            "n_text_ctx": config["max_target_positions"], "n_text_state": config["d_model"],
            "n_text_head": config["decoder_attention_heads"],
            "n_text_layer": config["decoder_layers"], "n_mels": config["num_mel_bins"],
            "ftype": file_ftype(quant)}


def mel_filters(n_mels: int) -> np.ndarray:
    """(n_mels, 201) Slaney mel filters, librosa's and Whisper's (openai/whisper's
    mel_filters.npz holds librosa.filters.mel(sr=16000, n_fft=400, n_mels=...)): the bank
    mlxlab's own features use (data/audio_features.py), transposed to whisper.cpp's order."""
    from mlxlab.data.audio_features import mel_filters as bank

    return np.array(bank(n_mels), np.float32).T.copy()


def special_ids(n_vocab: int) -> dict[str, int]:
    """Where whisper.cpp puts Whisper's special tokens for a vocabulary of `n_vocab`
    (src/whisper.cpp's whisper_vocab)."""
    multilingual = n_vocab >= MULTILINGUAL_VOCAB
    m = int(multilingual)
    shift = (n_vocab - 51765 - 1) - 98 if multilingual else 0  # languages beyond 98
    ids = {"<|endoftext|>": 50256 + m, "<|startoftranscript|>": 50257 + m,
           "<|notimestamps|>": 50362 + shift}
    if multilingual:
        ids["<|transcribe|>"] = 50358 + shift
        ids["<|en|>"] = 50258 + m
    return ids


def check_vocabulary(config: Mapping[str, Any], tokenizer: Any) -> None:
    """A ValueError line unless the model's special tokens sit where whisper.cpp looks for
    them (a Whisper vocabulary: 51,864 English-only, 51,865 or 51,866 multilingual)."""
    n_vocab = int(config["vocab_size"])
    if n_vocab < 51864:
        raise ValueError(f"--format whisper.cpp: the model's vocabulary holds {n_vocab} tokens; "
                         "whisper.cpp runs Whisper's own (51,864 English-only, 51,865 or "
                         "51,866 multilingual), its special tokens at Whisper's ids: export "
                         "--format hf")
    for token, expected in special_ids(n_vocab).items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise ValueError(f"--format whisper.cpp: the tokenizer's {token} is id {found}; "
                             f"whisper.cpp reads it as id {expected} in a vocabulary of "
                             f"{n_vocab}: export --format hf")


def vocabulary(tokenizer: Any, n_vocab: int) -> list[bytes]:
    """The tokens' bytes in id order through <|endoftext|> (what a Whisper folder's vocab.json
    holds and whisper.cpp's converters write; whisper.cpp lays the rest out from n_vocab):
    byte-level BPE symbols decoded to the bytes they stand for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    end = special_ids(n_vocab)["<|endoftext|>"]
    out = []
    for token in tokenizer.convert_ids_to_tokens(list(range(end + 1))):
        if not token:
            out.append(b"")
        elif all(c in decoder for c in token):
            out.append(bytes(decoder[c] for c in token))
        else:  # not a byte-level symbol: its text
            out.append(token.encode("utf-8"))
    return out


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant}: whisper.cpp's model file takes "
                         f"{', '.join(QUANTS)}")


__all__ = ["QUANTIZED", "check_quant", "check_vocabulary", "ggml_tensors", "hparams",
           "mel_filters", "special_ids", "vocabulary", "whisper_cpp_name"]
