"""Knowledge distillation (`objective=distill`): the student's cross-entropy on the labels
plus a soft term toward its teachers (objectives/losses.py distillation_loss). The teachers are
finished runs or model folders, built by the loader its node names (`load_teachers`: a Hydra
partial of runs.load_teachers) and weighted (fixed, or learned: teacher_weights.py); on fixed
datasets their probabilities are computed once before training and looked up in each step
(`teacher_cache`). Rounds of
distillation (`objective.rounds`, a student teaching the next round) are runs of this objective
strung together by launch/rounds.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.config.records import check_choice, record
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.objectives import losses
from mlxlab.objectives.base import ObjectiveSetup, data_kind
from mlxlab.objectives.supervised.supervised import Supervised, check_kind
from mlxlab.objectives.supervised.teacher_weights import (
    TeacherLoader,
    build_teachers,
    check_teacher_specs,
    fit_teacher_weights,
)
from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """`objective=distill`'s keys but label_smoothing: see conf/objective/distill.yaml."""

    teachers: list[dict] = field(default_factory=list)  # [{run: <run dir>, weight: 1.0}, ...]
    alpha: float = 0.5            # weight of the hard-label CE; (1 - alpha) on the soft KL
    temperature: float = 2.0      # softens both distributions (kl, reverse_kl)
    cache_teacher: bool = True    # fixed datasets: teacher outputs computed once, looked up per step
    rounds: int = 1               # > 1: rounds of distillation (launch/rounds.py drives them)
    round_teachers: str = "chain"  # chain | ensemble: who teaches round r + 1
    teacher_weights: str = "fixed"  # fixed | learned (teacher_weights.py)
    loss: str = "kl"              # kl | reverse_kl | mse: the soft term (losses.distillation_loss)
    kl_scale: str = "t2"          # t2: the KL times T^2 (Hinton) | none: alpha*CE + (1-alpha)*KL

    def __post_init__(self) -> None:
        losses.check_distill_form(self.loss, self.kl_scale)  # one list of forms: losses.py
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"objective.rounds must be an integer >= 1, got {self.rounds!r}")
        check_choice("objective.round_teachers", self.round_teachers, ("chain", "ensemble"))
        check_choice("objective.teacher_weights", self.teacher_weights, ("fixed", "learned"))
        check_teacher_specs(self.teachers)


class Distill(Supervised):
    """The student's loss toward its teachers; evaluated as supervised training is."""

    def __init__(self, label_smoothing: float = 0.0, load_teachers: TeacherLoader | None = None,
                 **settings: Any) -> None:
        super().__init__(label_smoothing)
        self.load_teachers = load_teachers
        self.config: DistillConfig = record(DistillConfig, settings, "objective",
                                            "objective=distill")
        self.weights: list[float] = []  # each teacher's normalized weight, after setup

    def setup(self, setup: ObjectiveSetup) -> dict[str, str]:
        """The teachers, their weights, the cached targets and the loss; returns the weights each
        teacher has (learned ones are known only now) as the run's tag."""
        data, batching, config = setup.data, setup.batching, self.config
        check_kind(data_kind(data), type(self).__name__, type(data).__name__)
        teachers, weights = build_teachers(self.load_teachers, config.teachers, data)
        if config.teacher_weights == "learned" and len(teachers) > 1:
            # Streamed text has no in-order pass over its training rows: its validation batches
            # are used instead (the weights then saw the validation data).
            rows = data.train_batches_in_order(batching) or data.val_batches(batching)
            weights = fit_teacher_weights(teachers, rows)
        cache = None
        if config.cache_teacher:
            probs_of = losses.teacher_targets(teachers, weights, config.temperature, config.loss)
            cache = teacher_cache(data, probs_of, batching)
        self._loss = losses.distillation_loss(
            teachers, weights, alpha=config.alpha, temperature=config.temperature,
            label_smoothing=self.label_smoothing, cache=cache, per_example=setup.per_example,
            loss=config.loss, kl_scale=config.kl_scale,
        )
        self.weights = [w / sum(weights) for w in weights]
        return {T.DISTILL_TEACHER_WEIGHTS: str([round(w, 4) for w in self.weights])}


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
