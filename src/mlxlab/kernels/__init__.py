"""Fused CPU kernels (C++ MLX primitives in csrc/) with the pure-MLX formulation as fallback.

Models and losses call `cross_entropy`, `swiglu`, `gelu`, `attention`, `rms_norm`, `layer_norm`,
`dropout`, `rope` and `split_heads`/`merge_heads` here, and the trainer's AdamW is `AdamW` (adamw.py); each call picks
the fused primitive or the composed MLX ops. Why: on x86, MLX's CPU exp/sigmoid run scalar on one
thread, so the vocabulary softmax, the attention softmax and the SiLU of a small transformer cost
several times PyTorch's, its erf (the exact GELU) is a scalar libm call that took more than half
of the default BERT's step, and its RMSNorm, LayerNorm, RoPE, strided copies and AdamW update run
as single-threaded element-wise ops; its dropout draws threefry bits on one thread (see
docs/benchmarks.md, issues 12 and 24). The fused kernels do the same math in one vectorized,
multi-threaded pass, forward and backward (their VJPs are fused kernels too); the dropout kernel
draws MLX's own bits, so its masks are nn.Dropout's.

Mode (`trainer.fused_kernels` -> set_mode, or $MLXLAB_FUSED_KERNELS for scripts):
  auto  fused on the CPU when the extension builds; otherwise, with one log line, pure MLX
  on    fused on the CPU; an error when the extension cannot be built
  off   pure MLX always
set_skip (default $MLXLAB_FUSED_KERNELS_SKIP: comma-separated names from OPS) leaves those ops
to MLX while the others stay fused: for measuring one kernel's effect, or for ruling one out when
a result looks wrong. set_threads (default $MLXLAB_KERNEL_THREADS, else the usable cores) sets
their threads. The variables are read once, by runtime/settings.py.
The fused path runs only when MLX's default device is the CPU and the inputs are float32; GPU
runs and other dtypes take the MLX ops silently. `pip install` compiles the extension into the
cache (hatch_build.py at the repository root, ~20-40 s); where that did not happen, the first
use does (build.py), and later processes load the cached build. It is built for one fixed
instruction-set level (isa_level: x86-64-v3 on x86-64), never for the building CPU, so it is
the same program, with the same results, on every CPU at that level; a CPU below it runs the
pure-MLX ops after one log line.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn

from mlxlab.kernels.build import KernelBuildError, load
from mlxlab.runtime import cpu, settings

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
OPS = ("cross_entropy", "swiglu", "attention", "rms_norm", "rope", "heads", "adamw", "gelu",
       "layer_norm", "dropout")

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
        _load()


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
    return "fused" if _load() is not None else f"unavailable: {_error}"


def isa_level() -> str:
    """The fixed instruction-set level the kernels are built for on this CPU (runtime/cpu.py:
    x86-64-v3 or armv8-a); KernelBuildError on a CPU below it, which runs the pure-MLX ops."""
    level = cpu.isa_level()
    if level is None:
        raise KernelBuildError(cpu.below_level_reason())
    return level


def _load() -> ModuleType | None:
    """The compiled module, built on first use; None (logged once) when it cannot be had."""
    global _module, _error
    if _module is None and _error is None:
        try:
            module = load(settings.current().kernels_cache, isa_level(), log.warning)
            module.set_num_threads(threads())
            # MLX and the module must agree on nanobind's ABI to pass mx.array; check it once.
            module.swiglu(mx.zeros((1,)), mx.zeros((1,)))
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


def _fused(op: str, *arrays: mx.array) -> ModuleType | None:
    """The module when this call of `op` should take the fused path."""
    if mode() == "off" or op in skipped() or mx.default_device() != mx.cpu:
        return None
    if any(a.dtype != mx.float32 for a in arrays):
        return None
    return _load()


def mlx_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """The pure-MLX per-row cross-entropy: a max-shifted log-sum-exp minus the target logit (on
    MLX's CPU backend `exp` is the slow op, and this form runs it once forward and reuses it
    backward: 2x faster than nn.losses.cross_entropy, see benchmarks/bench_kernels.py)."""
    shift = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - shift).sum(axis=-1)) + shift.squeeze(-1)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy over the last axis, no reduction: logits (..., V) as float32, targets (...)."""
    logits = logits.astype(mx.float32)
    module = _fused("cross_entropy", logits)
    if module is None:
        return mlx_cross_entropy(logits, targets)
    vocab = logits.shape[-1]
    ce = module.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
    return ce.reshape(targets.shape)


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """softmax(q k^T * scale + mask) v over (B, H, T, D) heads, what
    mx.fast.scaled_dot_product_attention computes. Fused: the two matmuls go to BLAS and the
    masked softmax (forward and backward) to one kernel, for float32 with no mask, an additive
    (T_q, T_kv) mask or a key-padding mask (B, 1, 1, T_kv) (boolean, True = may attend, as
    models.layers.padding_mask makes; or additive), and as many key/value heads as query heads;
    otherwise MLX's SDPA. The fused softmax is MLX's op for op, so the result is MLX's to the bit."""
    key_mask = isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1:3] == (1, 1)
    plain_mask = mask is None or key_mask or (isinstance(mask, mx.array) and mask.ndim == 2)
    module = _fused("attention", q, k, v)
    if module is None or not plain_mask or q.shape[1] != k.shape[1]:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, mx.array):
        if mask.dtype == mx.bool_:
            # MLX puts float32's lowest where the mask is false; adding it to a score gives
            # that lowest exactly, so this is the same softmax (a row with no key left is
            # uniform, as MLX's, not NaN).
            mask = mx.where(mask, mx.array(0.0), mx.array(mx.finfo(mx.float32).min))
        mask = mask.astype(mx.float32)
        if key_mask:
            mask = mask.reshape(mask.shape[0], mask.shape[-1])
    scores = (q * scale) @ k.swapaxes(-1, -2)
    return module.softmax(scores, mask, key_mask) @ v


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, what mx.fast.rms_norm computes. Fused: one pass
    forward and one backward (MLX's CPU rms_norm runs as composed single-threaded ops)."""
    module = _fused("rms_norm", x, weight) if weight.ndim == 1 and x.shape[-1:] == weight.shape else None
    if module is None:
        return mx.fast.rms_norm(x, weight, eps)
    return module.rms_norm(x, weight, eps)


def rope(x: mx.array, dims: int, base: float, scale: float, offset: int) -> mx.array:
    """Rotary positions for heads laid out (B, T, H, D), returned as (B, H, T, D): what
    mx.fast.rope(x.transpose(0, 2, 1, 3), dims, traditional=False, base=base, scale=scale,
    offset=offset) computes (nn.RoPE). Fused: the rotation and the transpose copy in one pass
    each way, for the whole head (dims == D)."""
    module = _fused("rope", x) if x.ndim == 4 and dims == x.shape[-1] and dims % 2 == 0 else None
    if module is None:
        return mx.fast.rope(
            x.transpose(0, 2, 1, 3), dims, traditional=False, base=base, scale=scale, offset=offset
        )
    half = dims // 2
    # The angles as MLX's rope forms them (tests/test_kernels_step.py checks the result).
    inv_freq = mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half))
    positions = mx.arange(offset, offset + x.shape[1], dtype=mx.float32) * scale
    theta = positions[:, None] * inv_freq[None]
    return module.rope(x, mx.cos(theta), mx.sin(theta))


