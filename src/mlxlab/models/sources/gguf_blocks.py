"""GGUF's Q4_0, Q4_1 and Q8_0 blocks as MLX's affine quantization at group size 32, bit for bit.

A block holds 32 weights of one row: a float16 scale `d` (Q4_1 also a float16 minimum `m`) and
the 32 codes. MLX's affine layers compute w = scale * q + bias per group of 32, so:

    Q4_1  w = d * q + m          q in 0..15    scale d, bias m
    Q4_0  w = d * (q - 8)        q in 0..15    scale d, bias -8 d
    Q8_0  w = d * q              q in -128..127, stored as q + 128 in 0..255: scale d, bias -128 d

-8 d and -128 d are exact (powers of two), and every product d * q is exact in float32, so the
dequantized weights equal the GGUF's to the bit. Only the order of the codes differs: a GGUF
4-bit block keeps element j in the low nibble of byte j and element j + 16 in its high nibble;
MLX packs eight consecutive elements per uint32, element k in bits 4k..4k+3.
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 32
# GGUF type name -> (bits, bytes per block of 32)
AFFINE_TYPES = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34)}


def affine_from_blocks(raw: np.ndarray, type_name: str, columns: int,
                       dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weight uint32, scales, biases) of an MLX affine quantized matrix from a GGUF tensor's
    raw rows (uint8, (rows, bytes per row)) of type Q4_0, Q4_1 or Q8_0 with `columns` inputs.
    Scales and biases come in `dtype` (float32 by default: the float16 values widened)."""
    bits, block_bytes = AFFINE_TYPES[type_name]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, columns // GROUP_SIZE, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = -128.0 * d
    else:
        start = 4 if type_name == "Q4_1" else 2
        packed = blocks[..., start:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        bias = (blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
                if type_name == "Q4_1" else -8.0 * d)
    codes = codes.reshape(rows, columns)
    if bits == 8:
        weight = codes.view("<u4")
    else:
        nibbles = codes.reshape(rows, columns // 8, 8).astype(np.uint32)
        weight = np.bitwise_or.reduce(nibbles << (4 * np.arange(8, dtype=np.uint32)), axis=-1)
    return weight.astype(np.uint32), d.astype(dtype), bias.astype(dtype)


def permute_rows(raw: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a Llama q/k projection's output rows (its converter
    interleaves each head's two rotary halves for its RoPE kernel); rows move whole, so a
    quantized tensor's raw rows are permuted as they are."""
    half = raw.shape[0] // heads // 2
    return raw.reshape(heads, half, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape)
