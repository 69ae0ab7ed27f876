"""Several trackers as one (`tracking=[mlflow,csv]`, `[mlflow,wandb]`, ...): every call goes to
each of them.

Hydra merges the options of a list into one `tracking` node: mlflow.yaml gives its flat keys
(uri, experiment_name, ...), csv.yaml its `csv:` block, wandb.yaml its `wandb:` block, and all
name this module's `build_tracker` as the `_target_`, which makes the trackers those keys
describe. The first tracker is the primary one: its run_id is the run's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.tracking.base import METHODS, BaseTracker, Tracker
from mlxlab.tracking.csv_files import CsvTracker
from mlxlab.tracking.mlflow.background import TrackerProcess
from mlxlab.tracking.mlflow.store import builds_mlflow
from mlxlab.tracking.mlflow.tracker import MlflowTracker
from mlxlab.tracking.wandb_tracker import WandbTracker  # wandb itself: when one is built


class FanoutTracker(BaseTracker):
    """Calls every tracker in turn; the first one is the primary (its run_id is the run's). The
    interface's methods (base.METHODS) but flush_barrier and summary are `_each`'s, below."""

    def __init__(self, trackers: list[Tracker]) -> None:
        if not trackers:
            raise ValueError("FanoutTracker needs at least one tracker")
        self.trackers = list(trackers)

    @property
    def run_id(self) -> str | None:
        return self.trackers[0].run_id

    def flush_barrier(self) -> Callable[[], None]:
        waits = [t.flush_barrier() for t in self.trackers]

        def wait() -> None:
            for each in waits:
                each()

        return wait

    def summary(self) -> list[str]:  # files first, then the primary's run
        return [line for t in [*self.trackers[1:], self.trackers[0]] for line in t.summary()]


def _each(name: str) -> Callable[..., None]:
    """The interface method `name` called on every tracker, in order."""

    def call(self: FanoutTracker, *args: Any, **kwargs: Any) -> None:
        for tracker in self.trackers:
            getattr(tracker, name)(*args, **kwargs)

    call.__name__, call.__doc__ = name, getattr(BaseTracker, name).__doc__
    return call


for _name in METHODS:
    if _name not in vars(FanoutTracker):
        setattr(FanoutTracker, _name, _each(_name))


def build_tracker(csv: dict | None = None, background: bool = False, wandb: dict | None = None,
                  **mlflow: Any) -> Any:
    """The tracker(s) a composed `tracking` node describes: MLflow when its settings are there
    (mlflow/store.py `builds_mlflow`), a CsvTracker for a `csv:` block, a WandbTracker for a
    `wandb:` block; several -> a FanoutTracker with MLflow first (the primary: its run id is the
    run's), then csv, then wandb. With `background`, the MLflow tracker runs in a child process
    (tracking/mlflow/background.py) and a twin built here answers settings and probe(). A
    multirun job's sweep parent run and job folder come in `mlflow` (`parent_run_id`,
    `sweep_job_dir`): train.py reads them from the sweep folder (sweeps/folder.py) and passes
    them, so no tracker reads a sweep's files itself."""
    trackers: list[Any] = []
    run_name = mlflow.get("run_name")  # the run's name (tracking/run_info.py run_name), for wandb too
    if builds_mlflow(mlflow):
        tracker = MlflowTracker(**mlflow)
        if background:
            node = {"_target_": "mlxlab.tracking.mlflow.MlflowTracker", **mlflow}
            tracker = TrackerProcess(node, tracker)
        trackers.append(tracker)
    if csv is not None:
        trackers.append(CsvTracker(**csv))
    if wandb is not None:
        trackers.append(WandbTracker(**{"run_name": run_name, **wandb}))
    if not trackers:
        raise ConfigError("tracking: nothing to track to: use tracking=mlflow, tracking=csv, "
                          "tracking=wandb or a list of them, e.g. tracking=[mlflow,csv]")
    return trackers[0] if len(trackers) == 1 else FanoutTracker(trackers)

