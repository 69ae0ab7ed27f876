"""A chunk's gate ratios for the chunked gated delta rule (models/layers/gated_delta.py): the decay
Gamma_t / Gamma_s = exp(lg_(s+1) + ... + lg_t) between every pair of steps s <= t of a chunk, and
the pair products (x_t * Gamma_t / Gamma_s) . k_s the rule builds from it.

Each exponent is summed from its own terms (a cumulative sum down a masked copy, Mamba-2's
segment sum), never as gamma_t - gamma_s: that difference of two large cumulative sums loses
float32 digits where the gate decays fast, and its gradient cancels them again.

A chunk of C steps has C^2 / 2 such ratios (C^2 Dk for a gate per key channel, KDA), and an exp
costs some 30 multiplies on the CPU (MLX's is scalar there): the ratios were a fifth of the
rule's time with a scalar gate, most of it with KDA's. Where C is a multiple of BLOCK (> BLOCK),
the chunk is cut into blocks of BLOCK steps and a ratio across blocks is a product of exps of
sums of its own terms, each at most 1 (so none overflows, and one that underflows leaves a
product below float32's range anyway):

    Gamma_t / Gamma_s = exp(lg_(s+1) + ... + lg_e) * exp(sum of the whole blocks between)
                        * exp(lg_(f+1) + ... + lg_t),

e the last step of s's block, f the last before t's block: 2C + (C/BLOCK)^2 exps across blocks
and C * BLOCK within them, in place of C^2 (a sixth at C = 64). For KDA the product also splits
the pair products across blocks into matrix products, (x_t Gamma_t / Gamma_e) .
(k_s Gamma_e / Gamma_s), so no (C, C, Dk) tensor is formed outside the diagonal blocks.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

BLOCK = 8  # C + C^2/B + C*B exps is least at B = sqrt(C): 8 for flash-linear-attention's C = 64


@cache
def masks(size: int) -> tuple[mx.array, mx.array]:
    """(later, causal): j > s and t >= s over a chunk's steps, (size, size) bool. Built once per
    size from numpy (a constant even when first asked inside mx.compile's trace): a chunk's
    rule is a few dozen ops, and building its masks anew each time was a fifth of them."""
    steps = np.arange(size)
    return mx.array(steps[:, None] > steps[None, :]), mx.array(steps[:, None] >= steps[None, :])


@cache
def _block_masks(size: int) -> tuple[mx.array, mx.array]:
    """For C = size in blocks of BLOCK: the diagonal blocks' places (block, 1, block, 1); t's
    block after s's (C, C)."""
    block = np.arange(size) // BLOCK
    return (mx.array(np.eye(size // BLOCK, dtype=bool)[:, None, :, None]),
            mx.array(block[:, None] > block[None, :]))


def pair_decay(lg: mx.array, vectorized: bool) -> mx.array:
    """Every ratio as one exp of its segment sum: (..., C, C) for lg (..., C), or (..., C, C, Dk)
    for a per-channel gate (..., C, Dk); 0 above the diagonal."""
    size = lg.shape[-2] if vectorized else lg.shape[-1]
    later, causal = masks(size)  # later (j, s): j > s
    if vectorized:
        later, causal = later[:, :, None], causal[:, :, None]
        terms = mx.where(later, lg[..., :, None, :], 0.0)
        return mx.where(causal, mx.exp(mx.cumsum(terms, axis=-3)), 0.0)
    terms = mx.where(later, lg[..., :, None], 0.0)
    return mx.where(causal, mx.exp(mx.cumsum(terms, axis=-2)), 0.0)


def _blocked(size: int) -> bool:
    return size > BLOCK and size % BLOCK == 0


def _from_ends(blocks: mx.array) -> mx.array:
    """Gamma_t / Gamma_e (..., C/B, C, D) from each block's end e to every step t of a later
    block, for blocks (..., C/B, B, D): the whole blocks between (one exp per pair of blocks, of
    the sum of their sums) times t's block up to t (one exp per step), C + (C/B)^2 exps where
    one per (block, step) would be C^2 / B; 0 where t's block is not later (never used)."""
    count, size = blocks.shape[-3], blocks.shape[-3] * blocks.shape[-2]
    head = mx.exp(mx.cumsum(blocks, axis=-2))  # (block b, j): t's block from its start to t
    between = pair_decay(blocks.sum(-2), True)  # (i, a): blocks a+1 .. i, 0 for i < a
    # t in block b crosses blocks a+1 .. b-1 (row b-1); the first block crosses none
    between = mx.concatenate([mx.zeros_like(between[..., :1, :, :]), between[..., :-1, :, :]],
                             axis=-3)
    ratios = between[..., :, None, :, :] * head[..., :, :, None, :]  # (b, j, a, D)
    ratios = ratios.reshape(*blocks.shape[:-3], size, count, blocks.shape[-1])
    return mx.moveaxis(ratios, -2, -3)


def _parts(lg: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """The factors for lg (..., C, D) (D = Dk, or 1 for a scalar gate): the ratios inside each
    block (..., C/B, B, B, D); Gamma_e / Gamma_s from each step to its block's end (..., C, D);
    Gamma_t / Gamma_e from each block's end e to every step t of a later block (_from_ends)."""
    count = lg.shape[-2] // BLOCK
    blocks = lg.reshape(*lg.shape[:-2], count, BLOCK, lg.shape[-1])
    inside = pair_decay(blocks, True)
    to_end = mx.exp(mx.cumsum(blocks, axis=-2, reverse=True, inclusive=False)).reshape(lg.shape)
    return inside, to_end, _from_ends(blocks)


def _assemble(inside: mx.array, across: mx.array) -> mx.array:
    """(..., C, C) from the diagonal blocks (..., C/B, B, B) and `across` (..., C, C), whose
    entries below the diagonal blocks are kept; 0 above them."""
    diagonal, below = _block_masks(across.shape[-1])
    embedded = mx.where(diagonal, inside[..., :, :, None, :], 0.0).reshape(across.shape)
    return mx.where(below, across, embedded)


def decay(lg: mx.array, vectorized: bool) -> mx.array | tuple[mx.array, ...]:
    """What `pairs` takes for the chunk's log gate lg (..., C) or (..., C, Dk): for a scalar gate
    the ratios (..., C, C); for a per-channel gate the ratios (..., C, C, Dk), or across blocks
    their factors (_parts)."""
    size = lg.shape[-2] if vectorized else lg.shape[-1]
    if not _blocked(size):
        return pair_decay(lg, vectorized)
    if vectorized:
        return _parts(lg)
    inside, to_end, from_end = _parts(lg[..., None])
    count = size // BLOCK
    # across[t, s] = Gamma_t / Gamma_e(s) * Gamma_e(s) / Gamma_s
    across = from_end[..., :, None, :, 0] * to_end[..., 0].reshape(*lg.shape[:-1], count,
                                                                    BLOCK, 1)
    across = across.reshape(*lg.shape, size).swapaxes(-1, -2)
    return _assemble(inside[..., 0], across)


def pairs(x: mx.array, k: mx.array, decay: mx.array | tuple[mx.array, ...],
          vectorized: bool) -> mx.array:
    """(x_t * Gamma_t / Gamma_s) . k_s for s <= t, 0 above: (..., C, C) for x, k (..., C, Dk)."""
    if not vectorized:
        return (x @ k.swapaxes(-1, -2)) * decay
    if not isinstance(decay, tuple):
        return (x[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
    inside, to_end, from_end = decay
    size, count = x.shape[-2], inside.shape[-4]
    x_blocks = x.reshape(*x.shape[:-2], count, BLOCK, x.shape[-1])
    k_blocks = k.reshape(x_blocks.shape)
    within = (x_blocks[..., :, :, None, :] * k_blocks[..., :, None, :, :] * inside).sum(-1)
    # across[t, s] = (x_t Gamma_t / Gamma_e) . (k_s Gamma_e / Gamma_s), one product per block
    k_to_end = (k * to_end).reshape(x_blocks.shape)
    across = (x[..., None, :, :] * from_end) @ k_to_end.swapaxes(-1, -2)  # (.., block, t, s)
    across = mx.moveaxis(across, -3, -2).reshape(*x.shape[:-2], size, size)
    return _assemble(within, across)
