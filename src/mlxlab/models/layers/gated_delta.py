"""The gated delta rule with its own backward: what a gated-delta layer (Qwen3-Next, Qwen3.5/3.6,
Kimi-Linear's KDA, OLMo-Hybrid) trains through. On the CPU (float32, the kernels on) that is
kernels.gated_delta, the recurrence token by token in C++ (csrc/gated_delta.cpp: each row of a
head's state is a recurrence of its own, walked four rows at a time, the backward recomputing
states from one kept every 64 tokens); at 2,048 tokens it took half the chunked form's time.
Elsewhere (a GPU, the op skipped, the kernels off) the chunked form below.

The recurrence (mlx-lm's `gated_delta_ops`, one token at a time on a (Dv, Dk) state per head):

    S <- S * g_t                       (g_t a scalar per head, or one per key channel: KDA)
    d_t = beta_t * (v_t - S k_t)
    S <- S + d_t k_t^T,   y_t = S q_t

Autograd through that loop keeps every step's state: one layer's backward grows with T * Dv * Dk
and a 2,048-token step of a small hybrid passes 19 GB. Here the sequence is cut into chunks of
`chunk_size` tokens (flash-linear-attention's chunkwise form, the WY/UT transform): within a
chunk every delta solves one unit lower-triangular system at once,

    (I + A) D = beta * (V - (Gamma * K) S0^T),   A_ts = beta_t (k_t . k_s) Gamma_t / Gamma_s, s < t

(Gamma the gate's product from the chunk's start; per key channel for KDA), outputs and the next
chunk's state are matrix products of D, and only the states between chunks are carried. The
backward (mx.custom_function) recomputes the states between spans of chunks, then walks the
spans from the last, differentiating one span at a time: the memory it keeps is those states
plus one span's intermediates, never a state per token.

A span is one chunk, except for a scalar gate without a mask (what a layer trains through) over
a batch of few heads, whose chunks are batched in groups (_chunks): most of a chunk's work does
not need the carried state, and is done for the group's chunks at once as batched ops over a
(B, H, N, C, ...) view (_chunk_terms: the gate ratios, A, (I + A)^-1, flash-linear-attention's
WY form W = (I + A)^-1 (beta * Gamma * K) and U = (I + A)^-1 (beta * V), so that
D = U - W S0^T); only the recurrence, two products a chunk, walks the chunks. A group holds at
most GROUP_MATRICES C x C matrices (batch x head x chunk), and is at least 2 chunks: with few
heads the cost is mostly one dispatch per op and the group saves it; with 8 or more it is the
products and exps, and the chunks go one at a time. Its last span is padded to whole chunks
with steps of gate 1 and beta 0 (they neither decay nor write the state), whose outputs are
dropped.

(I + A)^-1 is LAPACK's triangular inverse on the CPU, with the inverse's own derivative as its
backward (_lapack_inverse); elsewhere (a GPU stream has no triangular inverse) log2(C)
squarings of matrix products. Gate ratios Gamma_t / Gamma_s come from gate_decay.py: exps of
the log gate's terms between s and t, summed as they are, never a quotient (a KDA channel's
decay underflows float32 within a chunk) nor a difference of cumulative sums (it loses digits,
and the gate's gradient with them, where the gate decays fast); across blocks of 8 steps a
product of such exps, which for KDA also turns the pair products into matrix products.

Masks follow `gated_delta_ops` exactly: a masked position leaves the state as it was, and its
output is still what the step would have read (y_t = q_t of the step's updated state), not zero.
Everything runs in float32 (the state's dtype); outputs come back in q's dtype.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.models.layers import gate_decay, packed_rows, replay

CHUNK_SIZE = 64  # flash-linear-attention's chunk; the triangular solve is C x C per head
# a scalar gate's rule batches chunks up to this many (batch x head x chunk) C x C matrices at
# once. With a batch of few heads the cost is mostly one dispatch per op, which a group saves
# (2 heads: a quarter of the time), at a price: a group of 2 or more raises a whole layer's
# forward + backward peak at 4,096 tokens by a sixth (MLX schedules the weights' gradients
# otherwise). From 8 heads on the products and exps cost most, a group is no faster, and the
# chunks go one at a time. 0: never group.
GROUP_MATRICES = 8


@cache
def _identity(size: int) -> mx.array:
    """I (size, size) float32, built once from numpy (as gate_decay.masks)."""
    return mx.array(np.eye(size, dtype=np.float32))


def _unit_lower_inverse(a: mx.array) -> mx.array:
    """(I + a)^-1 for a strictly lower triangular (..., C, C): with n = -a nilpotent the inverse
    is I + n + ... + n^(C-1) = (I + n)(I + n^2)(I + n^4)..., log2(C) squarings: matrix products
    only, which every stream runs and autograd differentiates."""
    size = a.shape[-1]
    power = -a
    inverse = _identity(size) + power
    reach = 2
    while reach < size:
        power = power @ power
        inverse = inverse + inverse @ power
        reach *= 2
    return inverse


@mx.custom_function
def _lapack_inverse(a: mx.array) -> mx.array:
    """(I + a)^-1 for a strictly lower triangular (..., C, C) by LAPACK's triangular inverse
    (C^3 / 3 multiply-adds, against the squarings' 2 log2(C) products of C^3), with the
    inverse's own derivative as its backward: d(I + a)^-1 = -(I + a)^-1 da (I + a)^-1."""
    return mx.linalg.tri_inv(_identity(a.shape[-1]) + a, upper=False, stream=mx.cpu)


@_lapack_inverse.vjp
def _lapack_inverse_vjp(primals: tuple, cotangent: mx.array, inverse: mx.array) -> mx.array:
    inverse_t = inverse.swapaxes(-1, -2)
    return -(inverse_t @ cotangent @ inverse_t)


def _inverse(a: mx.array) -> mx.array:
    """(I + a)^-1, a strictly lower triangular: LAPACK's on the CPU, where MLX has it; the
    squarings (matrix products only) on a GPU, whose stream has no triangular inverse."""
    if mx.default_device() == mx.cpu:
        return _lapack_inverse(a)
    return _unit_lower_inverse(a)


def _chunk(q: mx.array, k: mx.array, v: mx.array, lg: mx.array, beta: mx.array, s0: mx.array,
           keep: mx.array | None) -> tuple[mx.array, mx.array]:
    """One chunk of the rule: q, k (B, H, C, Dk), v (B, H, C, Dv), lg the log gate (B, H, C) or
    (B, H, C, Dk), beta (B, H, C), s0 (B, H, Dv, Dk), keep (B, 1, C) 1/0 or None; returns the
    outputs (B, H, C, Dv) and the state after the chunk."""
    vectorized = lg.ndim == 4
    if keep is not None:  # a masked step neither decays nor writes the carried state
        lg_run = lg * (keep[..., None] if vectorized else keep)
        beta_run = beta * keep
    else:
        lg_run, beta_run = lg, beta
    gamma = mx.cumsum(lg_run, axis=2)  # log Gamma_t
    decay = gate_decay.decay(lg_run, vectorized)
    scale = mx.exp(gamma) if vectorized else mx.exp(gamma)[..., None]
    strict = gate_decay.masks(lg.shape[2])[0]  # s < t
    a = mx.where(strict, beta_run[..., None] * gate_decay.pairs(k, k, decay, vectorized), 0.0)
    s0_t = s0.swapaxes(-1, -2)  # (B, H, Dk, Dv)
    rhs = beta_run[..., None] * (v - (k * scale) @ s0_t)
    delta = _inverse(a) @ rhs  # (B, H, C, Dv): each step's write d_t

    def read(x: mx.array) -> mx.array:  # S_t x_t for every t of the chunk
        return (x * scale) @ s0_t + gate_decay.pairs(x, k, decay, vectorized) @ delta

    if keep is None:
        y = read(q)
    else:  # a masked step reads the state it would have written: S' = g S + d k^T from S
        g = mx.exp(lg) if vectorized else mx.exp(lg)[..., None]
        kept = keep[..., None] > 0
        y_q = read(mx.where(kept, q, g * q))
        y_k = read(g * k)
        step = (q * k).sum(-1, keepdims=True) * beta[..., None] * (v - y_k)
        y = mx.where(kept, y_q, y_q + step)
    # Gamma_C / Gamma_t: the gate's terms after t, summed as they are (not gamma_C - gamma_t)
    after = mx.exp(mx.cumsum(lg_run, axis=2, reverse=True, inclusive=False))
    to_end = after if vectorized else after[..., None]
    whole = mx.exp(gamma[:, :, -1:])
    whole = whole if vectorized else whole[..., None]  # (B, H, 1, Dk | 1)
    s1 = s0 * whole + delta.swapaxes(-1, -2) @ (k * to_end)
    return y, s1


def _chunk_terms(q: mx.array, k: mx.array, v: mx.array, lg: mx.array,
                 beta: mx.array) -> tuple[mx.array, ...]:
    """What the chunks of a scalar gate compute without the state, all chunks at once: q, k
    (B, H, N, C, Dk), v (B, H, N, C, Dv), lg, beta (B, H, N, C). Returns the WY form's
    W = (I + A)^-1 (beta * Gamma * K) and U = (I + A)^-1 (beta * V) (each write is
    U - W S0^T), the reads' parts (Gamma * Q and the pairs (q_t . k_s) Gamma_t / Gamma_s,
    s <= t), K scaled by each step's decay to the chunk's end, and the chunk's whole decay."""
    gamma = mx.cumsum(lg, axis=-1)  # log Gamma_t
    decay = gate_decay.decay(lg, False)
    scale = mx.exp(gamma)[..., None]
    strict = gate_decay.masks(lg.shape[-1])[0]  # s < t
    a = mx.where(strict, beta[..., None] * gate_decay.pairs(k, k, decay, False), 0.0)
    inverse = _inverse(a)
    w = inverse @ (beta[..., None] * k * scale)
    u = inverse @ (beta[..., None] * v)
    # Gamma_C / Gamma_t: the gate's terms after t, summed as they are (not gamma_C - gamma_t)
    to_end = mx.exp(mx.cumsum(lg, axis=-1, reverse=True, inclusive=False))[..., None]
    whole = mx.exp(gamma[..., -1:])[..., None]  # (B, H, N, 1, 1)
    return q * scale, gate_decay.pairs(q, k, decay, False), w, u, k * to_end, whole


def _chunks(q: mx.array, k: mx.array, v: mx.array, lg: mx.array, beta: mx.array, s0: mx.array,
            size: int) -> tuple[mx.array, mx.array]:
    """_chunk for a scalar gate and no mask over any length, its chunks of `size` batched:
    everything that does not need the state is computed for all of them at once
    (_chunk_terms), and only the recurrence, two products a chunk, walks them:
    D_n = U_n - W_n S_n^T, S_(n+1) = S_n Gamma_C + D_n^T (K Gamma_C / Gamma)_n. The reads of
    every chunk, Q Gamma S_n^T + pairs D_n, are two batched products after it."""
    b, h, length = q.shape[:3]
    count = -(-length // size)
    # whole chunks: a padded step has gate 1 and beta 0 (no decay, no write) and its output is
    # dropped, so the state and every real output and gradient are the unpadded ones. Padded
    # here, in the span, not before the rule: the rule's inputs stay alive until its backward
    extra = count * size - length

    def split(x: mx.array) -> mx.array:  # (B, H, T, ...) -> (B, H, N, C, ...)
        x = mx.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3)) if extra else x
        return x.reshape(b, h, count, size, *x.shape[3:])

    q_scaled, pairs, w, u, k_to_end, whole = _chunk_terms(*map(split, (q, k, v, lg, beta)))
    deltas, states, state = [], [], s0
    for n in range(count):
        states.append(state.swapaxes(-1, -2))  # S_n^T (B, H, Dk, Dv)
        delta = mx.addmm(u[:, :, n], w[:, :, n], states[-1], alpha=-1.0)
        deltas.append(delta)
        state = mx.addmm(state * whole[:, :, n], delta.swapaxes(-1, -2), k_to_end[:, :, n])
    y = q_scaled @ mx.stack(states, axis=2) + pairs @ mx.stack(deltas, axis=2)
    return y.reshape(b, h, count * size, -1)[:, :, :length], state


