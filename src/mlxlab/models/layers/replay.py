"""A recurrent mixer's recompute that replays its costly parts (trainer.grad_checkpoint=cores).

A checkpointed mixer (grad_checkpoint.py) keeps only its input and runs its whole forward again
in the backward: its input projections (4-8x the hidden width, with their LoRA adapters) and its
rule (the gated delta rule or Mamba-2's scan) are most of that forward's cost, and the parts
between them (the short convolution and its SiLU, the q / k norms, the gates, the gated output
norm) most of its activations. Here the mixer's forward keeps, on a Tape, what its projections
and its rule returned (and the states the rule's kernel keeps for its own backward); the
recompute takes those from the tape in call order and computes only the parts between, while
each replayed call keeps its own gradient: a projection's is its VJP at the recompute's input
and parameters (mx.vjp, whose unused forward product MLX never evaluates), the rule's the
kernel's backward from the kept states (kernels.gated_delta_grad). Kept: the projections'
outputs, the rule's output and its states every KEPT_SPAN tokens; recomputed: the elementwise
rest.

A projection whose output is the mixer's own (its out_proj) is not kept: nothing in the recompute
reads it. A projection with a dropout on draws one key per call, in the forward and again in the
recompute (so every other dropout of the mixer sees the keys it saw), and computes its
gradient's masks under the key the forward drew (kernels.same_draws).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab import kernels

# the rule's kept states, one every KEPT_SPAN tokens (its own backward keeps one every 64): at
# 256 a quarter of the memory, for a seventh more of the kernels' time (each span's recomputed
# states no longer fit L2; a Qwen3.5-shaped hybrid's 2,048-token step at hidden 512: 72 MB less
# than at 64, 3.32 s against 3.15)
KEPT_SPAN = 256
_TAPES: list[Tape] = []  # the tapes of the mixers running, innermost last
_REPLAYED: dict[type, type] = {}  # a projection class -> its subclass that the tape replays


class Tape:
    """What one call of a mixer kept of its projections and rule, in call order: recorded by
    the forward, replayed by the backward's recompute of the same call."""

    def __init__(self) -> None:
        self.entries: list[list] = []
        self.replaying = False
        self.at = 0

    def record(self, *arrays: mx.array | None) -> list:
        entry = list(arrays)
        self.entries.append(entry)
        return entry

    def next(self) -> list:
        entry = self.entries[self.at]
        self.at += 1
        return entry

    def drop_output(self, output: object) -> None:
        """Forget a projection's kept output that is the mixer's own (nothing recomputed reads
        it, and it would stay alive until the backward)."""
        for entry in self.entries:
            if entry[0] is output:
                entry[0] = None


@contextlib.contextmanager
def taping(tape: Tape) -> Iterator[None]:
    _TAPES.append(tape)
    try:
        yield
    finally:
        _TAPES.pop()


def _tape() -> Tape | None:
    return _TAPES[-1] if _TAPES else None


def _dropping(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.training and m._p_1 < 1
               for _, m in module.named_modules())


def _drawing(key: mx.array | None) -> contextlib.AbstractContextManager:
    """Dropout masks drawn from `key` (a projection's, drawn where a dropout of it is on)."""
    return kernels.same_draws(key) if key is not None else contextlib.nullcontext()


def _kept_call(output: mx.array, inputs: list[mx.array],
               gradient: Callable[[tuple, mx.array], list[mx.array]]) -> mx.array:
    """`output` as a function of `inputs` whose VJP is `gradient(inputs, cotangent)`."""

    @mx.custom_function
    def kept(*arrays: mx.array) -> mx.array:
        return output

    @kept.vjp
    def kept_vjp(primals: tuple | mx.array, cotangent: mx.array, _: mx.array) -> list[mx.array]:
        # MLX passes a custom function of one input its primal alone, not in a tuple
        return gradient(primals if isinstance(primals, tuple) else (primals,), cotangent)

    return kept(*inputs)


def replayed_projection(cls: type) -> type:
    """`cls` (a projection: Linear, a quantized one, a LoRA / DoRA layer) whose call, under a
    mixer's tape, keeps its output (the forward) or gives the kept one back with its VJP (the
    recompute)."""
    if cls in _REPLAYED.values():
        return cls
    if cls not in _REPLAYED:
        def __call__(self, x: mx.array) -> mx.array:
            tape = _tape()
            if tape is None:
                return cls.__call__(self, x)
            key = kernels.next_key() if _dropping(self) else None
            if not tape.replaying:
                with _drawing(key):
                    y = cls.__call__(self, x)
                tape.record(y, key)
                return y
            y, key = tape.next()
            if y is None:  # the mixer's output: its value is never read again
                with _drawing(key):
                    return cls.__call__(self, x)
            names = [name for name, _ in tree_flatten(self.trainable_parameters())]
            values = [value for _, value in tree_flatten(self.trainable_parameters())]

            def gradient(primals: tuple, cotangent: mx.array) -> list[mx.array]:
                def call(x: mx.array, *params: mx.array) -> mx.array:
                    self.update(tree_unflatten(list(zip(names, params))))
                    return cls.__call__(self, x)

                before = self.trainable_parameters()
                try:
                    with _drawing(key):
                        return mx.vjp(call, list(primals), [cotangent])[1]
                finally:
                    self.update(before)

            return _kept_call(y, [x, *values], gradient)

        _REPLAYED[cls] = type(f"Replayed{cls.__name__}", (cls,), {"__call__": __call__})
    return _REPLAYED[cls]


def _projection(module: nn.Module) -> bool:
    """A Linear, a quantized one, or an adapter over one (LoRA, DoRA: its `linear`)."""
    linear = nn.Linear | nn.QuantizedLinear
    return isinstance(module, linear) or isinstance(module.get("linear"), linear)


def replay_projections(mixer: nn.Module) -> int:
    """Make each outermost projection of `mixer` one its tape keeps; returns how many."""
    found: list[str] = []
    for name, module in sorted(mixer.named_modules(), key=lambda m: m[0].count(".")):
        if name and _projection(module) and not any(name.startswith(f"{f}.") for f in found):
            found.append(name)
            module.__class__ = replayed_projection(type(module))
    return len(found)


def gated_delta(*arrays: mx.array | None, delta: bool = True) -> tuple[mx.array, ...] | None:
    """kernels.gated_delta(q, k, v, log_g, beta, state, keep, delta=delta), under a mixer's tape
    kept (the forward: its output, final state and the states its backward needs) or given back
    with its backward (the recompute: kernels.gated_delta_grad from the kept states)."""
    tape = _tape()
    if tape is None:
        return kernels.gated_delta(*arrays, delta=delta)
    if not tape.replaying:
        out = kernels.gated_delta(*arrays, delta=delta, with_kept=True, span=KEPT_SPAN)
        tape.record(*(out or [None]))  # None: the caller computed the rule its own way
        return None if out is None else out[:2]
    entry = tape.next()
    if entry[0] is None:
        return None
    y, state, kept = entry

    @mx.custom_function
    def rule(*primals: mx.array) -> tuple[mx.array, mx.array]:
        return y, state

    @rule.vjp
    def rule_vjp(primals: tuple, cotangents: tuple, _: tuple) -> list[mx.array]:
        grads = kernels.gated_delta_grad(list(primals), kept, *cotangents, delta=delta,
                                         span=KEPT_SPAN)
        return [*grads, *(mx.zeros_like(p) for p in primals[6:])]

    return rule(*(a for a in arrays if a is not None))
