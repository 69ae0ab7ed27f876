"""How long a fit runs and how its batches make steps: the global batch under data parallelism,
the run's length in steps and epochs, and the micro-batches of each optimizer step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.runtime.cluster import distributed
from mlxlab.training.settings import TrainerSettings


class Plan(NamedTuple):
    total_steps: int               # optimizer steps: max_steps or max_epochs, first come
    max_epochs: float              # math.inf when only max_steps bounds the run
    steps_per_epoch: int | None    # None: data of unknown length


def global_batching(batching: Batching, world: distributed.World) -> Batching:
    """Data parallel: the data module batches the global batch (batch_size per rank x ranks,
    token budgets likewise) and each rank trains on its rows, see World.shard_rows."""
    if not world.enabled:
        return batching
    n = world.size
    return dataclasses.replace(
        batching, batch_size=batching.batch_size * n,
        max_tokens=batching.max_tokens * n if batching.max_tokens else None,
        max_batch_size=batching.max_batch_size * n if batching.max_batch_size else None)


def plan(data, settings: TrainerSettings, batching: Batching, grad_accum: int | None = None,
         world: distributed.World | None = None, per_data_batch: int = 1) -> Plan:
    """The run ends at max_steps or max_epochs, first come. A stream's epoch is counted (one
    pass) when max_epochs is set, as far as it could end the run before max_steps; past that its
    steps per epoch stay None (unknown). `world`: lanes of a stream (data.shard_by_rank), whose
    epoch ends for all ranks when the shortest lane runs dry. `per_data_batch`: the batches the
    objective trains on per batch of the data (Objective.plan)."""
    max_epochs, max_steps = settings.max_epochs, settings.max_steps
    accum = grad_accum or settings.grad_accum
    batches = data.num_train_batches(batching)
    if batches is None and max_epochs:
        limit = math.ceil(max_steps * accum / max_epochs / per_data_batch) if max_steps else None
        batches = data.count_train_batches(batching, limit)
        if batches is not None and world is not None and world.enabled:
            counts = world.sum_numbers([batches if r == world.rank else 0.0
                                        for r in range(world.size)], "the epoch's length")
            batches = int(min(counts))
        if limit is not None and batches is not None and batches > limit:
            batches = None  # max_steps comes first
        elif not batches:
            raise ConfigError("the training split holds no full batch: lower "
                              "trainer.batch_size or data.packing.seq_len")
    per_epoch = math.ceil(batches * per_data_batch / accum) if batches else None
    if max_steps == 0:  # the starting weights evaluated (the loop's final evaluation) and kept
        return Plan(0, max_epochs or math.inf, per_epoch)
    limits = [max_steps]
    if max_epochs and per_epoch:
        limits.append(max_epochs * per_epoch)
    if not any(limits):
        raise ConfigError("this data has no known length: set trainer.max_steps or "
                          "trainer.max_epochs")
    return Plan(min(x for x in limits if x), max_epochs or math.inf, per_epoch)


def steps_of(batches: Iterable[dict], grad_accum: int,
             rows_of: Callable[[dict], dict]) -> Iterator[list[dict]]:
    """An epoch's batches as the micro-batches of its optimizer steps (this rank's rows of
    each): grad_accum at a time, and the epoch's last, smaller step of what is left."""
    pending: list[dict] = []
    for batch in batches:
        pending.append(rows_of(batch))
        if len(pending) == grad_accum:
            yield pending
            pending = []
    if pending:
        yield pending
