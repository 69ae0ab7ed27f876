"""Small device helpers: which backend runs the ops, memory counters, the compute dtype."""

from __future__ import annotations

import mlx.core as mx

_MB = 1024 * 1024


def backend() -> str:
    """Where mx ops run by default: "cpu", "cuda" or "metal"."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "metal"


def _memory_fn(name: str):
    # mx.get_*_memory since mlx 0.24; mx.metal.get_*_memory before (Metal only).
    fn = getattr(mx, name, None) or getattr(getattr(mx, "metal", None), name, None)
    return fn


def active_memory_mb() -> float:
    """Memory held by live arrays, in MiB (0.0 where this MLX build does not count it)."""
    fn = _memory_fn("get_active_memory")
    return fn() / _MB if fn else 0.0


def peak_memory_mb() -> float:
    """Peak of active memory since start or the last reset_peak_memory(), in MiB."""
    fn = _memory_fn("get_peak_memory")
    return fn() / _MB if fn else 0.0


def reset_peak_memory() -> None:
    fn = _memory_fn("reset_peak_memory")
    if fn:
        fn()


def default_compute_dtype() -> mx.Dtype:
    """fp32 on CPU (MLX's CPU bf16 matmul does not use BLAS: ~40x slower than fp32), bf16 on GPUs."""
    return mx.float32 if backend() == "cpu" else mx.bfloat16

