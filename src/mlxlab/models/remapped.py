"""A language model trained on a shrunken vocabulary (data/vocab_remap.py), speaking the original
tokenizer's ids: inputs are mapped to the trained ids (unknown ones to UNK) and the logits are
scattered back to the full vocabulary. UNK's probability is spread evenly over the ids the model
never had (each gets UNK's logit - log(their count)), so the output is a distribution over the
whole vocabulary: a text with such tokens evaluates to a finite loss, and sampling one of them
is what sampling UNK means."""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn


class RemappedLM(nn.Module):
    def __init__(self, inner: nn.Module, keep: Sequence[int], full_size: int) -> None:
        super().__init__()
        self.inner = inner
        keep = mx.array(list(keep), dtype=mx.int32)
        unk = keep.size
        to_new = mx.full((full_size,), unk, dtype=mx.int32)
        to_new[keep] = mx.arange(unk, dtype=mx.int32)
        # "_": lookup tables, not parameters (they stay out of parameters() and checkpoints)
        self._keep, self._to_new, self._full = keep, to_new, int(full_size)
        self._spread = math.log(max(1, full_size - unk))  # UNK's mass over the dropped ids
        self.max_seq_len = inner.max_seq_len
        self.vocab_size = self._full

    def make_cache(self):
        return self.inner.make_cache()

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 cache=None) -> mx.array:
        logits = self.inner(self._to_new[input_ids], attention_mask=attention_mask, cache=cache)
        unk = logits[..., -1:] - self._spread
        full = mx.broadcast_to(unk, (*logits.shape[:-1], self._full))
        index = mx.broadcast_to(self._keep, (*logits.shape[:-1], self._keep.size))
        return mx.put_along_axis(full, index, logits[..., :-1], axis=-1)
