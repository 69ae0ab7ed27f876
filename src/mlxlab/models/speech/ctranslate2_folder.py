"""A CTranslate2 Whisper folder, the layout faster-whisper users hold (Systran/faster-whisper-*:
model.bin, config.json, tokenizer.json, vocabulary.txt), read with no torch and no ctranslate2:
model.bin's variables under transformers' names, its config.json and tokenizer.json as
transformers' WhisperConfig keys and the decoding settings generation_config.json would hold.

model.bin (CTranslate2's binary version 6, written by its specs/model_spec.py `_serialize`):
the version, the spec's name and revision, then per variable its name, rank, dims, type id and
bytes, then aliases (Whisper's output projection -> the token embedding). Its Whisper loader
(converters/transformers.py) fuses self-attention's q/k/v into one linear (k with a zero bias,
as Whisper's k has none) and cross-attention's k/v into another; those are split back here.
Only float weights load (float32, float16, bfloat16, as float32): an int8 or int16 folder is
refused in one line naming the float conversion to make instead.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mlxlab.errors import ConfigError, MissingFileError

# the keys CTranslate2's Whisper converter writes into config.json (and no Whisper folder else)
CT2_WHISPER_KEYS = ("lang_ids", "suppress_ids", "suppress_ids_begin")
# CTranslate2's DataType ids 0-5
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# weight types of a quantized model (its scalars, head counts and flags, are int8/int16 too)
QUANTIZED = ("int8", "int16")
BINARY_VERSION = 6


def is_ct2_whisper(config: Mapping) -> bool:
    """Whether a config.json is the one CTranslate2's Whisper converter writes."""
    return all(k in config for k in CT2_WHISPER_KEYS)


