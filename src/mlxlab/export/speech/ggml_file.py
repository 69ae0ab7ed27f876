"""whisper.cpp's model file, the legacy `ggml` format its models/convert-pt-to-ggml.py and
convert-h5-to-ggml.py write and its quantize tool rewrites (src/whisper.cpp's
`whisper_model_load` reads it), written and read back here:

    int32 magic 0x67676d6c ("ggml")
    int32 hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer,
          n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype
          (ftype: 0 f32, 1 f16; a quantized file 1000 * GGML_QNT_VERSION + its ggml ftype)
    int32 n_mel, n_fft, then n_mel * n_fft float32: the mel filter bank
    int32 n_tokens, then per token int32 length and its bytes (the regular tokens, in id order;
          whisper.cpp lays the special tokens out itself from n_vocab)
    tensors to the end of the file: int32 n_dims, name length, ggml type; n_dims int32 sizes
          innermost first (ggml's ne: a numpy (out, in) array is ne = [in, out]); the name;
          the data (f32, f16 or the quantized blocks of gguf-py's quantizers, which lay rows
          out as ggml does).

Little-endian throughout, as whisper.cpp writes it on every platform it ships for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = 0x67676D6C
QNT_VERSION = 2          # ggml.h GGML_QNT_VERSION
QNT_VERSION_FACTOR = 1000
HPARAMS = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
           "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")
# the --quant names: the ggml type of the big (2-D) tensors, and the file's ftype (ggml.h's
# ggml_ftype: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_Q5_0 8, MOSTLY_Q5_1 9)
F32, F16 = 0, 1
QUANTS = {"f32": (F32, 0), "f16": (F16, 1), "q8_0": (8, 7), "q5_0": (6, 8), "q5_1": (7, 9),
          "q4_0": (2, 2)}
QUANTIZED = {"q8_0", "q5_0", "q5_1", "q4_0"}


def file_ftype(quant: str) -> int:
    """The header's ftype of a file whose big tensors are `quant`."""
    ftype = QUANTS[quant][1]
    return QNT_VERSION * QNT_VERSION_FACTOR + ftype if quant in QUANTIZED else ftype


@dataclass
class GGMLTensor:
    """One tensor as the file holds it: numpy's shape (outermost first), its ggml type, and
    its values (dequantized when read back from a quantized type)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    values: np.ndarray


@dataclass
class GGMLWhisper:
    """A whisper.cpp model file's contents."""

    hparams: dict[str, int]
    filters: np.ndarray                       # (n_mel, n_fft) float32
    tokens: list[bytes]
    tensors: dict[str, GGMLTensor] = field(default_factory=dict)


def encode_tensor(values: np.ndarray, ggml_type: int) -> bytes:
    """`values` (float32, numpy's shape) in `ggml_type`: f32, f16, or gguf-py's legacy block
    quantizers (quantized along the innermost axis, ggml's rows)."""
    if ggml_type == F32:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if ggml_type == F16:
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(np.ascontiguousarray(values, np.float32),
                           GGMLQuantizationType(ggml_type)).tobytes()


def write_ggml(path: Path, model: GGMLWhisper) -> int:
    """`model` written to `path` as whisper.cpp's file; returns its size in bytes. Each
    tensor's values are encoded in its ggml type (encode_tensor)."""
    with open(path, "wb") as out:
        out.write(struct.pack("<I", MAGIC))
        out.write(struct.pack("<11i", *(int(model.hparams[k]) for k in HPARAMS)))
        n_mel, n_fft = model.filters.shape
        out.write(struct.pack("<2i", n_mel, n_fft))
        out.write(np.ascontiguousarray(model.filters, "<f4").tobytes())
        out.write(struct.pack("<i", len(model.tokens)))
        for token in model.tokens:
            out.write(struct.pack("<i", len(token)) + token)
        for tensor in model.tensors.values():
            name = tensor.name.encode("utf-8")
            dims = tensor.shape[::-1]  # ggml's ne: innermost first
            out.write(struct.pack(f"<3i{len(dims)}i", len(dims), len(name), tensor.ggml_type,
                                  *dims))
            out.write(name)
            out.write(encode_tensor(tensor.values, tensor.ggml_type))
        return out.tell()


def _ints(f: BinaryIO, n: int) -> tuple[int, ...]:
    data = f.read(4 * n)
    if len(data) != 4 * n:
        raise ValueError("the file ends inside a header")
    return struct.unpack(f"<{n}i", data)


def _decode(data: bytes, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    if ggml_type == F32:
        return np.frombuffer(data, "<f4").reshape(shape).astype(np.float32)
    if ggml_type == F16:
        return np.frombuffer(data, "<f2").reshape(shape).astype(np.float32)
    from gguf import GGMLQuantizationType, quants

    rows = np.frombuffer(data, np.uint8).reshape(*shape[:-1], -1)
    return quants.dequantize(rows, GGMLQuantizationType(ggml_type)).reshape(shape)


def tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """How many bytes a tensor of `shape` takes in `ggml_type` (GGML's block sizes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    count = int(np.prod(shape))
    if count % block:
        raise ValueError(f"{count} values are not whole blocks of {block}")
    return count // block * size


def read_ggml(path: Path) -> GGMLWhisper:
    """A whisper.cpp model file read back from disk, its tensors decoded (quantized ones
    dequantized by gguf-py); a ValueError for a file that is not one."""
    with open(path, "rb") as f:
        (magic,) = struct.unpack("<I", f.read(4))
        if magic != MAGIC:
            raise ValueError(f"{path}: not a whisper.cpp ggml file (magic {magic:#x})")
        hparams = dict(zip(HPARAMS, _ints(f, len(HPARAMS)), strict=True))
        n_mel, n_fft = _ints(f, 2)
        filters = np.frombuffer(f.read(4 * n_mel * n_fft), "<f4").reshape(n_mel, n_fft).copy()
        (n_tokens,) = _ints(f, 1)
        tokens = []
        for _ in range(n_tokens):
            (length,) = _ints(f, 1)
            tokens.append(f.read(length))
        model = GGMLWhisper(hparams, filters, tokens)
        while head := f.read(12):
            n_dims, length, ggml_type = struct.unpack("<3i", head)
            shape = tuple(reversed(_ints(f, n_dims)))
            name = f.read(length).decode("utf-8")
            data = f.read(tensor_bytes(shape, ggml_type))
            model.tensors[name] = GGMLTensor(name, shape, ggml_type,
                                             _decode(data, ggml_type, shape))
    return model
