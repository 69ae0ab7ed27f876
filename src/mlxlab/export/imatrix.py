"""An importance matrix on the run's own rows: for every matrix, the mean square of each input
column over the tokens that reach it, what llama.cpp's `llama-imatrix` collects and its
quantizers weigh rounding errors by (gguf_kquants.py), computed on the model being quantized
(the fused float folder) by one forward pass over the run's training rows.

An nn.Linear gets one vector (its columns). A MoE layer's routed experts (mlx-lm's SwitchGLU /
SwitchMLP, whose SwitchLinear projections hold every expert in one (experts, out, in) stack) get
one vector per expert, over the tokens the router sent to that expert, as llama-imatrix records
a `*_exps` tensor; an expert no token reached gets ones, what llama-quantize reads for an expert
of zero count. A latent attention's k_b (mlx-lm's embed_q, DeepSeek-V3's and Kimi-Linear's) gets
one vector per head: the mean square of the part of that head's query it multiplies in
llama.cpp's absorbed attention (the query projection's output, recorded too). The vectors are
named by mlx-lm's modules (`model.layers.0.mlp.switch_mlp.gate_proj.weight`,
`model.layers.0.self_attn.embed_q.weight`); gguf_imatrix.py puts them on the GGUF file's
tensors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mlxlab.data.batching import Batch
from mlxlab.objectives.losses import forward


class _Recorder(nn.Module):
    """A linear layer that adds up the squares of its inputs per column (only the positions
    `mask` marks) before computing as itself; a latent attention's query projection also adds
    up each head's query (`heads`: heads, head size, its leading part that multiplies k_b)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mask: mx.array | None = None
        self.total: mx.array | None = None
        self.count = 0.0
        self.heads: tuple[int, int, int] | None = None
        self.queries: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        masked = self.mask is not None and x.ndim == 3 and x.shape[:2] == self.mask.shape
        weight = self.mask[..., None] if masked else 1.0
        count = self.mask.sum() if masked else mx.array(float(np.prod(x.shape[:-1])))
        part = ((x.astype(mx.float32) ** 2) * weight).reshape(-1, x.shape[-1]).sum(0)
        self.total = part if self.total is None else self.total + part
        y = self.inner(x)
        if self.heads is not None:
            heads, size, nope = self.heads
            q = y.astype(mx.float32).reshape(*y.shape[:-1], heads, size)[..., :nope]
            part = ((q ** 2) * (weight[..., None] if masked else 1.0)).reshape(-1, heads, nope)
            self.queries = part.sum(0) if self.queries is None else self.queries + part.sum(0)
            mx.eval(self.queries)
        mx.eval(self.total, count)
        self.count += count.item()
        return y


def _latent_queries(lm: nn.Module, recorders: dict[str, _Recorder]) -> dict[str, str]:
    """{query projection: the attention's embed_q} of every latent attention (DeepSeek-V3's,
    Kimi-Linear's), whose query projection's recorder is told to add up each head's query:
    llama.cpp multiplies k_b (embed_q's weight) by that part of it (its absorbed attention)."""
    from mlx_lm.models.mla import MultiLinear

    found, modules = {}, dict(lm.named_modules())
    for name, module in modules.items():
        if not (isinstance(module, MultiLinear) and name.endswith(".embed_q")):
            continue
        attention = name.removesuffix(".embed_q")
        query = next((f"{attention}.{q}" for q in ("q_b_proj", "q_proj")
                      if f"{attention}.{q}" in recorders), None)
        if query is not None:
            a = modules[attention]
            recorders[query].heads = (a.num_heads, a.q_head_dim, a.qk_nope_head_dim)
            found[query] = name
    return found


