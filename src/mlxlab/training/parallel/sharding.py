"""A model and its optimizer placed on the ranks per trainer.distributed.mode: data parallel
(whole copies), fsdp or tensor. The loop builds the model and restores any checkpoint whole,
then calls `place`; checkpoints read the whole model back through `Placement.whole_model`."""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.runtime import device, distributed
from mlxlab.training.parallel.fully_sharded import plain_name, shard_fully
from mlxlab.training.parallel.gradients import DataParallel, FullySharded, TensorParallel
from mlxlab.training.parallel.layout import Layout
from mlxlab.training.parallel.tensor import shard_tensors

log = logging.getLogger(__name__)
SHARDED_MODES = ("fsdp", "tensor")


class WholeModel:
    """What a checkpoint writer reads of a model (`parameters()`, `trainable_parameters()`):
    gathered whole under the unsharded names when built (every rank takes part), held on rank 0.
    `trainable_only`: the checkpoint records a base and keeps the trained weights alone."""

    def __init__(self, model: nn.Module, layout: Layout, trainable_only: bool) -> None:
        tree = model.trainable_parameters() if trainable_only else model.parameters()
        self.whole = tree_unflatten(list(layout.whole(tree, "the parameters").items()))

    def parameters(self) -> dict:
        return self.whole

    def trainable_parameters(self) -> dict:
        return self.whole


class StateView:
    """What checkpoint writers read from an optimizer (`.state`), for a gathered state."""

    def __init__(self, state: dict) -> None:
        self.state = state


class Placement:
    """How this run's model sits on the ranks: the step's gradient reduction (`gradients`) and,
    for a sharded mode, where each parameter lives (`layout`)."""

    def __init__(self, gradients: DataParallel, layout: Layout | None = None) -> None:
        self.gradients, self.layout = gradients, layout

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    def adopt(self, optimizer: Any, model: nn.Module, restored: dict | None) -> None:
        """Re-initialize `optimizer` on the sharded parameters, with this rank's slices of a
        restored whole state (flat, unsharded names) when there is one."""
        if self.layout is None:
            return
        # init() keeps the slots it finds: start from the scalars (step, learning rate) alone
        optimizer.state = {k: v for k, v in optimizer.state.items()
                           if not isinstance(v, dict | list)}
        optimizer.init(model.trainable_parameters())
        if restored:
            fresh = dict(tree_flatten(optimizer.state))
            for name, value in self.layout.shard_state(restored, fresh):
                _set_leaf(optimizer.state, name, value)
        mx.eval(optimizer.state)

    def whole_model(self, model: nn.Module, trainable_only: bool) -> Any:
        """`model` as a checkpoint writes it; sharded, gathered (on every rank, kept on 0)."""
        return model if self.layout is None else WholeModel(model, self.layout, trainable_only)

    def whole_optimizer(self, optimizer: Any) -> Any:
        if self.layout is None:
            return optimizer
        return StateView(tree_unflatten(list(self.layout.whole(optimizer.state,
                                                               "the optimizer state").items())))


def place(model: nn.Module, world: distributed.World, mode: str | bool) -> Placement:
    """Shard `model` in place for mode fsdp or tensor over more than one rank; data parallel
    (or one process) leaves it whole."""
    if mode not in SHARDED_MODES or not world.enabled:
        if mode in SHARDED_MODES:
            log.info("trainer.distributed.mode=%s in one process: nothing to shard", mode)
        return Placement(DataParallel(world))
    before = sum(v.size for _, v in tree_flatten(model.parameters()))
    if mode == "fsdp":
        rows = {k: v.shape[0] for k, v in tree_flatten(model.parameters())
                if v.ndim and v.shape[0] % world.size}  # stored padded (gather.py)
        units = set(shard_fully(model, world))
        names = [k for k, _ in tree_flatten(model.parameters())]
        layout = Layout(world, {plain_name(k, units): 0 for k in names},
                        lambda name: plain_name(name, units), rows)
        gradients: DataParallel = FullySharded(world)
    else:
        layout = shard_tensors(model, world)
        gradients = TensorParallel(world, layout)
    # A parameter at a time: the model is built lazily (random initialization, mlx-lm's lazy
    # load under a launcher), so each whole array exists only while its slice is cut from it
    # and this rank never holds the whole model (all at once, MLX would keep many alive).
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    log.info("the model split over %d ranks (%s): building it peaked at %.1f MB on this rank",
             world.size, mode, device.peak_memory_mb())
    after = sum(v.size for _, v in tree_flatten(model.parameters()))
    log.info("%s: %d ranks; this rank holds %.1f M of the model's %.1f M parameters",
             "fully sharded (fsdp)" if mode == "fsdp" else "tensor parallel", world.size,
             after / 1e6, before / 1e6)
    return Placement(gradients, layout)


def _set_leaf(tree: Any, name: str, value: mx.array) -> None:
    *parents, last = name.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value
