"""mlx-lm's gated-delta layers train through the chunked rule (models/layers/gated_delta.py).

mlx-lm's Qwen3-Next, Qwen3.5/3.6, Kimi-Linear, OLMo-Hybrid and Bailing-MoE-V3 (Ling) layers call their module's
`gated_delta_update(..., use_kernel=not self.training)`; without Metal, and always in training,
that is `gated_delta_ops`, autograd through a Python loop over tokens that keeps a (Dv, Dk) state
per head per token (a small hybrid's 2,048-token step passes 19 GB). The name is replaced here,
in the one place mlxlab loads an mlx-lm model (models/decoders/mlx_lm_decoder.py), by a wrapper that takes
the training calls (use_kernel False) to the chunked rule, whose backward keeps only the chunk
boundaries' states, and hands every other call (generation, evaluation, Metal's kernel) to
mlx-lm's own function. The chunked rule equals the loop to float32 rounding, outputs, final
state and gradients (tests/test_gated_delta.py); `gated_delta_ops` stays the reference.

The wrapper replaces the name in mlx-lm's module (process-wide, as importing a model module is):
another model of the type in the process trains through it too.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxlab.models.decoders.mlx_lm_fused import wrap_in_modules
from mlxlab.models.layers.gated_delta import chunked_gated_delta_update

# wrapper -> mlx-lm's gated_delta_update it wraps: a second model of the type never wraps it again
ORIGINALS: dict[Callable, Callable] = {}


def chunked_in_training(original: Callable) -> Callable:
    """mlx-lm's `gated_delta_update` with its training calls (use_kernel=False, which the layers
    pass as `not self.training`) through the chunked rule."""

    def gated_delta_update(*args: mx.array | None, use_kernel: bool = True,
                           **options: float | bool | None) -> tuple[mx.array, mx.array]:
        if use_kernel:
            return original(*args, use_kernel=use_kernel, **options)
        return chunked_gated_delta_update(*args, **options)

    ORIGINALS[gated_delta_update] = original
    return gated_delta_update


def use_chunked_gated_delta(lm: nn.Module) -> int:
    """Route `lm`'s (an mlx-lm model's) gated-delta layers through the chunked rule in training;
    returns how many of its model modules call it (0: no gated-delta layer)."""
    from mlx_lm.models import gated_delta

    return wrap_in_modules(lm, "gated_delta_update", gated_delta.gated_delta_update,
                           chunked_in_training, ORIGINALS)
