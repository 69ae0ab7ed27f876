"""Where each parameter of a sharded model lives: which axis its rank holds a slice of (None:
every rank holds it whole), and its name in the unsharded model. Checkpoints are written whole,
under the unsharded names (`whole`: fsdp's zero padding rows cut off), and read into a sharded
run by slicing (`shard_state`, padded again): a checkpoint of any run loads in any world size, in
one process, and in every verb."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxlab.errors import ConfigError
from mlxlab.runtime import distributed
from mlxlab.training.parallel.gather import pad_rows, padded_rows


@dataclass
class Layout:
    """A sharded model's parameters: `axis` by unsharded name; `plain` maps a name of the
    sharded model (parameter or optimizer slot) to the unsharded one."""

    world: distributed.World
    axis: dict[str, int | None] = field(default_factory=dict)
    plain: Callable[[str], str] = field(default=lambda name: name)
    rows: dict[str, int] = field(default_factory=dict)  # fsdp: a padded parameter's own rows

    def axis_of(self, name: str) -> int | None:
        """The sharded axis of a parameter or of an optimizer slot (`<param>.<slot>`)."""
        if name in self.axis:
            return self.axis[name]
        return self.axis.get(name.rsplit(".", 1)[0])

    def rows_of(self, name: str) -> int | None:
        """A padded parameter's (or its optimizer slot's) own rows; None: stored unpadded."""
        return self.rows.get(name, self.rows.get(name.rsplit(".", 1)[0]))

    def whole(self, tree: Any, what: str) -> dict[str, mx.array]:
        """The whole arrays of a sharded tree (parameters or optimizer state) under unsharded
        names, on rank 0 ({} elsewhere); every rank takes part, one array at a time."""
        out: dict[str, mx.array] = {}
        with self.world.guard(f"gathering {what} for a checkpoint", 4.0):
            for name, value in tree_flatten(tree):
                plain = self.plain(name)
                axis = self.axis_of(plain) if isinstance(value, mx.array) and value.ndim else None
                full = value if axis is None else _all_gather(value, axis, self.world)
                rows = self.rows_of(plain)
                full = full if rows is None else full[:rows]  # the zero rows of the padding
                if self.world.is_main:
                    mx.eval(full)
                    out[plain] = full
                else:
                    mx.eval(full)  # the collective runs on every rank
        return out

    def shard_state(self, whole: dict[str, Any], sharded: dict[str, mx.array]) -> list[tuple]:
        """(sharded name, this rank's slice) for each array of `sharded` whose unsharded name
        `whole` holds (a restored optimizer state)."""
        out = []
        for name, value in sharded.items():
            source = whole.get(self.plain(name))
            if source is None:
                continue
            axis = self.axis_of(self.plain(name)) if isinstance(source, mx.array) and source.ndim else None
            rows = self.rows_of(self.plain(name))
            if rows is not None and tuple(source.shape[:1]) == (rows,):
                source = pad_rows(source, padded_rows(rows, self.world.size))
            part = source if axis is None else _slice(source, axis, self.world)
            if tuple(part.shape) != tuple(value.shape):
                raise ConfigError(f"optimizer state {self.plain(name)} of shape "
                                  f"{tuple(source.shape)} does not split like its parameter "
                                  f"({tuple(value.shape)} per rank); use an optimizer whose "
                                  "state is shaped like its parameters (AdamW, Adam, SGD, Lion)")
            out.append((name, part))
        return out


def _all_gather(x: mx.array, axis: int, world: distributed.World) -> mx.array:
    moved = mx.moveaxis(x, axis, 0)
    return mx.moveaxis(mx.distributed.all_gather(moved, group=world.group), 0, axis)


def _slice(x: mx.array, axis: int, world: distributed.World) -> mx.array:
    return mx.split(x, world.size, axis=axis)[world.rank]
