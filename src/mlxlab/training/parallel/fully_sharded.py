"""trainer.distributed.mode=fsdp: every parameter stored as 1/N of its rows on each rank, gathered
whole only while its unit computes (MLX's `nn.FullyShardedModule`, subclassed).

The units are the model's decoder blocks (`Model.blocks()`) and, outside them, each top-level
module that holds parameters (embeddings, final norm, head; a BERT's embeddings and pooler): what
PyTorch's FSDP wraps with a per-block policy. Only one unit's whole parameters live at a time
in the forward; the backward gathers again and reduce-scatters the gradients, so each rank keeps
1/N of parameters, gradients and optimizer state (the optimizer sees the shards).

`ShardedUnit` differs from `nn.FullyShardedModule` in what it gathers together: one flat buffer
per (dtype, trainable) group, through gather.py's collective. A 4-bit base (uint32 weights beside
float scales) cannot share one float buffer, and a LoRA/DoRA/QLoRA base kept apart from its
adapters is gathered without a backward: no gradient is computed for it or sent.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.errors import ConfigError
from mlxlab.models.layers.grad_checkpoint import recomputed
from mlxlab.runtime.cluster import distributed
from mlxlab.training.parallel.gather import make_gather, pad_rows, padded_rows

WRAPPED = "module"  # the child name nn.FullyShardedModule keeps its module under


def _own_parameter(module: nn.Module, key: str, value: Any) -> bool:
    """A parameter of this unit (nested units keep theirs), as nn.FullyShardedModule filters."""
    return (not isinstance(value, nn.FullyShardedModule)
            and nn.Module.valid_parameter_filter(module, key, value))


class ShardedUnit(nn.FullyShardedModule):
    """`module`'s parameters sharded over `world` (axis 0), gathered per (dtype, trainable)."""

    def __init__(self, module: nn.Module, world: distributed.World) -> None:
        trainable = {k for k, _ in tree_flatten(module.trainable_parameters())}
        flat = tree_flatten(module.filter_and_map(_own_parameter))
        # rows N does not divide: zero rows up to a multiple of N, cut off again by the gather
        module.update(tree_unflatten([(k, pad_rows(v, padded_rows(v.shape[0], world.size)))
                                      for k, v in flat if v.shape[0] % world.size]))
        super().__init__(module, group=world.group)
        groups: dict[tuple[Any, bool], list[int]] = {}
        for i, (key, value) in enumerate(flat):
            groups.setdefault((value.dtype, key in trainable), []).append(i)
        gathers = [(idx, make_gather(world, [flat[i][1].shape for i in idx]))
                   for idx in groups.values()]
        super(nn.Module, self).__setattr__("_gathers", gathers)

    def _gathered_call(self, fn, *args, **kwargs):
        shard_tree = self.module.filter_and_map(_own_parameter)
        keys = list(kwargs)
        given = [*args, *(kwargs[k] for k in keys)]
        # the arguments a gradient flows into (hidden states); ids, masks and caches are held
        floating = [i for i, a in enumerate(given)
                    if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]

        def gathered(shards: list[mx.array], inputs: list[mx.array]):
            fulls: list[mx.array | None] = [None] * len(shards)
            for idx, gather in self._gathers:
                for i, full in zip(idx, gather([shards[i] for i in idx])):
                    fulls[i] = full
            values = list(given)
            for i, value in zip(floating, inputs):
                values[i] = value
            self.module.update(tree_unflatten(list(zip(self._paths, fulls))))
            try:
                return fn(*values[:len(args)], **dict(zip(keys, values[len(args):])))
            finally:
                self.module.update(shard_tree)

        # The backward of a matmul holds its whole weight: kept from the forward, every unit's
        # gathered parameters would stay alive until the backward, the whole model on each rank.
        # Checkpointed, the unit keeps its shards and inputs, and gathers (and recomputes) again
        # in the backward: one more forward per step for 1/N of the parameters. The recompute
        # draws the forward's dropout masks (models/layers/grad_checkpoint.py).
        return recomputed(gathered, self.module)([a for _, a in tree_flatten(shard_tree)],
                                       [given[i] for i in floating])

    def __getattr__(self, key: str) -> Any:
        # what the model's code reads of the unit (a block's attention, a flag) is the module's
        try:
            return super().__getattr__(key)
        except AttributeError:
            if WRAPPED not in self:
                raise
            return getattr(self[WRAPPED], key)


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each unit: the blocks, and the modules beside them holding parameters."""
    blocks = {id(b) for b in model.blocks()}
    named = dict((name, m) for name, m in model.named_modules())
    holders = {name for name, m in named.items() if id(m) in blocks}
    units: list[tuple[str, nn.Module]] = []

    def visit(path: str, module: nn.Module) -> None:
        inside = [h for h in holders if path == "" or h.startswith(path + ".")]
        if path in holders or not inside:
            if tree_flatten(module.parameters()):
                units.append((path, module))
            return
        own = [k for k, v in module.items() if isinstance(v, mx.array)]
        if own:
            raise ConfigError(f"trainer.distributed.mode=fsdp: {type(module).__name__} holds "
                              f"{own} beside its blocks, which no unit can shard; use "
                              "trainer.distributed.mode=auto (data parallel)")
        for key, child in _children(module):
            visit(f"{path}.{key}" if path else key, child)

    visit("", model)
    return units


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for key, value in module.items():
        if isinstance(value, nn.Module):
            out.append((key, value))
        elif isinstance(value, list | tuple):
            out += [(f"{key}.{i}", v) for i, v in enumerate(value) if isinstance(v, nn.Module)]
    return out


def check_shardable(units: list[tuple[str, nn.Module]]) -> None:
    """One line for a parameter with no axis to split (a scalar)."""
    for path, unit in units:
        for key, value in tree_flatten(unit.filter_and_map(_own_parameter)):
            if value.ndim == 0:
                raise ConfigError(
                    f"trainer.distributed.mode=fsdp: parameter {path + '.' if path else ''}{key} "
                    "is a scalar, which no rank count can split; use "
                    "trainer.distributed.mode=auto (data parallel)")


def shard_fully(model: nn.Module, world: distributed.World) -> list[str]:
    """Shard `model` in place over `world`; returns the units' paths (their parameters' names
    gain `.module` after them: plain_name drops it)."""
    units = _units(model)
    check_shardable(units)
    for path, unit in units:
        if path == "":
            raise ConfigError(f"trainer.distributed.mode=fsdp: a {type(model).__name__} has no "
                              "blocks or parts to shard one at a time; use mode=auto")
        model.update_modules(tree_unflatten([(path, ShardedUnit(unit, world))]))
    return [path for path, _ in units]


def plain_name(name: str, units: set[str]) -> str:
    """A sharded model's parameter name as the unsharded model spells it."""
    parts, out = name.split("."), []
    for part in parts:
        if part == WRAPPED and ".".join(out) in units:
            continue
        out.append(part)
    return ".".join(out)
