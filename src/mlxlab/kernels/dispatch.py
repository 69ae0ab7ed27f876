"""Which path a kernel call takes: the mode (auto | on | off, `set_mode`), the ops left to MLX
(`set_skip`), the kernels' threads (`set_threads`) and the compiled extension, built on first use
(`extension`). ops.py and adamw.py ask `fused(op, *arrays)` before each call; mlxlab.kernels
names all of it (its docstring says why the kernels exist and what each mode does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from types import ModuleType

import mlx.core as mx

from mlxlab.kernels.build import KernelBuildError, load
from mlxlab.runtime import settings
from mlxlab.runtime.compute import blas, cpu

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
OPS = ("cross_entropy", "swiglu", "gelu_gate", "attention", "blocked_attention", "rms_norm", "rope",
       "heads", "adamw", "gelu", "layer_norm", "dropout", "dequantize", "quantized_matmul",
       "batched_matmul", "bf16_matmul", "depthwise_conv1d", "silu", "gated_delta",
       "clip_grad_norm")

# What set_mode, set_skip and set_threads chose; None: what the environment says (settings).
_mode: str | None = None
_skip: frozenset[str] | None = None
_threads: int | None = None
_module: ModuleType | None = None
_error: str | None = None


def _warn_unknown(ops: Iterable[str], source: str) -> None:
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        log.warning("%s: unknown op(s) %s ignored; the ops are %s", source, ", ".join(unknown),
                    ", ".join(OPS))


_warn_unknown(settings.current().fused_kernels_skip, "MLXLAB_FUSED_KERNELS_SKIP")


def set_mode(value: str | bool) -> None:
    """auto | on | off (YAML's on/off arrive as booleans). `on` builds now and raises if it can't."""
    global _mode
    if isinstance(value, bool):
        value = "on" if value else "off"
    value = str(value).strip().lower()
    if value not in MODES:
        raise ValueError(f"fused_kernels={value!r}: expected one of {', '.join(MODES)}")
    _mode = value
    if value == "on":
        extension()


def mode() -> str:
    return _mode or settings.current().fused_kernels


def set_skip(ops: Iterable[str] | None) -> None:
    """Leave `ops` (names from OPS) to MLX; None: $MLXLAB_FUSED_KERNELS_SKIP's. Read when a
    call is traced: set it before a compiled step's first call."""
    global _skip
    _skip = None if ops is None else frozenset(op for op in ops if op)
    if _skip is not None:
        _warn_unknown(_skip, "kernels.set_skip")


def skipped() -> frozenset[str]:
    return settings.current().fused_kernels_skip if _skip is None else _skip


def set_threads(count: int | None) -> None:
    """The kernels' threads (at least 1); None: $MLXLAB_KERNEL_THREADS, else the usable cores.
    Applies at once when the kernels are loaded, else when they load."""
    global _threads
    _threads = None if count is None else max(1, int(count))
    if _module is not None:
        _module.set_num_threads(threads())


def threads() -> int:
    """How many threads the fused kernels run on."""
    if _threads is not None:
        return _threads
    if settings.current().kernel_threads is not None:
        return settings.current().kernel_threads
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cpusets, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def status() -> str:
    """'fused' (the kernels run on CPU calls), 'off', or 'unavailable: <why>'."""
    if mode() == "off":
        return "off"
    return "fused" if extension() is not None else f"unavailable: {_error}"


def isa_level() -> str:
    """The fixed instruction-set level the kernels are built for on this CPU (runtime/compute/cpu.py:
    x86-64-v3 or armv8-a); KernelBuildError on a CPU below it, which runs the pure-MLX ops."""
    level = cpu.isa_level()
    if level is None:
        raise KernelBuildError(cpu.below_level_reason())
    return level


def extension() -> ModuleType | None:
    """The compiled module, built on first use; None (logged once) when it cannot be had."""
    global _module, _error
    if _module is None and _error is None:
        try:
            module = load(settings.current().kernels_cache, isa_level(), log.warning)
            module.set_num_threads(threads())
            # MLX and the module must agree on nanobind's ABI to pass mx.array; check it once.
            module.swiglu(mx.zeros((1,)), mx.zeros((1,)))
            module.set_spin_us(settings.current().kernel_spin_us)
            if mode() != "off":  # loaded for a run that uses them: its products share the pool
                blas.split_products(module.split_sgemm_address())
            _module = module
        except (KernelBuildError, TypeError) as exc:
            _error = str(exc).splitlines()[0]
            if mode() == "auto":
                log.warning(
                    "mlxlab.kernels: fused CPU kernels unavailable (%s); using pure-MLX ops "
                    "(set trainer.fused_kernels=off to skip the attempt)", _error,
                )
    if _module is None and mode() == "on":
        raise RuntimeError(
            f"trainer.fused_kernels=on but the fused CPU kernels are unavailable ({_error}); "
            "fix that or use trainer.fused_kernels=auto"
        )
    return _module


def fused(op: str, *arrays: mx.array) -> ModuleType | None:
    """The compiled module when this call of `op` should take the fused path (ops.py and
    adamw.py ask before each call), else None: take the MLX ops."""
    if mode() == "off" or op in skipped() or mx.default_device() != mx.cpu:
        return None
    if any(a.dtype != mx.float32 for a in arrays):
        return None
    return extension()
