"""The loss a fit trains with: the task's cross-entropy, a preference loss (preference.py), or
distillation from teachers
(trainer.distill): the teachers loaded by the loader train.py hands the Trainer, weighted
(fixed or learned, teacher_weights.py), and on fixed datasets their probabilities computed once
before training and looked up in each step (`teacher_cache`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.training import losses
from mlxlab.training.preference import build_preference_loss
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.teacher_weights import fit_teacher_weights

log = logging.getLogger(__name__)

# (teacher specs, vocab_size, num_labels, label_names) -> (frozen teacher models, weights)
TeacherLoader = Callable[[list, int, "int | None", "list[str] | None"],
                         tuple[list[nn.Module], list[float]]]


def build_loss(settings: TrainerSettings, data, batching: Batching,
               load_teachers: TeacherLoader | None = None, per_example: bool = False,
               model: nn.Module | None = None) -> tuple[losses.LossFn, list[float]]:
    """The run's loss function (fp32: the step wraps it in trainer.precision) and, distilling,
    each teacher's normalized weight. `per_example`: the loss also returns each example's value
    (a callback's needs_example_losses). `model`, before any checkpoint is restored into it:
    a preference loss's reference (training/preference.py)."""
    distill, smoothing = settings.distill, settings.label_smoothing
    if settings.preference is not None:
        return build_preference_loss(settings.preference, data, batching, model, per_example), []
    if data.task == "preference":
        raise ConfigError("preference pairs train with a preference loss: set trainer=dpo or "
                          "trainer=orpo (or experiment=dpo_chat / orpo_chat)")
    if not distill:
        return losses.task_loss(data.task, smoothing, per_example), []
    if load_teachers is None:
        raise ConfigError("a distilling Trainer needs load_teachers= (e.g. "
                          "mlxlab.runs.load_teachers), which builds its teachers")
    teachers, weights = load_teachers(distill.teachers, data.vocab_size, data.num_labels,
                                      data.label_names)
    if distill.teacher_weights == "learned" and len(teachers) > 1:
        # Streamed text has no in-order pass over its training rows: its validation batches
        # are used instead (the weights then saw the validation data).
        rows = data.train_batches_in_order(batching) or data.val_batches(batching)
        weights = fit_teacher_weights(teachers, rows)
    cache = None
    if distill.cache_teacher:
        probs_of = losses.teacher_targets(teachers, weights, distill.temperature, distill.loss)
        cache = teacher_cache(data, probs_of, batching)
    loss_fn = losses.distillation_loss(
        teachers, weights, alpha=distill.alpha, temperature=distill.temperature,
        label_smoothing=smoothing, cache=cache, per_example=per_example,
        loss=distill.loss, kl_scale=distill.kl_scale,
    )
    return loss_fn, [w / sum(weights) for w in weights]


def teacher_cache(data, probs_of, batching: Batching) -> mx.array | None:
    """The teachers' probabilities for every training example, from one pass before training.

    The teachers are frozen and in eval mode, so on a fixed dataset an example's soft targets
    never change: looking them up makes a distilled step cost what the student's step costs.
    None (run the teachers in every step) for data without `train_batches_in_order`, such as
    streamed text, where a vocabulary-sized distribution per token would be too big to keep.
    """
    in_order = data.train_batches_in_order(batching)
    if in_order is None:
        return None
    parts = []
    for batch in in_order:
        probs = probs_of(batch)
        mx.eval(probs)
        parts.append((np.array(batch["index"]), np.array(probs)))
    table = np.zeros((max(int(i.max()) for i, _ in parts) + 1, parts[0][1].shape[-1]), np.float32)
    for index, probs in parts:
        table[index] = probs
    log.info("distillation: teacher probabilities of %d training examples cached", len(table))
    return mx.array(table)
