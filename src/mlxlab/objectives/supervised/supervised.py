"""Supervised training (`objective=supervised`, the default): the cross-entropy of the data's
labels, per example for classifiers and per scored token for language models, with optional
label smoothing; evaluated by the same cross-entropy and the task's metrics."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from hydra.utils import get_class

from mlxlab.config.records import check_number
from mlxlab.data.batching import Batch, Batching
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.models.base import Model
from mlxlab.objectives import losses
from mlxlab.objectives.base import (
    Evaluation,
    MetricSpec,
    Objective,
    ObjectiveSetup,
    data_kind,
)
from mlxlab.objectives.validation import evaluate_cross_entropy
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS, UNIT, MetricDefinition

# What evaluate_cross_entropy reports for each data task (prefix "val/"), which way each
# improves and its range: the names optimized_metric may use (objectives/metrics.py computes them).
METRICS = {
    "classification": {"loss": LOSS, "accuracy": UNIT, "f1": UNIT, "roc_auc": UNIT},
    "lm": {"loss": LOSS, "perplexity": MetricDefinition("min", 1.0)},
}
# kinds of data (base.data_kind) this objective does not train on, and what does
OTHER_KINDS = {
    "preference": "preference pairs train with a preference objective: set objective=dpo, "
                  "objective=orpo or objective=reward (or experiment=dpo_chat / orpo_chat / "
                  "reward_chat)",
    "unpaired": "completions rated good or bad train with objective=kto (or experiment=kto_chat)",
    "embedding": "text columns train embedders with an embedding loss: set objective=mnrl "
                 "(or cached_mnrl, matryoshka, cosent, margin_mse, distill_kl_div; "
                 "experiment=embed_retrieval)",
    "speech": "audio and transcripts train a Whisper model with objective=speech_to_text",
    "prompts": "data {data} holds prompts without completions, and objective {objective} trains "
               "on the data's rows: pick an objective that samples completions (objective=grpo, "
               "experiment=grpo_*), or data=completions / data=chat for supervised fine-tuning"}


def check_smoothing(value: Any) -> float:
    check_number("objective.label_smoothing", value, float, 0.0)
    if value >= 1.0:
        raise ConfigError(f"objective.label_smoothing must be below 1, got {value}")
    return float(value)


def check_kind(kind: str | None, objective: str, data: str) -> None:
    """One line for data this objective does not train on (`objective`, `data`: class names)."""
    if kind in OTHER_KINDS:
        raise DataMismatch(OTHER_KINDS[kind].format(data=data, objective=objective))
    if kind is not None and kind not in METRICS:
        raise DataMismatch(f"objective {objective} trains on classification or language-model "
                           f"data, not {kind!r} data: pick the objective for it")


def check_head_split(model: nn.Module, task: str, chunk: int) -> None:
    """objective.head_chunk needs a language model whose logits are its output head over its
    hidden states (Model.head_split), exactly: checked on a few tokens, or one line."""
    split = model.head_split() if task == "lm" else None
    if split is None:
        raise ConfigError(f"objective.head_chunk={chunk}: {type(model).__name__} on {task} data "
                          "does not split its logits from its hidden states (an mlx-lm "
                          "decoder's language-model head does); leave it 0")
    ids = mx.array([[1, 2, 3, 4]])
    whole, parts = model(ids), split.apply(split.head, split.hidden(ids, None))
    if whole.shape != parts.shape or not mx.allclose(whole, parts, rtol=1e-4, atol=1e-4).item():
        raise ConfigError(f"objective.head_chunk={chunk}: this model's logits are not its output "
                          "head over its hidden states (it scales or caps them); leave it 0")


class Supervised(Objective):
    """Cross-entropy against batch["labels"] (objectives/losses.py task_loss)."""

    def __init__(self, label_smoothing: float = 0.0, head_chunk: int = 0) -> None:
        self.label_smoothing = check_smoothing(label_smoothing)
        check_number("objective.head_chunk", head_chunk, int, 0)
        self.head_chunk = int(head_chunk)
        self._loss: losses.LossFn | None = None

    def setup(self, setup: ObjectiveSetup) -> None:
        check_kind(data_kind(setup.data), type(self).__name__, type(setup.data).__name__)
        if self.head_chunk:
            check_head_split(setup.model, setup.data.task, self.head_chunk)
        self._loss = losses.task_loss(setup.data.task, self.label_smoothing, setup.per_example,
                                      self.head_chunk)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        if self._loss is None:
            raise RuntimeError(f"{type(self).__name__}.loss before setup()")
        return self._loss(model, batch)

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        return evaluate_cross_entropy(model, data, batching, world, prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec(dict(METRICS.get(kind, {})))

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        check_kind(kind, cls.__name__, str(cfg.data._target_).rsplit(".", 1)[-1])
        chunk = (cfg.get("objective") or {}).get("head_chunk")
        if chunk and kind != "lm":
            raise ConfigError(f"objective.head_chunk={chunk} chunks a language model's output "
                              f"head; this run's data is {kind}: leave it 0")
        if chunk and get_class(str(cfg.model._target_)).head_split is Model.head_split:
            raise ConfigError(f"objective.head_chunk={chunk}: {cfg.model._target_} does not "
                              "split its logits from its hidden states (an mlx-lm decoder's "
                              "language-model head does); leave it 0")
        super().check_config(cfg, kind)
