"""GGUF's K-quant mixtures (Q4_K_M, Q5_K_M, Q6_K), quantized by llama.cpp's own code.

gguf-py, the `gguf` package, quantizes only the legacy types (Q4_0, Q4_1, Q8_0, ...). The K-quants
come from ggml itself: `ggml_quantize_chunk`, the function `llama-quantize` calls for every
tensor, in the llama.cpp build the `xllamacpp` wheel ships (loaded with ctypes; its bytes are
llama.cpp's by construction), optionally weighted by an importance matrix (per input column, the
mean square of the activations that reach the matrix: what `llama-imatrix` computes, here on the
run's own training rows: imatrix.py).

Which type each tensor gets is llama-quantize's mixture for the file type (llama.cpp's
src/llama-quant.cpp, `llama_tensor_get_type`), for dense decoders:

- the output matrix (or, tied, the token embedding): Q6_K, Q8_0 where its rows are not whole
  256-value blocks;
- Q4_K_M / Q5_K_M: attn_v and ffn_down get Q6_K on the layers `use_more_bits` picks (the first
  and last eighth, and every third in between, counted in the file's order);
- every other matrix the file type's own (Q4_K, Q5_K, Q6_K), and where its rows are not whole
  256-value blocks, llama.cpp's fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when
  even 32 does not divide them).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

from mlxlab.errors import ConfigError

# --quant -> (the file type's default tensor type, llama.cpp's file type), by name in gguf-py
MIXTURES = {"q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
            "q6_k": ("Q6_K", "MOSTLY_Q6_K")}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@cache
def _ggml() -> ctypes.CDLL:
    """llama.cpp's library in the xllamacpp wheel, with ggml_quantize_chunk's signature."""
    try:
        import xllamacpp
    except ImportError:
        raise ConfigError("--quant q4_k_m / q5_k_m / q6_k quantize with llama.cpp's own code, "
                          "which comes in the xllamacpp wheel: pip install xllamacpp (or "
                          "pip install -e \".[gguf]\"); q8_0, q4_0 and q4_1 need nothing more"
                          ) from None
    (library,) = Path(xllamacpp.__file__).parent.glob("xllamacpp*.so")
    lib = ctypes.CDLL(str(library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


def quantize(w: np.ndarray, kind, importance: np.ndarray | None = None) -> np.ndarray:
    """`w` (rows, columns) as GGML type `kind` (a gguf.GGMLQuantizationType), by llama.cpp's
    ggml_quantize_chunk, weighted by `importance` (one value per column) where given: the
    (rows, bytes per row) uint8 array gguf's writer takes with raw_dtype=kind."""
    import gguf

    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, columns = src.shape
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    out = np.empty((rows, columns // block * block_bytes), dtype=np.uint8)
    weights = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (columns,):
            raise ValueError(f"importance {importance.shape} for a matrix of {columns} columns")
        weights = importance.ctypes.data
    written = _ggml().ggml_quantize_chunk(int(kind), src.ctypes.data, out.ctypes.data, 0, rows,
                                          columns, weights)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class Mixture:
    """The type of each tensor of one file, in the order the tensors are written (the counters
    of attn_v and ffn_down advance as llama-quantize's do)."""

    def __init__(self, quant: str, layers: int, tied: bool) -> None:
        import gguf

        self.T = gguf.GGMLQuantizationType
        self.quant, self.default = quant, self.T[MIXTURES[quant][0]]
        self.layers, self.tied = layers, tied
        self.attn_v = self.ffn_down = 0

    def type_of(self, name: str, columns: int):
        """The GGML type of 2-D weight `name` (a GGUF tensor name) with `columns` per row."""
        kind = self.default
        if name == "output.weight" or (self.tied and name == "token_embd.weight"):
            block = self._block(kind)
            kind = self.T.Q8_0 if columns % block else self.T.Q6_K
        elif "attn_v.weight" in name:
            if self.quant in ("q4_k_m", "q5_k_m") and _use_more_bits(self.attn_v, self.layers):
                kind = self.T.Q6_K
            self.attn_v += 1
        elif "ffn_down" in name:
            if self.quant in ("q4_k_m", "q5_k_m") and _use_more_bits(self.ffn_down, self.layers):
                kind = self.T.Q6_K
            self.ffn_down += 1
        return self._fallback(kind, columns)

    def _block(self, kind) -> int:
        import gguf

        return gguf.GGML_QUANT_SIZES[kind][0]

    def _fallback(self, kind, columns: int):
        if columns % self._block(kind) == 0:
            return kind
        kind = self.T[FALLBACK.get(kind.name, "F16")]
        return kind if columns % self._block(kind) == 0 else self.T.F16
