"""Which documents validate and which train (`data.splits`), and the streams of each.

`val_split` names a separate split for validation; otherwise the first `val_examples` examples
of the source's split are held out and training starts after them (a fraction cannot be taken
from a stream of unknown length). `max_examples` caps the training examples per epoch.
`val_examples=0` (without `val_split`) means no validation at all. A source with no more
documents than val_examples (one long document, say) holds out the last VAL_TEXT_FRACTION of
its text instead of whole documents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from typing import Any

from mlxlab.data.streaming.source import DOC_ID, TextSource
from mlxlab.errors import ConfigError

log = logging.getLogger(__name__)

# A corpus with no more documents than val_examples cannot give whole documents to validation
# and keep any for training: the end of its text (this fraction of the characters) is held out.
VAL_TEXT_FRACTION = 0.1
HELD_OUT = "_held_out"  # the split name of held-out text


@dataclass
class Splits:
    val_split: str | None = None
    val_examples: int = 200
    max_examples: int | None = None

    def __post_init__(self) -> None:
        self.val_examples = int(self.val_examples or 0)

    @property
    def has_validation(self) -> bool:
        return self.val_split is not None or self.val_examples > 0


def split_text(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) documents: the last VAL_TEXT_FRACTION of the characters (cut at a space) is
    the validation text."""
    total = sum(len(d) for d in docs)
    keep = total - max(1, int(total * VAL_TEXT_FRACTION))  # characters left for training
    train: list[str] = []
    val: list[str] = []
    for i, doc in enumerate(docs):
        if keep >= len(doc):
            train.append(doc)
            keep -= len(doc)
            continue
        cut = doc.rfind(" ", 0, keep + 1)
        cut = keep if cut <= 0 else cut
        head, tail = doc[:cut].strip(), doc[cut:].strip()
        train += [head] if head else []
        val = ([tail] if tail else []) + docs[i + 1 :]
        break
    return train, val


def _with_doc_id(example: dict, index: int) -> dict:
    return {DOC_ID: index}


class SplitStreams:
    """The training and validation streams of `source` under `splits`: training shuffled per
    epoch through a `shuffle_buffer` (seed + epoch), each document carrying its position in the
    training split (`DOC_ID`)."""

    def __init__(self, source: TextSource, splits: Splits, shuffle_buffer: int, seed: int) -> None:
        self.source, self.splits = source, splits
        self.shuffle_buffer, self.seed = int(shuffle_buffer or 0), int(seed)
        self.held_text: dict[str, list[str]] | None = None  # the text hold-out's two splits

    def _open(self, split: str) -> Any:
        if self.held_text is not None:
            return self.source.from_texts(self.held_text["val" if split == HELD_OUT else "train"])
        return self.source.open(split)

    def _holds_out_documents(self) -> bool:
        return (self.splits.val_split is None and self.splits.val_examples > 0
                and self.held_text is None)

    def hold_out_text_if_few_documents(self) -> None:
        """With no more documents than val_examples, split the text instead (split_text)."""
        self.held_text = None
        if self.splits.val_split is not None or self.splits.val_examples <= 0:
            return
        val_examples = self.splits.val_examples
        docs = list(islice(self.source.documents(self._open(self.source.split)), val_examples + 1))
        if len(docs) > val_examples or not docs:
            return
        train, val = split_text(docs)
        if not train or not val:
            raise ConfigError(
                f"{self.source.name()} is too short to hold out validation text: add text or set "
                "data.splits.val_examples=0 (no validation)"
            )
        self.held_text = {"train": train, "val": val}
        log.warning(
            "%s has %d document(s), not more than data.splits.val_examples=%d: holding out its "
            "last %d%% of text (%d characters) for validation instead of whole documents",
            self.source.name(), len(docs), val_examples, round(VAL_TEXT_FRACTION * 100),
            sum(len(v) for v in val),
        )

    def unshuffled_train(self) -> Any:
        """Training split before shuffling: the tokenizer sample is the same for every seed."""
        ds = self._open(self.source.split)
        return ds.skip(self.splits.val_examples) if self._holds_out_documents() else ds

    def train(self, epoch: int, skip: int = 0) -> Any:
        """One epoch of training examples after the first `skip` (a resume passes over the
        consumed ones without tokenizing them)."""
        ds = self._open(self.source.split)
        if self._holds_out_documents():
            ds = ds.skip(self.splits.val_examples)
        if self.splits.max_examples:
            ds = ds.take(int(self.splits.max_examples))
        # each document's position in the training split, before shuffling: the id its windows
        # carry (batch["index"]) for per-example losses
        ds = ds.map(_with_doc_id, with_indices=True)
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if skip:
            ds = ds.skip(skip)
        ds.set_epoch(epoch)  # shuffle seed = seed + epoch; set last: skip/take do not carry it
        return ds

    def val(self) -> Any | None:
        """The held-out examples, never shuffled; None without validation."""
        val_examples = self.splits.val_examples
        if self.held_text is not None:
            return self._open(HELD_OUT)
        if self.splits.val_split is not None:
            ds = self._open(self.splits.val_split)
            return ds.take(val_examples) if val_examples else ds
        return self._open(self.source.split).take(val_examples) if val_examples else None