def _spans(length: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, length)) for i in range(0, length, size)]


def _cut(arrays: list[mx.array], span: tuple[int, int],
         after: mx.array | list[mx.array]) -> list[mx.array]:
    """The span `span` of each array, computed only once `after` is: a span's gate ratios and
    key products do not depend on the state, and MLX would otherwise compute many spans' at
    once (all their intermediates alive together)."""
    return mx.depends([x[:, :, span[0]:span[1]] for x in arrays], after) if arrays else []


def _chunk_of(masked: bool):
    """_chunk over (q, k, v, lg, beta, s0[, keep]) as one argument list."""
    if masked:
        return lambda q, k, v, lg, beta, s0, keep: _chunk(q, k, v, lg, beta, s0, keep)
    return lambda q, k, v, lg, beta, s0: _chunk(q, k, v, lg, beta, s0, None)


def _group_chunks(batch: int, heads: int) -> int:
    """How many chunks a span of the batched rule holds (GROUP_MATRICES); 0: one at a time, in
    the per-chunk form (_chunk)."""
    count = GROUP_MATRICES // (batch * heads)
    return count if count > 1 else 0


@cache
def _rule(chunk_size: int, masked: bool, batched: int):
    """The chunked rule over head-major float32 arrays, (y, final state), as an
    mx.custom_function whose backward keeps only the states between spans. A span is one chunk
    (_chunk), or with `batched` (a scalar gate, no mask) that many chunks at once (_chunks):
    the backward holds one span's intermediates."""
    if batched:
        span_size = chunk_size * batched

        def step(*arrays: mx.array) -> tuple[mx.array, mx.array]:
            return _chunks(*arrays, chunk_size)
    else:
        span_size, step = chunk_size, _chunk_of(masked)

    @mx.custom_function
    def rule(*arrays: mx.array) -> tuple[mx.array, mx.array]:
        seq, s0, keep = list(arrays[:5]), arrays[5], list(arrays[6:])
        outputs, state = [], s0
        for span in _spans(seq[0].shape[2], span_size):
            y, state = step(*_cut(seq, span, state), state, *_cut(keep, span, state))
            outputs.append(y)
        return mx.concatenate(outputs, axis=2), state

    @rule.vjp
    def rule_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple:
        seq, s0, keep = list(primals[:5]), primals[5], list(primals[6:])
        dy, d_state = cotangents
        spans = _spans(seq[0].shape[2], span_size)
        states = [s0]  # the state entering each span, recomputed
        for span in spans[:-1]:
            state = states[-1]
            states.append(step(*_cut(seq, span, state), state, *_cut(keep, span, state))[1])
        grads: list[list[mx.array]] = [[] for _ in seq]
        done = [d_state]  # what a span's backward waits for: all of the later span's
        for span, state in zip(reversed(spans), reversed(states)):
            kept = _cut(keep, span, done)
            _, back = mx.vjp(lambda *xs, kept=kept: step(*xs, *kept),
                             [*_cut(seq, span, done), state],
                             [dy[:, :, span[0]:span[1]], d_state])
            for acc, g in zip(grads, back[:5]):
                acc.append(g)
            d_state, done = back[5], list(back)
        seq_grads = [mx.concatenate(acc[::-1], axis=2) for acc in grads]
        return (*seq_grads, d_state, *[mx.zeros_like(x) for x in keep])

    return rule


