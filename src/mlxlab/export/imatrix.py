"""An importance matrix on the run's own rows: for every linear layer, the mean square of each
input column over the tokens that reach it, what llama.cpp's `llama-imatrix` collects and its
quantizers weigh rounding errors by (gguf_kquants.py), computed on the model being quantized
(the fused float folder) by one forward pass over the run's training rows."""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mlxlab.data.batching import Batch
from mlxlab.objectives.losses import forward


class _Recorder(nn.Module):
    """A linear layer that adds up the squares of its inputs per column (only the positions
    `mask` marks) before computing as itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mask: mx.array | None = None
        self.total: mx.array | None = None
        self.count = 0.0

    def __call__(self, x: mx.array) -> mx.array:
        squares = (x.astype(mx.float32) ** 2)
        if self.mask is not None and x.ndim == 3 and x.shape[:2] == self.mask.shape:
            squares = squares * self.mask[..., None]
            count = self.mask.sum()
        else:
            count = mx.array(float(np.prod(x.shape[:-1])))
        part = squares.reshape(-1, x.shape[-1]).sum(0)
        self.total = part if self.total is None else self.total + part
        mx.eval(self.total, count)
        self.count += count.item()
        return self.inner(x)


def _real_tokens(batch: Batch) -> mx.array | None:
    """Positions up to each row's last scored token (its end of text): not the padding."""
    mask = batch.get("loss_mask")
    if mask is None:
        return None
    positions = mx.arange(mask.shape[1])[None, :]
    scored = mx.where(mask > 0, positions, -1)
    return (positions <= scored.max(axis=1, keepdims=True)).astype(mx.float32)


def importance(model: nn.Module, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """{weight name in the model (`model.layers.0.self_attn.q_proj.weight`): the mean square
    of each input column} over the batches' real tokens, for every nn.Linear of `model.lm`
    (an MLXLMDecoder's mlx-lm model, whose names are the Hugging Face ones)."""
    lm = model.lm
    linears = [(name, m) for name, m in lm.named_modules() if isinstance(m, nn.Linear)]
    recorders = {name: _Recorder(m) for name, m in linears}
    lm.update_modules(tree_unflatten(list(recorders.items())))
    try:
        model.eval()
        for batch in batches:
            mask = _real_tokens(batch)
            for r in recorders.values():
                r.mask = mask
            mx.eval(forward(model, batch))
    finally:
        lm.update_modules(tree_unflatten([(name, r.inner) for name, r in recorders.items()]))
    return {f"{name}.weight": np.array(r.total) / max(r.count, 1.0)
            for name, r in recorders.items() if r.total is not None}
