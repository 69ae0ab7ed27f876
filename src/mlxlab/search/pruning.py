"""Pruning: a search stops a trial whose evaluations trail the others' at the same step.

`hydra.sweeper.pruner` names Optuna's pruner (`median`, `successive_halving`, `hyperband`,
`none`), `hydra.sweeper.pruner_args` its keyword arguments. The trainer's evaluations feed it:
`TrialReporter`, a training callback train.py adds to a search's jobs, reports the optimized
metric at each evaluation's step and asks the pruner; a pruned trial stops like early
stopping (its best checkpoint and metrics stay), with the step it stopped at on its Optuna trial
and its MLflow run.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from mlxlab.errors import ConfigError
from mlxlab.search.study import PRUNED_AT_ATTR, STEPS_ATTR
from mlxlab.tracking import tags as T
from mlxlab.training.callbacks import Callback

if TYPE_CHECKING:
    from mlxlab.search.trial_link import TrialLink
    from mlxlab.training.run import TrainContext

log = logging.getLogger("mlxlab.search")

PRUNERS = {
    "median": "MedianPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "none": "NopPruner",
}


def make_pruner(name: str, args: dict[str, Any] | None = None) -> Any:
    """Optuna's pruner called `name` with `args`."""
    import optuna

    if name not in PRUNERS:
        raise ConfigError(f"hydra.sweeper.pruner={name!r}: use one of {list(PRUNERS)}")
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**dict(args or {}))
    except TypeError as err:
        raise ConfigError(f"hydra.sweeper.pruner_args for {name}: {err}") from None


class TrialReporter(Callback):
    """Reports `metric` at each evaluation to the search's trial; stops the run when pruned."""

    def __init__(self, link: TrialLink) -> None:
        self.link = link
        self.trial: Any = None
        self.tracker: Any = None
        self.last_step = 0
        self.pruned_at: int | None = None

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        import optuna

        self.tracker = context.tracker
        study = optuna.load_study(study_name=self.link.study_name,
                                  storage=self.link.storage_handle(),
                                  pruner=make_pruner(self.link.pruner.get("name", "none"),
                                                     self.link.pruner.get("args")))
        self.trial = optuna.trial.Trial(study, self.link.trial_id)

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.last_step = step

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.link.metric)
        if self.trial is None or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step)  # a resumed trial's repeats are ignored by Optuna
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at, self.should_stop = step, True
            log.info("search: trial %d pruned at step %d (%s %.4f trails the other trials at "
                     "this step; pruner %s)", self.link.number, step, self.link.metric, value,
                     self.link.pruner.get("name"))
            self.link.set_attr(PRUNED_AT_ATTR, step)
            self.tracker.set_tags({T.TRIAL_STATE: "PRUNED", T.PRUNED_AT_STEP: str(step)})

    def on_train_end(self) -> None:
        if self.trial is not None:
            self.link.set_attr(STEPS_ATTR, self.last_step)

    def state_dict(self) -> dict:
        return {"pruned_at": self.pruned_at, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.pruned_at = state.get("pruned_at")
        self.last_step = state.get("last_step", 0)
        self.should_stop = self.pruned_at is not None
