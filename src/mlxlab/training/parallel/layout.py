"""Where each parameter of a sharded model lives: which axis its rank holds a slice of (None:
every rank holds it whole), and its name in the unsharded model. Checkpoints are written whole,
under the unsharded names, streamed an array at a time (`write_whole`; fsdp's padding rows cut
off), and read into a sharded run by slicing (`shard_state`, padded again): a checkpoint of any
run loads in any world size, in one process, and in every verb."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxlab.checkpoint.streamed import StreamedSafetensors
from mlxlab.errors import ConfigError
from mlxlab.runtime.cluster import distributed
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

    def write_whole(self, tree: Any, what: str, path: Path | None) -> None:
        """The whole arrays of a sharded tree (parameters or optimizer state) under unsharded
        names, written by rank 0 to the safetensors file `path` (None on the other ranks) one
        array at a time: every rank takes part in each gather, and rank 0 holds one whole array
        at a time beside its shards."""
        flat = [(self.plain(name), value if isinstance(value, mx.array) else mx.array(value))
                for name, value in tree_flatten(tree)]
        stream = None if path is None else StreamedSafetensors(
            path, [(plain, self.whole_shape(plain, value), value.dtype) for plain, value in flat])
        try:
            with self.world.guard(f"gathering {what} for a checkpoint", 4.0):
                for plain, value in flat:
                    axis = self.axis_of(plain) if value.ndim else None
                    full = value if axis is None else _all_gather(value, axis, self.world)
                    rows = self.rows_of(plain)
                    full = full if rows is None else full[:rows]  # the padding's zero rows
                    mx.eval(full)  # the collective runs on every rank
                    if stream is not None:
                        stream.write(plain, full)
                    del full
        except BaseException:
            if stream is not None:
                stream.abandon()
            raise
        if stream is not None:
            stream.close()

    def whole_shape(self, plain: str, value: mx.array) -> tuple[int, ...]:
        """The unsharded shape of a parameter or slot whose slice on this rank is `value`."""
        shape = list(value.shape)
        axis = self.axis_of(plain) if value.ndim else None
        if axis is not None:
            shape[axis] *= self.world.size
        rows = self.rows_of(plain)
        if rows is not None:
            shape[0] = rows
        return tuple(shape)

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
