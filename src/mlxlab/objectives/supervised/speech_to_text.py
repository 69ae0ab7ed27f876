"""Speech to text (`objective=speech_to_text`): the sequence-to-sequence cross-entropy of a
Whisper model's decoder on the data's transcripts (data=speech), as transformers'
WhisperForConditionalGeneration computes it from `labels`: the mean over every scored token
of the batch (labels -100 are not scored: the padding, and the decoder prompt as data/speech.py
masks it), optionally label-smoothed as transformers' Trainer smooths it (label_smoothing_factor).
Evaluated by the same cross-entropy, unsmoothed, on the validation utterances.

A run whose encoder does not train (`model.lora.modules: [decoder]`, no dropout, a float32
step) computes each training utterance's encoder states once and reads them back in later
epochs (encoder_states.py; `encoder_cache`: auto | off): the same loss, the decoder's step."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.data.batching import Batch, Batching
from mlxlab.data.fixed_rows import check_batching
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup, data_kind
from mlxlab.objectives.supervised.encoder_states import EncoderStates
from mlxlab.objectives.supervised.supervised import check_smoothing
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS

KIND = "speech"  # the data it trains on (data/speech.py's task)
ENCODER_CACHE = ("auto", "off")
IGNORE = -100    # an unscored label (transformers' CrossEntropyLoss ignore_index)

log = logging.getLogger(__name__)


def speech_to_text_loss(model: nn.Module, batch: Batch, label_smoothing: float = 0.0,
                        per_example: bool = False) -> tuple[mx.array, dict[str, mx.array]]:
    """(the mean cross-entropy over the batch's scored tokens, aux) of
    `model(input_features, decoder_input_ids)`'s logits against `labels`; aux["ntokens"] is
    the count of scored tokens, and with `per_example` aux["example_loss"] each utterance's."""
    labels = batch["labels"]
    scored = labels != IGNORE
    if "encoder_states" in batch:  # a frozen encoder's, computed before the step
        logits = model.decode(batch["decoder_input_ids"], batch["encoder_states"])[0]
    else:
        logits = model(batch["input_features"], batch["decoder_input_ids"])
    ce = losses.token_cross_entropy(logits, mx.where(scored, labels, 0), label_smoothing)
    mask = scored.astype(mx.float32)
    count = mask.sum()
    loss = (ce * mask).sum() / mx.maximum(count, 1.0)
    if not per_example:
        return loss, {"ntokens": count}
    each = (mx.stop_gradient(ce) * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
    return loss, {"ntokens": count, "example_loss": each}


def check_encoder_cache(value: Any) -> str:
    if value not in ENCODER_CACHE:
        raise ConfigError(f"objective.encoder_cache={value!r}: use auto (a frozen encoder's "
                          "states computed once per utterance) or off")
    return value


def check_mel_bins(model: nn.Module, data: Any) -> None:
    """The data's log-mel bins are the model's (a folder whose files do not say is read as 80)."""
    want, have = model.config.get("num_mel_bins"), data.n_mels
    if want is not None and int(want) != int(have):
        raise ConfigError(f"the data makes {have} log-mel bins and the model takes {want}: put "
                          f"a preprocessor_config.json with \"feature_size\": {want} in the model "
                          "folder (transformers' WhisperFeatureExtractor settings)")


def check_kind(kind: str | None, data: str) -> None:
    if kind is not None and kind != KIND:
        raise DataMismatch(f"objective SpeechToText trains a Whisper model on audio and "
                           f"transcripts (data=speech), not {kind!r} data ({data}): set "
                           "data=speech, or pick the objective for that data")


class SpeechToText(Objective):
    """The decoder's cross-entropy on the transcripts (see the module)."""

    def __init__(self, label_smoothing: float = 0.0, encoder_cache: str = "auto") -> None:
        self.label_smoothing = check_smoothing(label_smoothing)
        self.encoder_cache = check_encoder_cache(encoder_cache)
        self.per_example = False
        self.states: EncoderStates | None = None

    def setup(self, setup: ObjectiveSetup) -> None:
        check_kind(data_kind(setup.data), type(setup.data).__name__)
        self.per_example = setup.per_example
        if self.states is not None:
            self.states.close()
        check_mel_bins(setup.model, setup.data)
        frozen = setup.model.frozen_encoder
        self.states = None
        if self.encoder_cache == "auto" and frozen and setup.float32_step:
            self.states = EncoderStates()
            log.info("the encoder does not train: each training utterance's encoder states are "
                     "computed once and read back in later epochs (objective.encoder_cache=off "
                     "computes them at every step)")

    def train_batches(self, data: Any, batching: Batching, epoch: int,
                      model: nn.Module) -> Iterable[Batch]:
        batches = data.train_batches(batching, epoch)
        if self.states is None:
            return batches
        return (self.states.batch(model, batch) for batch in batches)

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
        check_encoder_cache(cfg.objective.get("encoder_cache", "auto"))
        check_batching(cfg, "data=speech")
        super().check_config(cfg, kind)
