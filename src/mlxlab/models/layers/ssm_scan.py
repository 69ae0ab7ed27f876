"""Mamba-2's selective scan (mlx-lm's `ssm_attn`) through the gated linear attention kernel.

Each Mamba-2 head carries a (head_dim, state) state and, token by token,

    S <- exp(dt_t A) S + dt_t x_t B_t^T,    y_t = S C_t + D x_t

(dt_t the softplus'd, clipped time step; B and C read per group, the heads of a group sharing
them): the gated delta rule's recurrence without its delta term, with x for v, B for k, C for q,
dt for beta and dt A for the log gate. kernels.gated_delta(delta=False) walks it on the CPU,
with the backward the delta rule's (a state kept every 64 tokens, the rest recomputed).

mlx-lm's `ssm_attn` computes the same in steps of 256 tokens as masked matrix products
(`[heads, 256, 256]` decays, their products with C.B), which MLX's CPU runs as single-threaded
element-wise ops and keeps for the backward: at hidden 512 and 2,048 tokens three quarters of a
Nemotron-H-shaped model's step. The two agree to float32 rounding (tests/test_ssm_scan.py).
"""

from __future__ import annotations

import mlx.core as mx

from mlxlab.models.layers import packed_rows, replay


def ssm_scan(x: mx.array, A_log: mx.array, B: mx.array, C: mx.array, D: mx.array,
             dt: mx.array, dt_bias: mx.array, state: mx.array | None,
             time_step_limit: tuple[float, float]) -> tuple[mx.array, mx.array] | None:
    """mlx-lm's `ssm_attn` without a mask: x (b, l, h, dh), A_log, D, dt_bias (h,), B, C (b, l,
    g, n), dt (b, l, h) before its softplus, state (b, h, dh, n) or None -> (y (b, l, h, dh) in
    x's dtype, the final state float32); None where the kernel does not run it (not the CPU or
    not float32, the kernels off): the caller takes mlx-lm's path."""
    from mlx_lm.models.ssm import compute_dt

    b, _, h, dh = x.shape
    step = compute_dt(dt, dt_bias, time_step_limit)  # float32, as mlx-lm's
    # in a packed pass each example starts from a zero state (packed_rows.py)
    log_gate = packed_rows.reset_log_gate(step * -mx.exp(A_log.astype(step.dtype)))
    start = mx.zeros((b, h, dh, B.shape[-1]), mx.float32) if state is None else state
    out = replay.gated_delta(C, B, x, log_gate, step, start, None, delta=False)
    if out is None:
        return None
    packed_rows.rule_reset(log_gate)
    y, final = out
    return (y + x * D.reshape(1, 1, h, 1)).astype(x.dtype), final
