"""Where trainer.precision=bf16 may multiply in bfloat16 on the CPU: a CPU with bf16 units and
MKL's bf16 GEMM to drive them.

MLX's CPU backend multiplies bfloat16 in a scalar loop of its own (~4 GFLOP/s, no BLAS symbol
to rebind: kernels/csrc/bf16_product.cpp), so bf16 on the CPU is slower than fp32 wherever
nothing else runs the products. On a CPU whose /proc/cpuinfo lists `amx_bf16` (Intel AMX: Sapphire
Rapids and later) or `avx512_bf16` (Cooper Lake, Zen 4 and later), MKL's
`cblas_gemm_bf16bf16f32` multiplies bf16 inputs into float32 sums on those units: that is the
product kernels.bf16_matmul runs. Elsewhere MKL emulates it with float32 arithmetic, no faster
than its float32 GEMM, so it is not used there; nor on an AMD CPU, where MKL
runs its generic kernels (mkl.py) although Zen 4 has AVX512-BF16.

MKL comes from the optional `mkl` package (`pip install 'mlxlab[mkl]'`), loaded out of the
global symbol scope as for MLX's float32 products (runtime/compute/mkl.py): the library that
serves MLX already where MKL does, else MKL's layers linked for mlxlab and loaded RTLD_LOCAL.
`gemm_bf16()` answers once per process: (MKL's function and thread control, why) or (None,
why not).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from mlxlab.runtime.compute import blas, cpu, mkl, small_gemm

SYMBOL = "cblas_gemm_bf16bf16f32"
LOCAL_THREADS = "MKL_Set_Num_Threads_Local"
# /proc/cpuinfo's names for the units, and what the log line calls them (best first).
UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


@dataclass(frozen=True)
class Gemm:
    """MKL's bf16 GEMM as kernels.bf16_matmul calls it: the function, MKL's per-thread thread
    count (0: none), and the M*N*K below which a product runs on one thread (small_gemm.py's
    default for MLX's sgemm: MKL's sleeping OpenMP threads cost more to wake than a small
    product; not measured for bf16 products yet)."""

    address: int
    local_threads: int
    below: int = small_gemm.DEFAULT_BELOW


_answer: tuple[Gemm | None, str] | None = None
_library: ctypes.CDLL | None = None  # MKL's layers, where mlxlab loaded them for this (kept)


def units(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 units this CPU reports ("AMX", "AVX512-BF16"); `flags` default to this CPU's."""
    flags = cpu.cpu_flags() if flags is None else flags
    return [name for flag, name in UNITS if flag in flags]


def gemm_bf16() -> tuple[Gemm | None, str]:
    """(MKL's cblas_gemm_bf16bf16f32, which units it runs on) on an Intel CPU with bf16 units and
    MKL installed; (None, one line on what is missing) otherwise. Loads MKL once."""
    global _answer
    if _answer is None:
        _answer = _find(units())
    return _answer


def _find(found: list[str]) -> tuple[Gemm | None, str]:
    if not found:
        return None, "this CPU reports no bf16 units (amx_bf16 or avx512_bf16 in /proc/cpuinfo)"
    if not mkl.is_intel():  # MKL dispatches on the vendor: elsewhere its generic kernels run
        return None, (f"this {cpu.cpu_vendor() or 'non-Intel'} CPU has {' and '.join(found)}, "
                      "but MKL drives them on Intel CPUs only")
    directory = mkl.mkl_directory()
    if directory is None:
        return None, (f"this CPU has {' and '.join(found)} but MKL is not installed: "
                      "`pip install 'mlxlab[mkl]'` (x86-64 Linux)")
    library = blas._lib if blas._mkl_layer else None  # MKL serves MLX already
    if library is None:
        global _library
        try:
            group, _ = mkl.link_group(directory)
            library = _library = ctypes.CDLL(str(group), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            return None, f"MKL could not be loaded alone ({e})"
    try:
        function, local = getattr(library, SYMBOL), getattr(library, LOCAL_THREADS)
    except AttributeError as e:
        return None, f"MKL {mkl.mkl_version()} lacks a function ({e})"
    gemm = Gemm(*(ctypes.cast(f, ctypes.c_void_p).value for f in (function, local)))
    return gemm, f"bf16 products on {' and '.join(found)} (MKL {mkl.mkl_version()} {SYMBOL})"
