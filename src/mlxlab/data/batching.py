"""Group examples into batches and pad them to a few length buckets.

A compiled step is traced once per input shape, so batches are padded to a multiple of
`bucket_multiple` instead of their exact longest length. With `dynamic=True` examples of similar
length are batched together and a batch holds as many of them as fit a token budget: short
sequences get bigger batches, and the step still sees only a handful of shapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import mlx.core as mx
import numpy as np

from mlxlab.errors import ConfigError

Batch = dict[str, mx.array]
T = TypeVar("T")


@dataclass
class Batching:
    batch_size: int = 32
    dynamic: bool = False
    max_batch_size: int | None = None  # dynamic only: cap on examples per batch
    max_tokens: int | None = (
        None  # dynamic only: padded tokens per batch; None = batch_size * longest bucket
    )
    bucket_multiple: int = 16

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batching.batch_size must be >= 1, got {self.batch_size}")
        if self.bucket_multiple < 1:
            raise ConfigError(f"batching.bucket_multiple must be >= 1, got {self.bucket_multiple}")


def bucket_length(n: int, multiple: int, max_len: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple`, never above `max_len`."""
    padded = -(-max(int(n), 1) // multiple) * multiple
    return min(padded, max_len) if max_len is not None else padded


def fixed_batches(
    num_examples: int, batch_size: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Index arrays of `batch_size` (the last may be short); shuffled when `rng` is given."""
    order = rng.permutation(num_examples) if rng is not None else np.arange(num_examples)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


# a block's real-token count is rounded up to this (real_token_index)
UNPAD_MULTIPLE = 64


def real_token_index(mask: np.ndarray, multiple: int = UNPAD_MULTIPLE, least: int = 0
                     ) -> np.ndarray:
    """The flat positions of `mask`'s real tokens (1s), sorted, with pad positions added to make
    `least` rows, then a multiple of `multiple` (all positions at most): the rows an unpadding
    encoder computes (models/layers/unpadding.py), in few shapes for the compiled step."""
    flat = mask.reshape(-1)
    real = np.flatnonzero(flat)
    kept = min(-(-max(len(real), least) // multiple) * multiple, flat.size)
    filler = np.flatnonzero(flat == 0)[:kept - len(real)]
    return np.sort(np.concatenate([real, filler])).astype(np.int32)


class EpochPosition:
    """Where a data module's training stream is: the epoch and how many of its batches were
    handed out. It is the module's checkpoint state, so a resumed run goes on from the next
    batch (the epoch's batches drawn again from the same seed) and never replays one."""

    def __init__(self) -> None:
        self.epoch, self.batches_done = 0, 0

    def remaining(self, batches: Sequence[T], epoch: int) -> Iterator[T]:
        """`epoch`'s `batches` from the first not handed out yet. Each is counted when handed
        out: a checkpoint taken after its step must not replay it."""
        start = self.batches_done if epoch == self.epoch else 0
        for k in range(start, len(batches)):
            self.epoch, self.batches_done = epoch, k + 1
            yield batches[k]
        self.epoch, self.batches_done = epoch + 1, 0

    def shuffled(self, num_examples: int, batch_size: int, seed: int,
                 epoch: int) -> Iterator[np.ndarray]:
        """`remaining` of `epoch`'s fixed batches of `num_examples` rows, shuffled by
        `seed + epoch` (a resumed run draws the same ones)."""
        return self.remaining(epoch_batches(num_examples, batch_size, seed, epoch), epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """All of `epoch`'s fixed batches of `num_examples` rows, shuffled by `seed + epoch`."""
    return fixed_batches(num_examples, batch_size, np.random.default_rng(seed + epoch))


def dynamic_batches(
    lengths: np.ndarray,
    batching: Batching,
    max_len: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Length-bucketed index arrays, each filling the token budget.

    Examples are grouped by their bucket length L; a batch of bucket L holds
    min(max_tokens // L, max_batch_size) examples. With `rng` the examples within a bucket and
    the order of all batches are shuffled; without it the order is by bucket, then by index.
    The number of batches does not depend on `rng`.
    """
    lengths = np.asarray(lengths)
    buckets = np.array([bucket_length(n, batching.bucket_multiple, max_len) for n in lengths])
    budget = batching.max_tokens or batching.batch_size * int(buckets.max(initial=1))
    batches = []
    for length in np.unique(buckets):
        members = np.flatnonzero(buckets == length)
        if rng is not None:
            members = rng.permutation(members)
        size = max(1, budget // int(length))
        if batching.max_batch_size:
            size = min(size, batching.max_batch_size)
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pack_rows(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """The rows (their `lengths` in positions) packed into sequences of at most `capacity`
    positions, first-fit decreasing: the longest row first, each into the first sequence with
    room. Returns each sequence's row indices in the order they are laid out. The packing
    depends on the lengths alone, so every epoch (and a resumed run) has the same sequences;
    epochs shuffle their order (data/completions.py)."""
    lengths = np.asarray(lengths, np.int64)
    room = np.empty(0, np.int64)
    members: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room >= lengths[i])
        if fits.size:
            room[fits[0]] -= lengths[i]
            members[fits[0]].append(int(i))
        else:
            room = np.append(room, capacity - lengths[i])
            members.append([int(i)])
    return [np.asarray(m, np.int64) for m in members]


def make_batches(
    lengths: np.ndarray,
    batching: Batching,
    max_len: int | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Index arrays for one pass over examples with these lengths (fixed or dynamic)."""
    if batching.dynamic:
        return dynamic_batches(lengths, batching, max_len, rng)
    return fixed_batches(len(lengths), batching.batch_size, rng)


def collate_classification(
    tokens: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray | None,
    index: np.ndarray,
    multiple: int = 16,
) -> Batch:
    """Classification Batch for rows `index` of a pre-padded token matrix.

    `tokens` is (N, max_len) already filled with the pad id after each row's length, so slicing
    to the bucket length is the whole padding step. `labels=None` (prediction) leaves them out.
    `index` goes into the batch too: per-example values can then be computed once and looked up
    (distillation's teacher probabilities, see training/distill.py teacher_cache).
    """
    batch_lengths = lengths[index]
    width = bucket_length(int(batch_lengths.max()), multiple, tokens.shape[1])
    input_ids = tokens[index, :width]
    mask = (np.arange(width)[None, :] < batch_lengths[:, None]).astype(np.int32)
    batch = {
        "input_ids": mx.array(input_ids),
        "attention_mask": mx.array(mask),
        "index": mx.array(index.astype(np.int32)),
    }
    if labels is not None:
        batch["labels"] = mx.array(labels[index].astype(np.int32))
    return batch
