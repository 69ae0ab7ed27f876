"""Train with a shrunken vocabulary: only the tokens the training data uses (or its top k).

`data.vocab_remap.mode=used` keeps every token id the training documents contain; `topk` keeps the
`data.vocab_remap.k` most frequent. The special tokens (end-of-text, padding, BOS) are always
kept, and one extra id, UNK, stands for every other token (a token only the validation text or a
prompt uses, or one cut by top-k). Kept ids are renumbered 0..n-1 in their original order, the
batches are remapped as they are handed out, and the model is built with n + 1 rows of embedding
and output instead of the tokenizer's full size: with a 32k tokenizer on a small corpus most
rows would never be trained (docs/benchmarks.md has what that saves).

The map lands in every checkpoint (the data state); `runs.load_run_model` wraps the model in
`models.remapped.RemappedLM`, which takes and returns the original tokenizer's ids (UNK's
probability spread over the dropped ids), so `mlxlab generate` and `mlxlab eval` work in the run's
own tokenizer.json.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MODES = ("used", "topk")


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
    def build(cls, mode: str, counts: np.ndarray, k: int | None = None,
              always: Iterable[int] = ()) -> VocabMap:
        if mode not in MODES:
            raise ValueError(f"data.vocab_remap.mode={mode!r}: use used or topk (or null for off)")
        if mode == "used":
            keep = np.flatnonzero(counts)
        else:
            if not k or k < 1:
                raise ValueError("data.vocab_remap.mode=topk needs data.vocab_remap.k=<tokens to keep>")
            used = np.flatnonzero(counts)
            keep = used[np.argsort(-counts[used], kind="stable")[:k]]
        return cls([*keep.tolist(), *always], len(counts))

    def remap(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self.to_new[v] if k in ("input_ids", "labels") else v for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"keep": self.keep.tolist(), "full_size": self.full_size}

    @classmethod
    def from_state(cls, state: Mapping) -> VocabMap:
        return cls(state["keep"], state["full_size"])
