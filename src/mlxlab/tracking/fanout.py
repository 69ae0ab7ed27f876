"""Several trackers as one (`tracking=[mlflow,csv]`, `[mlflow,wandb]`, ...): every call goes to
each of them.

Hydra merges the options of a list into one `tracking` node: mlflow.yaml gives its flat keys
(uri, experiment_name, ...), csv.yaml its `csv:` block, wandb.yaml its `wandb:` block, and all
name this module's `build_tracker` as the `_target_`, which makes the trackers those keys
describe. The first tracker is the primary one: its run_id and any attribute the trainer or
train.py asks for beyond the protocol (uri, experiment_id, probe, offline_report) are its own.
"""

from __future__ import annotations

from typing import Any

from mlxlab.tracking.base import Tracker

# Methods beyond the Tracker protocol that some trackers have; a missing one is skipped.
_OPTIONAL = ("flush", "rewind", "continue_from", "log_dict", "log_text", "log_figure", "set_dataset")


class FanoutTracker:
    """Calls every tracker in turn; the first one is the primary (its run_id is the run's)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        if not trackers:
            raise ValueError("FanoutTracker needs at least one tracker")
        self.trackers = list(trackers)

    @property
    def run_id(self) -> str | None:
        return self.trackers[0].run_id

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        for t in self.trackers:
            t.start(params, tags, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def end(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.end(status)

    def __getattr__(self, name: str) -> Any:
        if name in _OPTIONAL:
            def call_each(*args: Any, **kwargs: Any) -> None:
                for t in self.trackers:
                    method = getattr(t, name, None)
                    if method is not None:
                        method(*args, **kwargs)

            return call_each
        if name == "trackers":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.trackers[0], name)


def build_tracker(csv: dict | None = None, background: bool = False, wandb: dict | None = None,
                  **mlflow: Any) -> Any:
    """The tracker(s) a composed `tracking` node describes: MLflow when its keys are there (uri),
    a CsvTracker for a `csv:` block, a WandbTracker for a `wandb:` block; several -> a
    FanoutTracker with MLflow first (the primary: its run id is the run's), then csv, then wandb.
    With `background`, the MLflow tracker runs in a child process (tracking/background.py) and a
    twin built here answers settings and probe()."""
    trackers: list[Any] = []
    run_name = mlflow.get("run_name")  # the run's name (train.run_name), for wandb too
    if "uri" in mlflow:
        from mlxlab.tracking.mlflow import MlflowTracker

        tracker = MlflowTracker(**mlflow)
        if background:
            from mlxlab.tracking.background import TrackerProcess

            node = {"_target_": "mlxlab.tracking.mlflow.MlflowTracker", **mlflow}
            tracker = TrackerProcess(node, tracker)
        trackers.append(tracker)
    if csv is not None:
        from mlxlab.tracking.csv_files import CsvTracker

        trackers.append(CsvTracker(**csv))
    if wandb is not None:
        from mlxlab.tracking.wandb_tracker import WandbTracker  # imports wandb (an extra)

        trackers.append(WandbTracker(**{"run_name": run_name, **wandb}))
    if not trackers:
        raise ValueError("tracking: nothing to track to: use tracking=mlflow, tracking=csv, "
                         "tracking=wandb or a list of them, e.g. tracking=[mlflow,csv]")
    return trackers[0] if len(trackers) == 1 else FanoutTracker(trackers)
