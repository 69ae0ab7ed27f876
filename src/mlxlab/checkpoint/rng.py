"""The global MLX PRNG key as JSON, and back, bit for bit."""

from __future__ import annotations

import mlx.core as mx


def rng_state() -> list[int]:
    """The global MLX PRNG key as two plain ints (JSON-able)."""
    return [int(x) for x in mx.random.state[0].tolist()]


def set_rng_state(key: list[int]) -> None:
    """Restore a key from `rng_state()`.

    `mx.random.state` cannot be assigned to, but `mx.random.seed(s)` sets the key to
    `[s >> 32, s & 0xFFFFFFFF]`, which restores any key exactly (checked below).
    """
    if len(key) != 2:
        raise ValueError(f"RNG state must be two uint32 ints from rng_state(), got {key!r}")
    hi, lo = (int(x) for x in key)
    mx.random.seed((hi << 32) | lo)
    if rng_state() != [hi, lo]:
        raise RuntimeError(f"could not restore MLX RNG key {key}: mx.random.seed changed meaning")
