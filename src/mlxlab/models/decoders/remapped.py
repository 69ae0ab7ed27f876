"""Language models speaking other ids than they were built with.

RemappedLM: one trained on a shrunken vocabulary (data/vocab_remap.py), speaking the original
tokenizer's ids: inputs are mapped to the trained ids (unknown ones to UNK) and the logits are
scattered back to the full vocabulary. UNK's probability is spread evenly over the ids the model
never had (each gets UNK's logit - log(their count)), so the output is a distribution over the
whole vocabulary: a text with such tokens evaluates to a finite loss, and sampling one of them
is what sampling UNK means. FirstLogits: a padded embedding table's logits cut to the
tokenizer's ids (a pretrained decoder teaching a student of that tokenizer)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxlab.models.base import Model


class RemappedLM(Model):
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


class FirstLogits(Model):
    """A model whose embedding table is padded past its tokenizer (rows no token id reaches):
    its logits cut to the first `vocab_size`, the ids a student trained on that tokenizer has.
    The padded rows were never targets, so the distribution over real ids barely moves."""

    def __init__(self, inner: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.vocab_size, self.max_seq_len = int(vocab_size), inner.max_seq_len

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 cache=None) -> mx.array:
        return self.inner(input_ids, attention_mask=attention_mask, cache=cache)[
            ..., :self.vocab_size]
