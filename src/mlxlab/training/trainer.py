"""The Trainer: the settings of the one training loop and what train.py built for it; `fit` runs
the loop (loop.py `Fit`).

`trainer=simple|optimized` are configurations of its settings: what it trains toward is an
objective (objectives/, `objective=<name>`),
accumulation a compiled step variant (step.py), dynamic batching a data-side batching policy, and
progress, early stopping and memory logging are callbacks. The settings
are read, never changed: what one `fit` builds and changes lives in that fit, so two calls of
fit behave the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.nn as nn

from mlxlab.data.base import DataModule
from mlxlab.objectives.base import Objective
from mlxlab.objectives.supervised.supervised import Supervised
from mlxlab.tracking.base import Tracker
from mlxlab.training.callbacks import Callback
from mlxlab.training.loop import Fit
from mlxlab.training.optim import OptimizerFactory, default_optimizer
from mlxlab.training.settings import (  # noqa: F401  (public here too, as before)
    CheckpointPolicy,
    DistributedConfig,
    TrainerSettings,
)
from mlxlab.training.state import (  # noqa: F401  (public here too, as before)
    FitResult,
    TrainingError,
    TrainingInterrupted,
)


class Trainer:
    """The one loop. Its knobs come in one frozen `TrainerSettings` (`conf/trainer/*.yaml`,
    training/settings.py); what it trains with comes in built: the optimizer as a partial
    (`conf/optimizer/*.yaml`, learning_rate = the peak of `settings.schedule`), the callbacks
    (`conf/callbacks/*.yaml`), the objective (`conf/objective/*.yaml`; supervised training of
    the data's labels when not given) and the checkpoint policy
    (the `checkpoint` group; its defaults when not given: checkpoints always exist)."""

    def __init__(
        self,
        settings: TrainerSettings | None = None,
        optimizer: OptimizerFactory | None = None,
        callbacks: Sequence[Callback] = (),
        checkpointing: CheckpointPolicy | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.settings = settings or TrainerSettings()
        self.optimizer_factory = optimizer or default_optimizer()
        self.callbacks = list(callbacks)
        self.checkpointing = checkpointing or CheckpointPolicy()
        self.objective = objective if objective is not None else Supervised()

    def fit(
        self,
        model: nn.Module,
        data: DataModule,
        tracker: Tracker,
        run_dir: str | Path,
        config: dict | None = None,
        tags: dict | None = None,
        resume: str | Path | None = None,
    ) -> FitResult:
        """Train `model` on `data`, tracked by `tracker`, checkpointed under `run_dir`; `resume`
        (a run or checkpoint folder) continues where it stopped. Returns the best evaluation."""
        return Fit(self, model, data, tracker, Path(run_dir), config or {}, dict(tags or {}),
                   resume).run()
