"""Train with a shrunken vocabulary: only the tokens the training data uses (or its top k).

`data.vocab_remap.mode=used` keeps every token id the training documents contain; `topk` keeps the
`data.vocab_remap.k` most frequent. The special tokens (end-of-text, padding, BOS) are always
kept, and one extra id, UNK, stands for every other token (a token only the validation text or a
prompt uses, or one cut by top-k). Kept ids are renumbered 0..n-1 in their original order, the
batches are remapped as they are handed out, and the model is built with n + 1 rows of embedding
and output instead of the tokenizer's full size: with a 32k tokenizer on a small corpus most
rows would never be trained (docs/benchmarks.md has what that saves).

The map lands in every checkpoint (the data state); `runs.load_run_model` wraps the model in
`models.decoders.remapped.RemappedLM`, which takes and returns the original tokenizer's ids (UNK's
probability spread over the dropped ids), so `mlxlab generate` and `mlxlab eval` work in the run's
own tokenizer.json.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mlxlab.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("used", "topk")


@dataclass(frozen=True)
class VocabRemap:
    """`data.vocab_remap`: mode None = off; `used` keeps the tokens the training documents use,
    `topk` the `k` most frequent (the rest -> one UNK id). Checked once, here."""

    mode: str | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"data.vocab_remap.mode={self.mode!r}: use used or topk (or null "
                              "for off)")
        if self.mode == "topk" and (isinstance(self.k, bool) or not isinstance(self.k, int)
                                    or self.k < 1):
            raise ConfigError("data.vocab_remap.mode=topk needs data.vocab_remap.k=<tokens to "
                              f"keep> (an integer >= 1), got k={self.k!r}")


class VocabMap:
    """original id -> new id (`to_new`, UNK for the rest) and new id -> original (`keep`)."""

    def __init__(self, keep: Sequence[int], full_size: int) -> None:
        self.keep = np.asarray(sorted(set(int(i) for i in keep)), np.int32)
        self.full_size = int(full_size)
        self.unk = len(self.keep)  # the extra row every other token maps to
        self.to_new = np.full(self.full_size, self.unk, np.int32)
        self.to_new[self.keep] = np.arange(len(self.keep), dtype=np.int32)

    @property
    def size(self) -> int:
        return len(self.keep) + 1

    @classmethod
    def build(cls, remap: VocabRemap, counts: np.ndarray, always: Iterable[int] = ()) -> VocabMap:
        """The map `remap` asks for (a mode, not None) over the training token `counts`; the
        `always` ids (the special tokens) are kept whatever their count."""
        keep = used = np.flatnonzero(counts)
        if remap.mode == "topk":
            keep = used[np.argsort(-counts[used], kind="stable")[: remap.k]]
        return cls([*keep.tolist(), *always], len(counts))

    def remap(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self.to_new[v] if k in ("input_ids", "labels") else v for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"keep": self.keep.tolist(), "full_size": self.full_size}

    @classmethod
    def from_state(cls, state: Mapping) -> VocabMap:
        return cls(state["keep"], state["full_size"])
