"""Rows held in memory and batched `batch_size` at a time: reranker pairs and lists
(rerank.py) and text columns for embedders (sentence_pairs.py).

Each epoch the training rows are shuffled by `seed + epoch` and cut into fixed batches, handed
out from where a resumed run stopped (batching.py's EpochPosition, the module's checkpoint
state); the validation rows go in order.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np

from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batch, Batching, EpochPosition, epoch_batches, fixed_batches
from mlxlab.errors import ConfigError


def check_batching(cfg: Any, data: str) -> None:
    """One ConfigError line for trainer.batching.dynamic=true (asked by the config checks of the
    objectives that train on these modules, before anything is created): a batch is
    `batch_size` rows scored together (in-batch negatives, a query's list), never a token
    budget."""
    if ((cfg.get("trainer") or {}).get("batching") or {}).get("dynamic"):
        raise ConfigError(f"{data} makes fixed batches (the rows of a batch are scored "
                          "together): set trainer.batching.dynamic=false")


class FixedBatchRows(DataModule):
    """The batches of a module whose setup holds `train` and `val` (each sized, indexed by row)
    and whose constructor sets `seed`; a subclass collates a batch of rows (`_collate`)."""

    train: Sized
    val: Sized
    seed: int

    def __init__(self) -> None:
        self._position = EpochPosition()

    @abstractmethod
    def _collate(self, split: Any, index: np.ndarray, multiple: int,
                 least: list[int] | None = None) -> Batch:
        """The batch of `split`'s rows `index`, its length padded to a multiple of `multiple`;
        `least`: each token block's real-token index padded to that many rows (_real_tokens)."""

    def _real_tokens(self, split: Any, index: np.ndarray) -> list[int]:
        """The real tokens of each block of tokens (a text column, the pairs) a batch of
        `split`'s rows `index` holds; none: the batches name no real tokens."""
        return []

    def num_train_batches(self, batching: Batching) -> int:
        return -(-len(self.train) // batching.batch_size)

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One shuffled epoch (seed + epoch); after load_state_dict it skips the batches done.
        Each block's real-token index is padded to the most real tokens a batch of the epoch
        holds (models/layers/unpadding.py): one shape an epoch for the compiled step (and the last,
        smaller batch's), where a shape a batch would compile again and again."""
        batches = self._epoch(batching, epoch)
        counts = [self._real_tokens(self.train, index) for index in batches]
        least = [max(block) for block in zip(*counts)] or None
        for index in self._position.remaining(batches, epoch):
            yield self._collate(self.train, index, batching.bucket_multiple, least)

    def _epoch(self, batching: Batching, epoch: int) -> list[np.ndarray]:
        """All of `epoch`'s batches of training rows. Dynamic batching is refused
        (check_batching: the module built and batched outside a run, whose config checks ask it
        first)."""
        if batching.dynamic:
            raise ConfigError("these rows make fixed batches: set trainer.batching.dynamic=false")
        return epoch_batches(len(self.train), batching.batch_size, self.seed, epoch)

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        for index in fixed_batches(len(self.val), batching.batch_size):
            yield self._collate(self.val, index, batching.bucket_multiple)

    def state_dict(self) -> dict:
        return self._position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._position.load_state_dict(state)
