"""Packed rows for the layers that carry something along the sequence besides attention: a
hybrid's short convolutions and its gated-delta or Mamba-2 rules.

A packed batch holds several examples in each sequence (`segment_ids`, data.pack=true;
models/decoders/packing.py keeps them apart in attention by its mask). A convolution over the
last K tokens, or a rule whose state runs from the first token to the last, would carry one
example into the next. Within `rows(segment_ids)` each example starts as it would start a
sequence of its own:

- a routed convolution (kernels.depthwise_conv1d with `positions`) reads no token before its
  example's first, as a sequence reads its left padding of zeros;
- a rule's log gate at an example's first token is RESET, whose exp is 0 in float32: the state
  that token multiplies is dropped, exactly as the zero state a sequence starts from, and the
  gate's gradient there is 0, as it is at a sequence's first token (which multiplies zeros).

Each rule and convolution that did so is counted (`kept_apart`), so the packed pass can tell a
model whose every sequence mixer kept its examples apart from one whose layers mix them some
other way.

Gradient checkpointing's recompute runs after the pass has left `rows`; it takes the rows its
forward saw (grad_checkpoint.checkpoint).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

# a log gate whose exp is 0, and whose sums with the other log gates of a chunk stay finite
# (the chunked rule sums them; -inf would give inf - inf in their gradients)
RESET = -1e30


class _Rows(threading.local):
    positions: mx.array | None = None  # (B, T) each token's place in its example, or None
    rules: int = 0                     # rules that reset their state at each example's start
    convolutions: int = 0              # convolutions that read no earlier example


_ACTIVE = _Rows()


def positions_in_rows(segment_ids: mx.array) -> mx.array:
    """(B, T) segment ids -> each position's index inside its own segment (0 at every segment's
    first token), int32."""
    t = segment_ids.shape[1]
    index = mx.broadcast_to(mx.arange(t, dtype=mx.int32), segment_ids.shape)
    first = mx.concatenate([mx.ones_like(segment_ids[:, :1], dtype=mx.bool_),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = mx.cummax(mx.where(first, index, 0), axis=1)
    return index - start


def current() -> mx.array | None:
    """The positions of the packed pass under way (positions_in_rows), or None."""
    return _ACTIVE.positions


@contextmanager
def rows(segment_ids: mx.array | None = None, positions: mx.array | None = None
         ) -> Iterator[None]:
    """Within it the routed convolutions and rules keep the examples of `segment_ids` (or of
    `positions`, what current() returned) apart; None: an unpacked pass."""
    saved = _ACTIVE.positions
    _ACTIVE.positions = positions_in_rows(segment_ids) if segment_ids is not None else positions
    try:
        yield
    finally:
        _ACTIVE.positions = saved


def positions_for(length: int) -> mx.array | None:
    """The packed pass's positions where a layer's sequence is `length` tokens long (its own
    sequence: not a cached generation step's), else None."""
    positions = _ACTIVE.positions
    return positions if positions is not None and positions.shape[1] == length else None


def reset_log_gate(log_g: mx.array) -> mx.array:
    """A rule's log gate (B, T, H) or (B, T, H, Dk) with RESET at each example's first token in a
    packed pass; `log_g` itself outside one. The rule that runs on it calls rule_reset."""
    positions = positions_for(log_g.shape[1])
    if positions is None:
        return log_g
    starts = (positions == 0).reshape(*positions.shape, *(1,) * (log_g.ndim - 2))
    # float32, as the rules compute: RESET is -inf in float16
    return mx.where(starts, mx.array(RESET, mx.float32), log_g.astype(mx.float32))


def rule_reset(log_g: mx.array) -> None:
    """Counts a rule that ran on reset_log_gate(log_g)'s gate, in a packed pass."""
    if positions_for(log_g.shape[1]) is not None:
        _ACTIVE.rules += 1


def convolution_kept() -> None:
    """Counts a convolution that ran on positions_for's positions, in a packed pass."""
    if _ACTIVE.positions is not None:
        _ACTIVE.convolutions += 1


def kept_apart(clear: bool = False) -> tuple[int, int]:
    """(rules that reset their state at the examples' starts, convolutions that read no earlier
    example) since the counts were cleared."""
    counts = _ACTIVE.rules, _ACTIVE.convolutions
    if clear:
        _ACTIVE.rules = _ACTIVE.convolutions = 0
    return counts