class _ExpertRecorder(nn.Module):
    """A SwitchLinear (every expert's matrix in one stack) that adds up, per expert, the squares
    of the input rows routed to it, before computing as itself. `routed` is its block's call:
    each routed row's weight in the router's (tokens, k) order (1 a real token, 0 padding) and
    the router's picks; None: every row counts."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.routed: tuple[mx.array, mx.array] | None = None
        experts, _, columns = inner.weight.shape
        self.total = mx.zeros((experts, columns), dtype=mx.float32)
        self.count = mx.zeros((experts,), dtype=mx.float32)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # gather_mm's operands: x (..., M, in) batched against indices (...): each index picks
        # the expert that multiplies its M rows
        m, columns = x.shape[-2:]
        shape = tuple(np.broadcast_shapes(x.shape[:-2], indices.shape))
        squares = mx.broadcast_to((x.astype(mx.float32) ** 2).sum(-2), (*shape, columns))
        experts = mx.broadcast_to(indices, shape).reshape(-1)
        weight = _row_weights(self.routed, shape, experts)
        self.total = self.total.at[experts].add(squares.reshape(-1, columns) * weight[:, None])
        self.count = self.count.at[experts].add(weight * m)
        mx.eval(self.total, self.count)
        return self.inner(x, indices, sorted_indices=sorted_indices)


def _row_weights(routed: tuple[mx.array, mx.array] | None, shape: tuple[int, ...],
                 experts: mx.array) -> mx.array:
    """The weight of each of a projection's rows (`shape`, their experts `experts`, flat): the
    block's per-row weights as the router ordered them, or, where mlx-lm sorted the rows by
    expert (SwitchGLU does where there are many), sorted by the same argsort, checked against
    the experts the projection received."""
    size = int(np.prod(shape))
    if routed is None:
        return mx.ones((size,))
    rows, indices = routed
    if shape == tuple(indices.shape):
        return rows.reshape(-1)
    flat = indices.reshape(-1)
    if flat.size != size:
        return mx.ones((size,))
    order = mx.argsort(flat)  # mlx-lm's _gather_sort
    if not mx.array_equal(flat[order], experts).item():
        raise RuntimeError("a MoE layer's routed rows come in an order other than its router's "
                           "sorted by expert: the importance matrix cannot tell its tokens")
    return rows.reshape(-1)[order]


class _RoutedRecorder(nn.Module):
    """A MoE layer's expert block (SwitchGLU / SwitchMLP, called with the tokens and the
    router's picks), whose projections are _ExpertRecorders: tells them which routed rows are
    real tokens (`mask`: the batch's, (rows, positions))."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mask: mx.array | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        routed = None
        tokens = indices.shape[:-1]
        if self.mask is not None and self.mask.size == int(np.prod(tokens)):
            routed = (mx.broadcast_to(self.mask.reshape(*tokens, 1), indices.shape), indices)
        projections = [p for p in self.inner.children().values()
                       if isinstance(p, _ExpertRecorder)]
        for p in projections:
            p.routed = routed
        try:
            return self.inner(x, indices)
        finally:
            for p in projections:
                p.routed = None


@dataclass(frozen=True)
class Importance:
    """{mlx-lm weight name: the mean square of each input column (in,), or per expert
    (experts, in)} and, for the expert stacks, which experts no token reached (their vectors
    are ones)."""

    vectors: dict[str, np.ndarray]
    unreached: dict[str, list[int]]


def _real_tokens(batch: Batch) -> mx.array | None:
    """Positions up to each row's last scored token (its end of text): not the padding."""
    mask = batch.get("loss_mask")
    if mask is None:
        return None
    positions = mx.arange(mask.shape[1])[None, :]
    scored = mx.where(mask > 0, positions, -1)
    return (positions <= scored.max(axis=1, keepdims=True)).astype(mx.float32)


def _switch_blocks(lm: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(name, module, names of its SwitchLinear projections) of every MoE expert block: mlx-lm's
    SwitchGLU and SwitchMLP, which every family written to GGUF routes its experts through
    (called with the tokens and the router's picks)."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear, SwitchMLP

    blocks = []
    for name, module in lm.named_modules():
        if isinstance(module, (SwitchGLU, SwitchMLP)):
            children = [k for k, v in module.children().items() if isinstance(v, SwitchLinear)]
            blocks.append((name, module, children))
    return blocks


def importance(model: nn.Module, batches: Iterable[Batch]) -> Importance:
    """The importance matrix of `model.lm` (an MLXLMDecoder's mlx-lm model) over the batches'
    real tokens: every nn.Linear's vector and every routed expert's (module docstring)."""
    lm = model.lm
    blocks = _switch_blocks(lm)
    experts: dict[str, _ExpertRecorder] = {}
    routed: list[tuple[str, nn.Module, _RoutedRecorder]] = []
    for name, block, children in blocks:
        recorders = {child: _ExpertRecorder(block[child]) for child in children}
        block.update_modules(recorders)
        experts.update({f"{name}.{child}" if name else child: r for child, r in recorders.items()})
        routed.append((name, block, _RoutedRecorder(block)))
    linears = [(name, m) for name, m in lm.named_modules() if isinstance(m, nn.Linear)]
    recorders = {name: _Recorder(m) for name, m in linears}
    latent = _latent_queries(lm, recorders)
    lm.update_modules(tree_unflatten(list(recorders.items())))
    lm.update_modules(tree_unflatten([(name, r) for name, _, r in routed]))
    try:
        model.eval()
        for batch in batches:
            mask = _real_tokens(batch)
            for r in recorders.values():
                r.mask = mask
            for _, _, r in routed:
                r.mask = mask
            mx.eval(forward(model, batch))
    finally:
        lm.update_modules(tree_unflatten([(name, block) for name, block, _ in routed]))
        for name, block, children in blocks:
            block.update_modules({c: experts[f"{name}.{c}" if name else c].inner
                                  for c in children})
        lm.update_modules(tree_unflatten([(name, r.inner) for name, r in recorders.items()]))
    vectors = {f"{name}.weight": np.array(r.total) / max(r.count, 1.0)
               for name, r in recorders.items() if r.total is not None}
    vectors.update({f"{embed_q}.weight": np.array(recorders[query].queries)
                    / max(recorders[query].count, 1.0)
                    for query, embed_q in latent.items() if recorders[query].queries is not None})
    unreached: dict[str, list[int]] = {}
    for name, r in experts.items():
        total, count = np.array(r.total), np.array(r.count)
        if not count.any():
            continue  # the block never ran (no token reached its layer)
        empty = count == 0
        vectors[f"{name}.weight"] = np.where(empty[:, None], 1.0,
                                             total / np.maximum(count, 1.0)[:, None]
                                             ).astype(np.float32)
        if empty.any():
            unreached[f"{name}.weight"] = [int(e) for e in np.flatnonzero(empty)]
    return Importance(vectors, unreached)