class _Reader:
    """Reads model.bin's fields in order from a memory map (the arrays are views of it)."""

    def __init__(self, data: mmap.mmap | bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str, count: int = 1) -> tuple:
        size = struct.calcsize(fmt) * count
        self.at += size
        return struct.unpack_from(f"<{count}{fmt}", self.data, self.at - size)

    def text(self) -> str:  # length with its NUL, UTF-8, NUL
        (n,) = self.take("H")
        self.at += n
        return bytes(self.data[self.at - n:self.at - 1]).decode()

    def array(self, where: Path, name: str) -> np.ndarray:
        shape = self.take("I", self.take("B")[0])
        dtype, (size,) = CT2_DTYPES[self.take("B")[0]], self.take("I")
        if dtype in QUANTIZED and name.endswith("/weight"):
            raise ConfigError(
                f"{where} is a CTranslate2 {dtype} Whisper ({name} is {dtype}): mlxlab loads "
                "Whisper in float; convert it to float16 or float32 (ct2-transformers-converter "
                "--quantization float16, or the float folder of this model)")
        raw = np.dtype("uint16" if dtype == "bfloat16" else dtype)
        value = np.frombuffer(self.data, raw, size // raw.itemsize, self.at).reshape(shape)
        self.at += size
        if dtype == "bfloat16":  # numpy has none: its 16 bits are float32's upper half
            value = (value.astype(np.uint32) << 16).view(np.float32)
        return value


def read_model_bin(path: Path) -> dict[str, np.ndarray]:
    """model.bin's variables by CTranslate2's names (aliases resolved), mapped, not copied."""
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    r = _Reader(data)
    version = r.take("I")[0]
    spec = r.text() if version >= 2 else ""
    if version != BINARY_VERSION or spec != "WhisperSpec":
        raise ConfigError(f"{path} is CTranslate2's {spec or 'unnamed'} model of binary version "
                          f"{version}: mlxlab reads WhisperSpec of version {BINARY_VERSION} "
                          "(convert with ctranslate2 3.x or later)")
    out: dict[str, np.ndarray] = {}
    r.take("I")  # the spec's revision
    for _ in range(r.take("I")[0]):
        name = r.text()
        out[name] = r.array(path, name)
    for _ in range(r.take("I")[0]):
        alias = r.text()
        out[alias] = out[r.text()]
    return out


def _layers(ct2: Mapping[str, np.ndarray], side: str) -> int:
    return sum(k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight") for k in ct2)


def _split_attention(out: dict, dst: str, q: tuple, k: tuple, v: tuple) -> None:
    """q/k/v (weight, bias) pairs as transformers' q_proj/k_proj/v_proj (k has no bias)."""
    for name, (w, b) in zip(("q", "k", "v"), (q, k, v), strict=True):
        out[f"{dst}.{name}_proj.weight"] = w
        if name != "k":
            out[f"{dst}.{name}_proj.bias"] = b
        elif np.any(b):
            raise ConfigError(f"{dst}: CTranslate2's k bias is not zero (Whisper's k has none)")


def transformers_weights(ct2: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2's Whisper variables under transformers' names, float32 (the output
    projection is tied to the token embedding, so it is not among them)."""
    out: dict[str, np.ndarray] = {}

    def put(dst: str, src: str, norm: bool = False) -> None:
        out[f"{dst}.weight"] = ct2[f"{src}/{'gamma' if norm else 'weight'}"]
        out[f"{dst}.bias"] = ct2[f"{src}/{'beta' if norm else 'bias'}"]

    def pairs(src: str, parts: int) -> list[tuple]:
        return list(zip(np.split(ct2[f"{src}/weight"], parts), np.split(ct2[f"{src}/bias"], parts),
                        strict=True))

    for side in ("encoder", "decoder"):
        put(f"model.{side}.layer_norm", f"{side}/layer_norm", norm=True)
        out[f"model.{side}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
        for i in range(_layers(ct2, side)):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            _split_attention(out, f"{dst}.self_attn", *pairs(f"{src}/self_attention/linear_0", 3))
            put(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            put(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm", norm=True)
            put(f"{dst}.fc1", f"{src}/ffn/linear_0")
            put(f"{dst}.fc2", f"{src}/ffn/linear_1")
            put(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm", norm=True)
            if side == "decoder":  # cross-attention: q alone, k and v fused
                cross = f"{src}/attention"
                q = (ct2[f"{cross}/linear_0/weight"], ct2[f"{cross}/linear_0/bias"])
                _split_attention(out, f"{dst}.encoder_attn", q, *pairs(f"{cross}/linear_1", 2))
                put(f"{dst}.encoder_attn.out_proj", f"{cross}/linear_2")
                put(f"{dst}.encoder_attn_layer_norm", f"{cross}/layer_norm", norm=True)
    for conv in ("conv1", "conv2"):
        put(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def special_tokens(folder: Path) -> dict[str, int]:
    """tokenizer.json's added tokens by content (<|endoftext|>, <|startoftranscript|>, ...)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: a CTranslate2 Whisper folder keeps the "
                               "tokenizer.json of its model beside model.bin")
    return {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}


def ct2_config(folder: Path, ct2: Mapping[str, np.ndarray], raw: Mapping) -> dict:
    """transformers' WhisperConfig keys of the folder: sizes from the weights' shapes, the
    special tokens from tokenizer.json, suppressed tokens from CTranslate2's config.json."""
    if int(ct2["decoder/activation"]) != 3 or int(ct2["decoder/scale_embeddings"]):
        raise ConfigError(f"{folder}/model.bin: not Whisper's exact GELU and unscaled embeddings")
    special = special_tokens(folder)
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>") if t not in special]
    if missing:
        raise ConfigError(f"{folder}/tokenizer.json lacks Whisper's {missing}: keep the "
                          "model's own tokenizer.json beside model.bin")
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    return {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "is_encoder_decoder": True, "activation_function": "gelu", "scale_embedding": False,
        "vocab_size": int(vocab), "d_model": int(d_model),
        "num_mel_bins": int(ct2["encoder/conv1/weight"].shape[1]),
        **{f"{side}_layers": _layers(ct2, side) for side in ("encoder", "decoder")},
        **{f"{side}_attention_heads": int(ct2[f"{side}/num_heads"])
           for side in ("encoder", "decoder")},
        **{f"{side}_ffn_dim": int(ct2[f"{side}/layer_0/ffn/linear_0/weight"].shape[0])
           for side in ("encoder", "decoder")},
        "max_source_positions": int(ct2["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(ct2["decoder/position_encodings/encodings"].shape[0]),
        "pad_token_id": eot, "bos_token_id": eot, "eos_token_id": eot,
        "decoder_start_token_id": sot, "suppress_tokens": list(raw["suppress_ids"]),
        "begin_suppress_tokens": list(raw["suppress_ids_begin"]), "tie_word_embeddings": True}


def ct2_generation(config: Mapping, raw: Mapping) -> dict:
    """What decoding reads (whisper_folder.GENERATION_KEYS) of a CTranslate2 folder."""
    return {"suppress_tokens": list(raw["suppress_ids"]),
            "begin_suppress_tokens": list(raw["suppress_ids_begin"]),
            "eos_token_id": config["eos_token_id"], "is_multilingual": len(raw["lang_ids"]) > 1}


def read_ct2_whisper(folder: Path, raw: Mapping) -> tuple[dict, dict[str, np.ndarray]]:
    """(config as transformers' keys, model.bin's variables) of a CTranslate2 Whisper folder."""
    path = folder / "model.bin"
    if not path.is_file():
        raise MissingFileError(f"{folder} has CTranslate2's Whisper config.json but no "
                               "model.bin: copy the weights file beside it")
    ct2 = read_model_bin(path)
    return ct2_config(folder, ct2, raw), ct2
