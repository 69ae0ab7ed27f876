"""Supervised training (`objective=supervised`, the default): the cross-entropy of the data's
labels, per example for classifiers and per scored token for language models, with optional
label smoothing; evaluated by the same cross-entropy and the task's metrics."""

from __future__ import annotations

from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from mlxlab.config.records import check_number
from mlxlab.data.batching import Batch, Batching
from mlxlab.errors import ConfigError
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, Objective, ObjectiveSetup
from mlxlab.objectives.evaluation import evaluate_cross_entropy
from mlxlab.runtime import distributed
from mlxlab.stats import LOSS, UNIT, MetricDefinition

# What evaluate_cross_entropy reports for each data task (prefix "val/"), which way each
# improves and its range: the names optimized_metric may use (objectives/metrics.py computes them).
METRICS = {
    "classification": {"loss": LOSS, "accuracy": UNIT, "f1": UNIT, "roc_auc": UNIT},
    "lm": {"loss": LOSS, "perplexity": MetricDefinition("min", 1.0)},
}
# data tasks this objective does not train on, and the objective that does
OTHER_TASKS = {"preference": "preference pairs train with a preference objective: set "
                             "objective=dpo or objective=orpo (or experiment=dpo_chat / orpo_chat)"}


def check_smoothing(value: Any) -> float:
    check_number("objective.label_smoothing", value, float, 0.0)
    if value >= 1.0:
        raise ConfigError(f"objective.label_smoothing must be below 1, got {value}")
    return float(value)


def check_task(task: str, objective: str) -> None:
    """One line for data this objective does not train on."""
    if task in OTHER_TASKS:
        raise ConfigError(OTHER_TASKS[task])
    if task not in METRICS:
        raise ConfigError(f"objective={objective} trains on classification or language-model "
                          f"data, not {task!r} data: pick the objective for it")


class Supervised(Objective):
    """Cross-entropy against batch["labels"] (objectives/losses.py task_loss)."""

    name: ClassVar[str] = "supervised"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = check_smoothing(label_smoothing)
        self._loss: losses.LossFn | None = None

    def setup(self, setup: ObjectiveSetup) -> None:
        check_task(setup.data.task, self.name)
        self._loss = losses.task_loss(setup.data.task, self.label_smoothing, setup.per_example)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        if self._loss is None:
            raise RuntimeError(f"{type(self).__name__}.loss before setup()")
        return self._loss(model, batch)

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        return evaluate_cross_entropy(model, data, batching, world, prefix)

    @classmethod
    def metric_definitions(cls, task: str) -> dict[str, MetricDefinition]:
        return dict(METRICS.get(task, {}))

    @classmethod
    def check_data(cls, task: str) -> None:
        check_task(task, cls.name)
