"""Rotary position embeddings with the scaling variants of the Llama family.

`rope_scaling` is a Hugging Face config's dict: None / "default" (plain RoPE), "linear"
(positions divided by `factor`) and "llama3" (Llama 3.1's per-frequency smoothing). Other
types (yarn, dynamic, longrope, ...) change more than the frequencies and are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError

SUPPORTED = ("default", "linear", "llama3")


class Llama3RoPE(nn.Module):
    """RoPE with Llama 3.1's frequencies: long wavelengths slowed by `factor`, short ones kept,
    the band between interpolated (transformers' _compute_llama3_parameters)."""

    def __init__(self, dims: int, base: float, scaling: Mapping):
        super().__init__()
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        context = float(scaling.get("original_max_position_embeddings", 8192))
        self.dims = dims
        # mx.fast.rope takes periods (1 / inverse frequency) in `freqs`
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        wavelens = 2 * math.pi * periods
        periods = mx.where(wavelens > context / low, periods * factor, periods)
        medium = (wavelens > context / high) & (wavelens < context / low)
        smooth = (context / wavelens - low) / (high - low)
        smoothed = periods / ((1 - smooth) / factor + smooth)
        self._periods = mx.where(medium, smoothed, periods)  # "_": not a parameter

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
            freqs=self._periods,
        )


def rope_type(scaling: Mapping | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def check_rope_scaling(scaling: Mapping | None) -> None:
    kind = rope_type(scaling)
    if kind not in SUPPORTED:
        raise ConfigError(
            f"rope_scaling type {kind!r} is not supported; mlxlab implements {list(SUPPORTED)} "
            "(a checkpoint with another type cannot be loaded exactly)"
        )


def make_rope(dims: int, base: float, scaling: Mapping | None = None) -> nn.Module:
    """The rotary embedding for `dims` head dimensions (Llama's rotate-half layout)."""
    check_rope_scaling(scaling)
    kind = rope_type(scaling)
    if kind == "llama3":
        return Llama3RoPE(dims, base, scaling)
    scale = 1.0 / float(scaling["factor"]) if kind == "linear" else 1.0
    return nn.RoPE(dims, traditional=False, base=base, scale=scale)
