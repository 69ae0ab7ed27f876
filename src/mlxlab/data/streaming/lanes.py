"""Data lanes (`data.shard_by_rank`): under data parallelism rank r of N reads lane r of the
(shuffled) stream, the documents base + r, base + r + N, ... of the epoch, and tokenizes and
packs only those into batches of its own. All ranks still read the raw stream (reading is
cheap; tokenizing is not). Without lanes every rank packs the whole stream into global batches
and keeps its rows (what one process with the global batch sees)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Lanes:
    """This rank's lane of the stream: one lane (the whole stream) until `use` gives it a world."""

    def __init__(self, shard_by_rank: bool) -> None:
        self.shard_by_rank = bool(shard_by_rank)
        self.world: Any = None  # set by use() when this rank reads a lane of its own
        self.lane, self.count = 0, 1

    def use(self, world: Any) -> bool:
        """True when this rank now reads a lane of its own (shard_by_rank under a world)."""
        if not self.shard_by_rank or not world.enabled:
            return False
        self.world, self.lane, self.count = world, world.rank, world.size
        return True

    def take(self, stream: Iterable) -> Iterable:
        """This lane's examples of the stream."""
        return islice(stream, self.lane, None, self.count) if self.count > 1 else stream

    def all_have_a_batch(self, mine: bool = True) -> bool:
        """The agreed end of an epoch: every rank votes each batch, so all stop at the same one
        (an epoch ends for all when any lane runs dry; the rest of the others is skipped)."""
        if self.world is None:
            return True
        votes = self.world.sum_numbers([float(mine)], "the end-of-epoch check of the data lanes")
        return votes[0] == self.world.size

    def gather(self, state: dict) -> dict:
        """Every lane's position (called by every rank; rank 0 writes it): one checkpoint holds
        all lanes, so any rank count can resume from it."""
        mine = {k: v for k, v in state.items() if k not in ("epoch", "base")}
        text = np.frombuffer(json.dumps(mine).encode() + b"\0", np.uint8).astype(np.int32)
        joined = self.world.gather_rows(text, "gathering the data lanes' positions")
        parts = bytes(joined.astype(np.uint8)).split(b"\0")[:-1]  # rank order
        return {"epoch": state["epoch"], "base": state.get("base", 0), "lanes": self.count,
                "lane_states": [json.loads(p) for p in parts]}

    def restore(self, state: dict, fresh: Callable[[int, int], dict]) -> dict:
        """This lane's position from a saved one (`fresh(epoch, base)` is an epoch's start).
        Same lane count: every lane continues exactly. Another count (another world size with
        shard_by_rank, or switching it): the new lanes start at the first document that no old
        lane had read yet, base + r + consumed_r x N minimised over the old lanes; documents a
        faster lane had read past it are read again, and the tokens the old lanes held but had
        not yet put into a batch are skipped."""
        epoch, base = int(state["epoch"]), int(state.get("base", 0))
        lanes = int(state.get("lanes", 1))
        own = state.get("lane_states")
        if own is None:  # one lane's own state (a plain process, or state_dict on this rank)
            if lanes == self.count and int(state.get("lane", 0)) == self.lane:
                restored = {**fresh(epoch, base), **state}
                for key in ("lane", "lanes"):
                    restored.pop(key, None)
                return restored
            if lanes != 1:
                raise ValueError(f"a state of lane {state.get('lane')} of {lanes} alone cannot "
                                 "be resumed: checkpoints hold every lane (gathered_state)")
            own = [state]
        if len(own) == self.count:
            return {**fresh(epoch, base), **own[self.lane]}
        start = min(base + r + int(s["examples_consumed"]) * len(own) for r, s in enumerate(own))
        log.warning(
            "data: %d lane(s) saved, %d now: the lanes restart at document %d of epoch %d (the "
            "first one no saved lane had read; up to a batch per old lane is read again or "
            "skipped)", len(own), self.count, start, epoch)
        return fresh(epoch, start)
