"""Speech to text (`objective=speech_to_text`): the sequence-to-sequence cross-entropy of a
Whisper model's decoder on the data's transcripts (data=speech), as transformers'
WhisperForConditionalGeneration computes it from `labels`: the mean over every scored token
of the batch (labels -100 are not scored: the padding, and the decoder prompt as data/speech.py
masks it), optionally label-smoothed as transformers' Trainer smooths it (label_smoothing_factor).
Evaluated by the same cross-entropy, unsmoothed, on the validation utterances."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.data.batching import Batch, Batching
from mlxlab.data.fixed_rows import check_batching
from mlxlab.errors import DataMismatch
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup, data_kind
from mlxlab.objectives.supervised.supervised import check_smoothing
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS

KIND = "speech"  # the data it trains on (data/speech.py's task)
IGNORE = -100    # an unscored label (transformers' CrossEntropyLoss ignore_index)


def speech_to_text_loss(model: nn.Module, batch: Batch, label_smoothing: float = 0.0,
                        per_example: bool = False) -> tuple[mx.array, dict[str, mx.array]]:
    """(the mean cross-entropy over the batch's scored tokens, aux) of
    `model(input_features, decoder_input_ids)`'s logits against `labels`; aux["ntokens"] is
    the count of scored tokens, and with `per_example` aux["example_loss"] each utterance's."""
    labels = batch["labels"]
    scored = labels != IGNORE
    logits = model(batch["input_features"], batch["decoder_input_ids"])
    ce = losses.token_cross_entropy(logits, mx.where(scored, labels, 0), label_smoothing)
    mask = scored.astype(mx.float32)
    count = mask.sum()
    loss = (ce * mask).sum() / mx.maximum(count, 1.0)
    if not per_example:
        return loss, {"ntokens": count}
    each = (mx.stop_gradient(ce) * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
    return loss, {"ntokens": count, "example_loss": each}


def check_kind(kind: str | None, data: str) -> None:
    if kind is not None and kind != KIND:
        raise DataMismatch(f"objective SpeechToText trains a Whisper model on audio and "
                           f"transcripts (data=speech), not {kind!r} data ({data}): set "
                           "data=speech, or pick the objective for that data")


class SpeechToText(Objective):
    """The decoder's cross-entropy on the transcripts (see the module)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = check_smoothing(label_smoothing)
        self.per_example = False

    def setup(self, setup: ObjectiveSetup) -> None:
        check_kind(data_kind(setup.data), type(setup.data).__name__)
        self.per_example = setup.per_example

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        return speech_to_text_loss(model, batch, self.label_smoothing, self.per_example)

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        return evaluate_by_loss(model, data.val_batches(batching), speech_to_text_loss,
                                world, prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec({"loss": LOSS} if kind == KIND else {})

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        check_kind(kind, str(cfg.data._target_).rsplit(".", 1)[-1])
        check_batching(cfg, "data=speech")
        super().check_config(cfg, kind)
