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
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from mlxlab.errors import ConfigError
from mlxlab.sweeps.search.study import (
    OWNER_ATTR,
    PRUNED_AT_ATTR,
    STALE_AFTER_S,
    STEPS_ATTR,
    WORKER_ATTR,
    heartbeat_age,
    process_alive,
    this_process,
)
from mlxlab.tracking import tags as T
from mlxlab.training.callbacks import Callback

if TYPE_CHECKING:
    from mlxlab.sweeps.search.trial_link import TrialLink
    from mlxlab.training.state import TrainContext

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
        self.watch: SweeperWatch | None = None

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        import optuna

        self.tracker = context.tracker
        storage = self.link.storage_handle()
        study = optuna.load_study(study_name=self.link.study_name, storage=storage,
                                  pruner=make_pruner(self.link.pruner.get("name", "none"),
                                                     self.link.pruner.get("args")))
        self.trial = optuna.trial.Trial(study, self.link.trial_id)
        storage.set_trial_system_attr(self.link.trial_id, WORKER_ATTR, this_process())
        sweeper = storage.get_trial_system_attrs(self.link.trial_id).get(OWNER_ATTR)
        if context.world.is_main:
            self.watch = SweeperWatch(storage, self.link.trial_id, sweeper)
            self.watch.start()

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
        if self.watch is not None:  # a launcher's worker goes on to other jobs
            self.watch.stopped.set()
        if self.trial is not None:
            self.link.set_attr(STEPS_ATTR, self.last_step)
            try:  # this process no longer trains the trial (a worker lives on, idle)
                self.link.storage_handle().set_trial_system_attr(self.link.trial_id, WORKER_ATTR,
                                                                 None)
            except Exception as err:  # noqa: BLE001 - a finished trial can't be changed
                log.debug("search: %s", err)

    def state_dict(self) -> dict:
        return {"pruned_at": self.pruned_at, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.pruned_at = state.get("pruned_at")
        self.last_step = state.get("last_step", 0)
        self.should_stop = self.pruned_at is not None


class SweeperWatch(threading.Thread):
    """Stops the trial (SIGTERM: a checkpoint, then the exit every kill gets) when the search
    that launched it is gone, so a restarted search runs it again from that checkpoint instead
    of racing an orphan in the same folder (a launcher's worker outlives a SIGKILLed sweeper)."""

    def __init__(self, storage: Any, trial_id: int, sweeper: dict | None,
                 every_s: float = 2.0) -> None:
        super().__init__(name="mlxlab-search-watch", daemon=True)
        self.storage, self.trial_id, self.sweeper, self.every_s = storage, trial_id, sweeper, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        if not self.sweeper:
            return
        while not self.stopped.wait(self.every_s):
            alive = process_alive(self.sweeper)
            if alive is None:  # another machine's sweeper: its heartbeats
                try:
                    alive = heartbeat_age(self.storage, self.trial_id) <= STALE_AFTER_S
                except Exception:  # noqa: BLE001 - the database is away: keep training
                    alive = True
            if not alive:
                log.warning("search: the search that launched this trial is gone: stopping with "
                            "a checkpoint (the search resumes the trial when started again)")
                os.kill(os.getpid(), signal.SIGTERM)
                return
