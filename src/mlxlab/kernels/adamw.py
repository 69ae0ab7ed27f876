"""AdamW whose per-parameter update is one fused CPU kernel (mlxlab.kernels).

mlx.optimizers.AdamW updates each parameter with a handful of element-wise ops that MLX's CPU
backend runs on one thread; over a small model's ~4M parameters that is ~15 ms of every nano step
(the history record in benchmarks/results/history/). This subclass computes the same update in one multi-threaded
pass per parameter. The state is the parent's (`step`, `learning_rate`, and `m`, `v` per
parameter), so checkpoints and resumes are interchangeable with mlx.optimizers.AdamW; where the
kernels do not run (fused_kernels=off, no build, GPU, not float32) it is the parent class.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from mlxlab.kernels.dispatch import fused


class AdamW(optim.AdamW):
    """mlx.optimizers.AdamW (same arguments and state) with the fused CPU update."""

    _coef: mx.array | None = None  # the step's scalars while a step applies (apply_gradients)

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._coef = None  # the step's scalars, computed by the first apply_single of the step
        try:
            return super().apply_gradients(gradients, parameters)
        finally:
            self._coef = None  # not kept past the step (under mx.compile it is a traced array)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        m, v = state["m"], state["v"]
        module = fused("adamw", gradient, parameter, m, v)
        if module is None or not gradient.shape == parameter.shape == m.shape == v.shape:
            return super().apply_single(gradient, parameter, state)
        if self._coef is None:
            self._coef = self._step_coefficients()
        b1, b2 = self.betas
        parameter, state["m"], state["v"] = module.adamw(
            parameter, gradient, m, v, self._coef, b1, b2, self.eps
        )
        return parameter

    def _step_coefficients(self) -> mx.array:
        """(1 - lr wd, c1, c2) as the parent computes them: the update is
        p (1 - lr wd) - c1 m / (sqrt(v) c2 + eps)."""
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        if self.bias_correction:
            c1 = (lr / (1 - b1**self.step)).astype(mx.float32)
            c2 = mx.rsqrt(1 - b2**self.step).astype(mx.float32)
        else:
            c1, c2 = lr, mx.array(1.0, mx.float32)
        return mx.stack([1 - lr * self.weight_decay, c1, c2]).astype(mx.float32)