def split_heads(x: mx.array) -> mx.array:
    """(B, T, H, D) -> (B, H, T, D) as a contiguous array: MLX's strided copy (which a matmul on
    the transposed view makes) is single-threaded and generic; fused, one multi-threaded copy."""
    module = _fused("heads", x) if x.ndim == 4 else None
    return x.transpose(0, 2, 1, 3) if module is None else module.swap_heads(x, True)


def merge_heads(x: mx.array) -> mx.array:
    """(B, H, T, D) -> (B, T, H * D), attention's output back to the model's layout."""
    B, H, T, D = x.shape
    module = _fused("heads", x)
    out = x.transpose(0, 2, 1, 3) if module is None else module.swap_heads(x, False)
    return out.reshape(B, T, H * D)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the Llama MLP's activation."""
    module = _fused("swiglu", gate, up) if gate.shape == up.shape else None
    if module is None:
        return nn.silu(gate) * up
    return module.swiglu(gate, up)


def gelu(x: mx.array) -> mx.array:
    """The exact GELU, x * (1 + erf(x / sqrt(2))) / 2: nn.gelu. Fused: one vectorized,
    multi-threaded pass each way (MLX's CPU erf is scalar and single-threaded) computing MLX's
    own erf and exp op for op, so values and gradients are nn.gelu's to the bit."""
    module = _fused("gelu", x)
    return nn.gelu(x) if module is None else module.gelu(x)


def _next_key() -> mx.array:
    """The key MLX's next draw without a key would use, advancing the global state as that draw
    does: MLX's key sequence splits the state key in two, keeps the first half as the new state
    and draws with the second (mlx/random.cpp KeySequence::next). A zero-size draw advances it."""
    key = mx.random.split(mx.random.state[0])[1]
    mx.random.uniform(shape=(0,))
    return key


def dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout, (keep * x) / (1 - p), keep ~ Bernoulli(1 - p): nn.Dropout in training.
    Fused: the kernel draws MLX's own threefry bits from the key MLX's draw would take (one draw
    from the global random state, as nn.Dropout makes), so its masks and outputs are nn.Dropout's
    to the bit (a seed trains the same run on either path, give or take other kernels' rounding),
    and mx.compile's captured state and bitwise resume work unchanged; MLX's own draw runs
    threefry on one thread, the kernel vectorized on all cores."""
    keep = 1.0 - p
    module = _fused("dropout", x)
    if module is None:
        return (mx.random.bernoulli(keep, x.shape) * x) * (1 / keep)
    return module.dropout(x, _next_key(), keep, 1 / keep)


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis: mx.fast.layer_norm.
    Fused for an affine norm (weight and bias (D,)): one pass forward, one backward, each
    MLX's CPU formula and autodiff gradient op for op with its sums in MLX's order, so values
    and gradients are mx.fast.layer_norm's to the bit."""
    affine = weight is not None and bias is not None and weight.ndim == 1
    module = _fused("layer_norm", x, weight, bias) if affine and x.shape[-1:] == weight.shape else None
    if module is None:
        return mx.fast.layer_norm(x, weight, bias, eps)
    return module.layer_norm(x, weight, bias, eps)


from mlxlab.kernels.adamw import AdamW  # noqa: E402  (uses _fused above)

__all__ = ["AdamW", "attention", "cross_entropy", "dropout", "gelu", "isa_level", "layer_norm",
           "mlx_cross_entropy",
           "merge_heads", "mode", "rms_norm", "rope", "set_mode", "set_skip", "set_threads",
           "skipped", "split_heads", "status", "swiglu", "threads"]
