"""GGUF's K-quant mixtures (Q4_K_M, Q5_K_M, Q6_K), quantized by llama.cpp's own code.

gguf-py, the `gguf` package, quantizes only the legacy types (Q4_0, Q4_1, Q8_0, ...). The K-quants
come from ggml itself: `ggml_quantize_chunk`, the function `llama-quantize` calls for every
tensor, in the llama.cpp build the `xllamacpp` wheel ships (loaded with ctypes; its bytes are
llama.cpp's by construction), optionally weighted by an importance matrix (per input column, the
mean square of the activations that reach the matrix: what `llama-imatrix` computes, here on the
run's own training rows: imatrix.py). That build links no `llama_model_quantize`, so which type
each tensor gets is decided here, as llama-quantize decides it (llama.cpp's src/llama-quant.cpp,
`llama_tensor_get_type`; tests/kquant_reference.json holds what it wrote for a tiny model of
every architecture written here), from the whole file (`FileLayout`: every tensor's name, the
block and expert counts), as llama-quantize reads it before it picks a type:

- the output matrix (or, tied, the token embedding): Q6_K, Q8_0 where its rows are not whole
  256-value blocks (F16 where not even 32-value ones);
- attn_v, and the fused attn_qkv (Phi-3's, Qwen3.5's and Qwen3-Next's delta layers') with it:
  Q6_K at Q4_K_M and Q5_K_M where `use_more_bits` picks its place among the file's attn_v
  tensors (the first and last eighth, and every third in between), in the order llama.cpp
  visits tensors (by layer, then name; a file written in the safetensors' order has blk.10
  before blk.2): on a dense decoder its layer number, on a hybrid its rank among the attention
  layers; on what llama.cpp calls a 70B (80 layers of a Llama with grouped heads, or a Qwen2), a
  Q4_K one is raised to Q5_K; in a file of 8 experts, Q8_0;
- ffn_down (ffn_down_exps, ffn_down_shexp too): Q6_K at Q4_K_M and Q5_K_M where
  `use_more_bits` picks it, of the block count: by its place among the file's ffn_down tensors
  where the file has no experts, by its layer number where it has;
- in a file of 8 experts, attn_k Q8_0 and, at Q4_K_M, attn_output Q5_K;
- every other matrix (the mixers' ssm_in / ssm_out, LFM2's shortconv in_proj / out_proj, the
  experts' 3-D stacks, DeepSeek-V3's latent projections attn_q_a / attn_q_b / attn_kv_a_mqa /
  attn_k_b / attn_v_b) the file type's own (Q4_K, Q5_K, Q6_K), and where its rows are not whole
  256-value blocks, llama.cpp's fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when
  even 32 does not divide them). What llama-quantize never quantizes (vectors, single rows,
  norms, routers, convolution kernels) the writer keeps in F32 (gguf.py).
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable
from dataclasses import dataclass
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


# llama.cpp's tensor categories (tensor_get_category), matched in its order; attn_qkv and
# attn_kv_b count as attn_v (category_is_attn_v)
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
               ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
               ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
_LAYER = re.compile(r"blk\.(\d+)\.")


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((kind for part, kind in _CATEGORIES if part in name), "other")


def _layer_of(name: str) -> int:
    """The N of a tensor's `blk.N.`; -1 for one outside the blocks."""
    found = _LAYER.match(name)
    return -1 if found is None else int(found[1])


def _ranks(names: Iterable[str], category: str) -> dict[str, int]:
    """Each `category` weight's place among the file's weights of that category, in the order
    llama.cpp visits them (its loader's: by layer, then by name; a file written in the
    safetensors' order has blk.10 before blk.2): the count llama-quantize keeps as it goes."""
    chosen = [n for n in names if n.endswith("weight") and _category(n) == category]
    return {n: i for i, n in enumerate(sorted(chosen, key=lambda n: (_layer_of(n), n)))}


def is_70b(gguf_arch: str, config: dict) -> bool:
    """What llama.cpp's hyperparameter loader calls LLM_TYPE_70B among the architectures
    written here: 80 layers of a Llama with grouped key-value heads (a Llama of 80 layers
    without is a 65B), or of a Qwen2."""
    if config.get("num_hidden_layers") != 80:
        return False
    heads = config.get("num_attention_heads")
    return (gguf_arch == "QWEN2"
            or gguf_arch == "LLAMA" and config.get("num_key_value_heads", heads) != heads)


@dataclass(frozen=True)
class FileLayout:
    """What llama-quantize reads from a file before it picks a type: every tensor's name, the
    block count, the expert count (0 without experts), whether the output matrix is the
    embedding's (no output.weight), and is_70b."""

    names: tuple[str, ...]
    layers: int
    experts: int = 0
    seventy_b: bool = False

    @property
    def tied(self) -> bool:
        return "output.weight" not in self.names


class Mixture:
    """The type of each matrix of one file, as llama-quantize picks it for `quant` (module
    docstring), from the file's `layout`."""

    def __init__(self, quant: str, layout: FileLayout) -> None:
        import gguf

        self.T = gguf.GGMLQuantizationType
        self.quant, self.default = quant, self.T[MIXTURES[quant][0]]
        self.layout = layout
        self.more_bits = quant in ("q4_k_m", "q5_k_m")
        # attn_v by its place among the file's attn_v tensors (on a hybrid, the attention
        # layers'); ffn_down by its place among the ffn_down ones where the file has no
        # experts, by its layer where it has (llama.cpp's layer_info)
        self.attn_v = _ranks(layout.names, "attn_v")
        self.ffn_down = _ranks(layout.names, "ffn_down")

    def type_of(self, name: str, columns: int):
        """The GGML type of weight `name` (a GGUF tensor name; 2-D, or 3-D stacked experts)
        with `columns` per row."""
        T, layout, category, kind = self.T, self.layout, _category(name), self.default
        if category == "output" or (layout.tied and category == "token_embd"):
            kind = T.Q8_0 if columns % self._block(kind) else T.Q6_K
        elif category == "attn_v":
            if self.more_bits and _use_more_bits(self._place(self.attn_v, name),
                                                 len(self.attn_v)):
                kind = T.Q6_K
            if layout.seventy_b and kind in (T.Q3_K, T.Q4_K):
                kind = T.Q5_K
            if layout.experts == 8:  # llama.cpp's rule for Mixtral-like files
                kind = T.Q8_0
        elif category == "attn_k" and layout.experts == 8:
            kind = T.Q8_0
        elif category == "attn_output" and layout.experts == 8 and self.quant == "q4_k_m":
            kind = T.Q5_K
        elif category == "ffn_down" and self.more_bits:
            layer = _layer_of(name) if layout.experts > 1 else self._place(self.ffn_down, name)
            if _use_more_bits(layer, layout.layers):
                kind = T.Q6_K
        return self._fallback(kind, columns)

    @staticmethod
    def _place(ranks: dict[str, int], name: str) -> int:
        if name not in ranks:
            raise ValueError(f"{name} is not among the file's tensors the mixture was made for")
        return ranks[name]

    def _block(self, kind) -> int:
        import gguf

        return gguf.GGML_QUANT_SIZES[kind][0]

    def _fallback(self, kind, columns: int):
        if columns % self._block(kind) == 0:
            return kind
        kind = self.T[FALLBACK.get(kind.name, "F16")]
        return kind if columns % self._block(kind) == 0 else self.T.F16
