"""What a scored task hands on (TaskScores) and the eval mode a model is scored in: below every
kind's scoring (evaluation/scoring.py, evaluation/speech/, lm_eval/, mteb/), which all return it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn


@dataclass
class TaskScores:
    """A task's metrics (`acc`, ...) and one row of scores per example, in the task's order."""

    task: str
    kind: str
    metrics: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    prompts: str = "plain"  # "plain" | "chat template": how the prompts were written
    # each paired score's direction where the kind does not fix them (lm-eval's tasks: its
    # higher_is_better); empty for mlxlab's own kinds (tasks.PAIRED_SCORES)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    # lm-eval's corpus-level scores: score -> its aggregation (evaluation/lm_eval/corpus.py), computed
    # from each row's "pieces" over the documents, not as a mean of the rows' values
    corpus: dict[str, str] = field(default_factory=dict)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (dropout off) inside, and back in the mode it was in after: a
    training run's model scored at an evaluation goes on training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()
