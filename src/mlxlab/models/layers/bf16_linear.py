"""nn.Linear with bf16 products on a CPU with bf16 units: trainer.precision=bf16 there.

On the CPU, MLX's own bfloat16 matmul is a scalar loop (~4 GFLOP/s), so casting the model to
bf16, as trainer.precision=bf16 does on a GPU, makes a CPU step slower than fp32. Where the CPU
has bf16 units and MKL drives them (runtime/compute/bf16.py), the step instead keeps float32
weights and activations, and each Linear layer's product, forward and backward, takes its
operands rounded to bfloat16 and sums them in float32 (kernels.bf16_matmul), as PyTorch's CPU
autocast computes a Linear. Everything else (norms, softmax, attention, the loss) stays float32
and keeps the fused kernels, which take float32 only.

`bf16_products(model)` switches the model's nn.Linear layers (the exact class: a subclass may
compute something else; or a replayed mixer's projection, replay.py) to Bf16Linear for the length
of a `with` block and back after it, so the layers are plain nn.Linear to everything outside the
loss (checkpoints, export, evaluation). Bf16Linear is a subclass: the same parameters under the
same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels
from mlxlab.models.layers import replay


def rounded(x: mx.array) -> mx.array:
    """`x` rounded to bfloat16, as float32 (to nearest, ties to even)."""
    return x.astype(mx.bfloat16).astype(mx.float32)


class Bf16Linear(nn.Linear):
    """nn.Linear whose product has bfloat16 operands and float32 sums (module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.bf16_product(x, self["weight"])
        if y is None:  # the fused op skipped or not float32: the same sums through MLX's GEMM
            y = rounded(x.astype(mx.float32)) @ rounded(self["weight"]).T
        return y + self["bias"] if "bias" in self else y


@contextmanager
def bf16_products(model: nn.Module) -> Iterator[int]:
    """Within the block, `model`'s nn.Linear layers compute as Bf16Linear (a projection a
    replayed mixer keeps, as its replayed subclass: replay.py); yields how many."""
    as_bf16 = {nn.Linear: Bf16Linear,
               replay.replayed_projection(nn.Linear): replay.replayed_projection(Bf16Linear)}
    switched = [(m, type(m)) for _, m in model.named_modules() if type(m) in as_bf16]
    for module, cls in switched:
        module.__class__ = as_bf16[cls]
    try:
        yield len(switched)
    finally:
        for module, cls in switched:
            module.__class__ = cls