def gated_delta_chunked(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array,
                        state: mx.array | None = None, mask: mx.array | None = None,
                        chunk_size: int = CHUNK_SIZE) -> tuple[mx.array, mx.array]:
    """mlx-lm's `gated_delta_ops(q, k, v, g, beta, state, mask)` in chunks: q, k (B, T, Hk, Dk),
    v (B, T, Hv, Dv), g (B, T, Hv) or (B, T, Hv, Dk) in (0, 1], beta (B, T, Hv), state
    (B, Hv, Dv, Dk), mask (B, T) bool; returns y (B, T, Hv, Dv) in q's dtype and the state."""
    return chunked_rule(q, k, v, mx.log(g.astype(mx.float32)), beta, state, mask, chunk_size)


def chunked_rule(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array,
                 state: mx.array | None = None, mask: mx.array | None = None,
                 chunk_size: int = CHUNK_SIZE) -> tuple[mx.array, mx.array]:
    """gated_delta_chunked with the gate as its logarithm (what the layers compute first)."""
    batch, _, hk, dk = q.shape
    hv, dv = v.shape[-2:]
    log_g = packed_rows.reset_log_gate(log_g)  # a packed pass: each example from a zero state
    packed_rows.rule_reset(log_g)
    if state is None:
        state = mx.zeros((batch, hv, dv, dk), dtype=mx.float32)
    keep = None if mask is None else mask.astype(mx.float32)
    fused = replay.gated_delta(*(x.astype(mx.float32) for x in (q, k, v, log_g, beta, state)),
                               keep)
    if fused is not None:  # the CPU: token by token, four rows of a head's state at a time
        return fused[0].astype(q.dtype), fused[1]
    if (repeat := hv // hk) > 1:
        q = mx.repeat(q, repeat, -2)
        k = mx.repeat(k, repeat, -2)

    def heads(x: mx.array) -> mx.array:  # (B, T, H, ...) -> (B, H, T, ...), float32
        return mx.moveaxis(x.astype(mx.float32), 2, 1)

    arrays = [heads(q), heads(k), heads(v), heads(log_g), heads(beta), state.astype(mx.float32)]
    if mask is not None:
        arrays.append(mask.astype(mx.float32)[:, None, :])
    batched = _group_chunks(batch, hv) if mask is None and log_g.ndim == 3 else 0
    y, final = _rule(chunk_size, mask is not None, batched)(*arrays)
    return mx.moveaxis(y, 1, 2).astype(q.dtype), final


def log_gate(A_log: mx.array, a: mx.array, dt_bias: mx.array,  # noqa: N803
             lower_bound: float | None = None) -> mx.array:
    """log of mlx-lm's gate: compute_g's exp(-exp(A_log) * softplus(a + dt_bias)), or with
    `lower_bound` compute_lower_bound_g's exp(lower_bound * sigmoid(exp(A_log) * (a + dt_bias)));
    without the exp/log round trip (a gate that underflows to 0 keeps a finite logarithm)."""
    rate = mx.exp(A_log.astype(mx.float32))
    if lower_bound is None:
        return -rate * nn.softplus(a + dt_bias)
    return lower_bound * mx.sigmoid(rate * (a.astype(mx.float32) + dt_bias))


def chunked_gated_delta_update(q: mx.array, k: mx.array, v: mx.array, a: mx.array, b: mx.array,
                               A_log: mx.array, dt_bias: mx.array,  # noqa: N803
                               state: mx.array | None = None, mask: mx.array | None = None, *,
                               use_kernel: bool = True, lower_bound: float | None = None,
                               allow_neg_eigval: bool = False) -> tuple[mx.array, mx.array]:
    """mlx-lm's `gated_delta_update` (the same arguments and results: beta = sigmoid(b), doubled
    with `allow_neg_eigval`; the gate from A_log, a, dt_bias and `lower_bound`) through the
    chunked rule; `use_kernel` is accepted for the common call (the rule has no Metal kernel)."""
    beta = mx.sigmoid(b) * 2.0 if allow_neg_eigval else mx.sigmoid(b)
    return chunked_rule(q, k, v, log_gate(A_log, a, dt_bias, lower_bound), beta, state, mask)
