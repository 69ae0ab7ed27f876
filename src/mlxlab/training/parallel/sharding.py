"""A model and its optimizer placed on the ranks per trainer.distributed.mode: data parallel
(whole copies), fsdp or tensor. The loop builds the model and restores any checkpoint whole,
then calls `place`; a sharded run's checkpoints are written whole by `Placement.write_whole`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab.checkpoint.layout import MODEL_FILE, OPTIMIZER_FILE
from mlxlab.checkpoint.restore import set_path
from mlxlab.runtime.cluster import distributed
from mlxlab.runtime.compute import device
from mlxlab.training.parallel.fully_sharded import plain_name, shard_fully
from mlxlab.training.parallel.gradients import DataParallel, FullySharded, TensorParallel
from mlxlab.training.parallel.layout import Layout
from mlxlab.training.parallel.tensor import shard_tensors

log = logging.getLogger(__name__)
SHARDED_MODES = ("fsdp", "tensor")


class Written:
    """What a checkpoint writer reads of a model whose arrays are in files already
    (`Placement.write_whole`): no parameters to write."""

    def parameters(self) -> dict:
        return {}

    def trainable_parameters(self) -> dict:
        return {}


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
                set_path(optimizer.state, name, value)
        mx.eval(optimizer.state)

    def write_whole(self, model: nn.Module, optimizer: Any, folder: Path | None,
                    trainable_only: bool) -> dict[str, Path]:
        """A sharded model's checkpoint files, whole: every rank takes part, rank 0 writes them
        into `folder` (None on the others) an array at a time; {file name: path} on rank 0.
        `trainable_only`: the checkpoint records a base and keeps the trained weights alone."""
        if self.layout is None:
            raise ValueError("a model left whole is written by the checkpoint writer itself")
        tree = model.trainable_parameters() if trainable_only else model.parameters()
        files = {MODEL_FILE: tree, OPTIMIZER_FILE: optimizer.state}
        paths = {name: folder / name for name in files} if folder is not None else {}
        for name, part in files.items():
            self.layout.write_whole(part, name, paths.get(name))
        return paths


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

