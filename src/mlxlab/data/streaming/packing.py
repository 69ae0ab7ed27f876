"""Packing (`data.packing`): documents tokenized a few at a time, each after the tokenizer's BOS
(if any) and before the end-of-text token, and the running token stream cut into windows of
seq_len + 1 tokens, across document boundaries.

`stride` < seq_len overlaps windows; positions already scored by the previous window get
loss_mask 0, so every token is counted once. Less than one batch of leftover tokens is ever
held; the position after each batch (a JSON-able dict) lets a resume continue exactly there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from mlxlab.config.records import check_number
from mlxlab.data.streaming.source import DOC_ID
from mlxlab.errors import ConfigError


@dataclass
class Packing:
    seq_len: int = 256  # tokens per window (inputs; labels are shifted by one)
    stride: int | None = None  # window step; None = seq_len (no overlap)
    tokenize_batch: int = 64  # documents tokenized at a time

    def __post_init__(self) -> None:
        given = self.stride
        check_number("data.packing.seq_len", self.seq_len, int, 1)
        self.seq_len = int(self.seq_len)
        self.stride = int(given or self.seq_len)
        if not 1 <= self.stride <= self.seq_len:
            raise ConfigError(
                f"data.packing.stride must be in [1, seq_len={self.seq_len}], got {given}")
        self.tokenize_batch = int(self.tokenize_batch)


@dataclass(frozen=True)
class SpecialIds:
    """The ids packing puts around and after documents."""

    eot: int  # ends every document
    bos: list[int]  # starts every document (a pretrained tokenizer's BOS; ours has none)
    pad: int  # fills the last window and padding rows


def fresh_state(epoch: int, base: int = 0) -> dict:
    """The position at the start of an epoch. base: documents of the epoch before the lanes
    start (set by a resume at another world size); examples_consumed counts this lane's
    documents after base."""
    return {
        "epoch": epoch,
        "examples_consumed": 0,
        "carry": [],
        "carry_docs": [],  # the document id of each carried token
        "windows_done": 0,
        "batches_done": 0,
        "base": base,
    }


class _TokenStream:
    """The running token stream of one pass: tokens not yet in a window, the document of each,
    and the counts a resume needs."""

    def __init__(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.consumed = state["examples_consumed"]
        self.windows_done, self.batches_done = state["windows_done"], state["batches_done"]
        self.buf = np.asarray(state["carry"], dtype=np.int32)
        docs = np.asarray(state.get("carry_docs") or [-1] * len(self.buf), dtype=np.int64)
        if len(docs) != len(self.buf):  # a checkpoint from before document ids: unknown
            docs = np.full(len(self.buf), -1, np.int64)
        self.docs = docs
        self.exhausted = False

    def advance(self, n: int) -> None:
        self.buf, self.docs = self.buf[n:], self.docs[n:]
        self.windows_done += 1

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "examples_consumed": self.consumed,
            "carry": self.buf.tolist(),
            "carry_docs": self.docs.tolist(),
            "windows_done": self.windows_done,
            "batches_done": self.batches_done,
        }


class Packer:
    """Examples -> (numpy batch, position after it) pairs of `batch_size` windows each."""

    def __init__(self, packing: Packing, tokenizer: Any, ids: SpecialIds,
                 text: Callable[[dict], str]) -> None:
        self.seq_len, self.stride = packing.seq_len, packing.stride
        self.tokenize_batch = packing.tokenize_batch
        self.tokenizer, self.ids, self.text = tokenizer, ids, text

    def pack(self, examples: Iterator[dict], batch_size: int, state: dict
             ) -> Iterator[tuple[dict, dict]]:
        stream = _TokenStream(state)
        need = self.seq_len + 1 + (batch_size - 1) * self.stride  # tokens for a full batch
        while True:
            self._fill(stream, examples, need)
            rows: list[tuple[np.ndarray, np.ndarray, int]] = []  # (tokens, loss mask, document)
            self._cut_windows(stream, rows, batch_size)
            if stream.exhausted and len(rows) < batch_size:
                self._cut_tail(stream, rows)
            if not rows:
                return
            stream.batches_done += 1
            yield self._batch(rows, batch_size), stream.state()

    def _fill(self, stream: _TokenStream, examples: Iterator[dict], need: int) -> None:
        """Tokenize documents onto the stream until it holds `need` tokens or runs dry."""
        while len(stream.buf) < need and not stream.exhausted:
            chunk = list(islice(examples, self.tokenize_batch))
            stream.exhausted = len(chunk) < self.tokenize_batch
            stream.consumed += len(chunk)
            kept = [(t, e.get(DOC_ID, -1)) for e, t in zip(chunk, map(self.text, chunk)) if t]
            if not kept:
                continue
            encodings = self.tokenizer.encode_batch([t for t, _ in kept], add_special_tokens=False)
            ids = [[*self.ids.bos, *e.ids, self.ids.eot] for e in encodings]
            stream.buf = np.concatenate(
                [stream.buf, np.asarray([i for d in ids for i in d], np.int32)])
            stream.docs = np.concatenate([stream.docs, np.repeat(
                np.asarray([d for _, d in kept], np.int64), [len(d) for d in ids])])

    def _cut_windows(self, stream: _TokenStream, rows: list, batch_size: int) -> None:
        """Whole windows of seq_len + 1 tokens, every stride tokens, while the batch has room."""
        seq_len, overlap = self.seq_len, self.seq_len - self.stride
        while len(rows) < batch_size and len(stream.buf) >= seq_len + 1:
            mask = np.ones(seq_len, np.float32)
            first = overlap if stream.windows_done else 0
            mask[:first] = 0.0
            # the document of the first scored label
            rows.append((stream.buf[: seq_len + 1], mask, stream.docs[first + 1]))
            stream.advance(self.stride)

    def _cut_tail(self, stream: _TokenStream, rows: list) -> None:
        """The stream's end: pad to a full window, score only its real, not-yet-scored labels."""
        seq_len = self.seq_len
        scored_from = seq_len - self.stride if stream.windows_done else 0
        if len(stream.buf) - 1 <= scored_from:
            return
        mask = np.zeros(seq_len, np.float32)
        mask[scored_from : len(stream.buf) - 1] = 1.0
        pad = np.full(seq_len + 1 - len(stream.buf), self.ids.pad, np.int32)
        rows.append((np.concatenate([stream.buf, pad]), mask, stream.docs[scored_from + 1]))
        stream.advance(len(stream.buf))

    def _batch(self, rows: list, batch_size: int) -> dict:
        """The rows as one batch, padded to batch_size with rows that score nothing (one batch
        shape); index -1: a padding row, or no document id known."""
        while len(rows) < batch_size:
            rows.append((np.full(self.seq_len + 1, self.ids.pad, np.int32),
                         np.zeros(self.seq_len, np.float32), -1))
        windows = np.stack([tokens for tokens, _, _ in rows])
        return {
            "input_ids": windows[:, :-1],
            "labels": windows[:, 1:],
            "loss_mask": np.stack([mask for _, mask, _ in rows]),
            "index": np.asarray([doc for _, _, doc in rows], np.int64),
        }
