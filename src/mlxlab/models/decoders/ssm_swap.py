"""mlx-lm's Mamba-2 layers scan through the gated linear attention kernel
(models/layers/ssm_scan.py).

mlx-lm's Nemotron-H, Falcon-H1, Granite-4.0-H, Mamba-2 and PLaMo-2 mixers call their module's
`ssm_update`, which without Metal (and for every prompt longer than a token) is `ssm_attn`: the
scan as masked `[heads, 256, 256]` matrices, three quarters of a small Nemotron-H's training
step on the CPU. The name is replaced here, where mlxlab loads an mlx-lm model, by a wrapper that
takes the calls the kernel computes exactly (more than one token, no mask; float32 on the CPU)
and hands every other (a generation step, a masked batch, a GPU) to mlx-lm's own function.
As with the gated delta swap, the name is replaced in mlx-lm's module, process-wide.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxlab.models.decoders.mlx_lm_fused import wrap_in_modules
from mlxlab.models.layers.ssm_scan import ssm_scan

# wrapper -> mlx-lm's ssm_update it wraps: a second model of the type never wraps it again
ORIGINALS: dict[Callable, Callable] = {}


def scanned(original: Callable) -> Callable:
    """mlx-lm's `ssm_update` with its unmasked multi-token calls through ssm_scan."""

    def ssm_update(x: mx.array, A_log: mx.array, B: mx.array, C: mx.array, D: mx.array,
                   dt: mx.array, dt_bias: mx.array, state: mx.array | None = None,
                   time_step_limit: tuple[float, float] = (0.001, 100.0),
                   mask: mx.array | None = None, lengths: mx.array | None = None
                   ) -> tuple[mx.array, mx.array]:
        if x.shape[1] > 1 and mask is None and lengths is None:
            out = ssm_scan(x, A_log, B, C, D, dt, dt_bias, state, time_step_limit)
            if out is not None:
                return out
        return original(x, A_log, B, C, D, dt, dt_bias, state, time_step_limit, mask=mask,
                        lengths=lengths)

    ORIGINALS[ssm_update] = original
    return ssm_update


def use_ssm_scan(lm: nn.Module) -> int:
    """Route `lm`'s (an mlx-lm model's) Mamba-2 scans through ssm_scan; returns how many of its
    model modules call it (0: no Mamba-2 layer)."""
    from mlx_lm.models import ssm

    return wrap_in_modules(lm, "ssm_update", ssm.ssm_update, scanned, ORIGINALS)
