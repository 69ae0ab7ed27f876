"""A parent run of child runs, the one mechanism of sweeps and distillation rounds.

`ParentOfRuns` holds the parent on any Tracker (MLflow, CSV, W&B): started, or continued by
its id after a kill (a file tracker carries the killed parent's rows of the finished children,
and what was logged after them is dropped, to be logged again); each child carries the parent's
id as a tag; each finished child's metrics land on the parent at step = the child's index; a
child that finished in the store before a kill kept it out of the caller's records is found
there. Distillation rounds (launch/rounds.py) hold one in-process, their rounds its children.

`ParentRun` is a sweep's parent, held by the launching process on the MLflow store through a
client (its jobs are other processes, which find its id in the sweep folder): its host, pid and
start time are its tags, and a heartbeat thread rewrites its heartbeat tag
(tracking/mlflow/stale.py judges a parent whose launcher died as it judges any run: KILLED). It
ends FINISHED when every job is (the callback decides), KILLED when a signal stopped the sweep
(a grid's job that saved and left, or the search's own process, writes that into the sweep
folder: folder.record_stop; the one way, for grids and searches), FAILED when the launch raised;
a search started again returns to the status its earlier start left when this start fails
before its jobs.
"""

from __future__ import annotations

import atexit
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxlab.sweeps.folder import stopped_by
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import BaseTracker, Tracker
from mlxlab.tracking.mlflow.calls import retrying
from mlxlab.tracking.mlflow.heartbeat import Heartbeat, heartbeat_tags
from mlxlab.tracking.mlflow.stale import clear_killed, process_tags
from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path

log = logging.getLogger(__name__)


def child_tags(parent_run_id: str | None) -> dict[str, str]:
    """What makes a run the child of `parent_run_id` (the MLflow UI nests runs by this tag)."""
    return {T.PARENT_RUN: parent_run_id} if parent_run_id else {}


def finished_run_metrics(uri: str | None, run_id: str) -> dict[str, float] | None:
    """What the trainer returned for a run whose status is FINISHED: its best/<metric> values
    (prefix dropped) and any quantized val_q<bits>/ ones; None for a run that did not finish or
    a store that does not hold it. Reads only."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from mlflow import MlflowClient

    try:
        run = retrying(MlflowClient(tracking_uri=uri).get_run, run_id)
    except Exception:  # noqa: BLE001 - an unknown run id is "not finished" here
        return None
    if run.info.status != "FINISHED":
        return None
    metrics = run.data.metrics
    found = {k[len("best/"):]: v for k, v in metrics.items() if k.startswith("best/")}
    found.update({k: v for k, v in metrics.items() if re.match(r"val_q\d+/", k)})
    return found


class ParentOfRuns:
    """The parent run `tracker` records; `store` is the MLflow store its children write to (None:
    no store to ask, e.g. tracking=csv or none)."""

    def __init__(self, tracker: Tracker, store: str | None = None) -> None:
        self.tracker, self.store = tracker, store

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def start(self, params: dict, tags: dict, run_id: str | None = None,
              resumed: tuple[Path, int] | None = None) -> None:
        """Start the parent, or continue `run_id`; `resumed` = (the killed parent's folder, its
        finished children): the record keeps their metrics and drops what came after."""
        if resumed is not None:
            self.tracker.continue_from(*resumed)
        self.tracker.start(params=params, tags=tags, run_id=run_id)
        if resumed is not None and self.tracker.run_id == run_id:
            self.tracker.rewind(resumed[1])

    def child_tags(self) -> dict[str, str]:
        return child_tags(self.run_id)

    def log_child(self, index: int, metrics: dict[str, float], prefix: str) -> None:
        """Child `index`'s metrics as `<prefix><name>` at step `index`, in the store when this
        returns (before the caller records the child as finished)."""
        self.tracker.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, index)
        self.tracker.flush()

    def finished_child(self, run_id: str | None) -> dict[str, float] | None:
        """The metrics of child run `run_id` when it FINISHED in the store; None when it has
        still to be trained (or resumed), or there is no store to ask."""
        if not self.store or not run_id:
            return None
        return finished_run_metrics(self.store, run_id)

    def log_artifact(self, path: str) -> None:
        self.tracker.log_artifact(path)

    def end(self, status: str) -> str | None:
        self.tracker.end(status)
        return status


class ClientRun(BaseTracker):
    """A run held through an MlflowClient: created with tags in `experiment_id` as `run_name`,
    or an earlier one RUNNING again (its status before kept in `previous`). No params, no
    system metrics: a sweep's parent records what its jobs did."""

    def __init__(self, client: Any, experiment_id: str | None = None,
                 run_name: str | None = None) -> None:
        self.client, self.experiment_id, self.run_name = client, experiment_id, run_name
        self.previous: str | None = None

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            return
        run = retrying(self.client.get_run, run_id)  # raises when the store does not hold it
        self.run_id, self.previous = run_id, run.info.status
        self.set_tags(tags)  # before RUNNING (stale.py reads the launcher's tags)
        retrying(self.client.update_run, run_id, status="RUNNING")
        clear_killed(self.client, run)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            retrying(self.client.set_tag, self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        retrying(self.client.set_terminated, self.run_id, status)


def launcher_tags(heartbeat_every_s: float) -> dict[str, str]:
    """What says the launching process is alive (stale.py reads them back)."""
    return {**process_tags(), **heartbeat_tags(heartbeat_every_s)}


class ParentRun(ParentOfRuns):
    """A sweep's parent run on the MLflow store `uri`, held by this process from `start` until
    `end`; at exit without `end`, it ends FAILED (or KILLED after a signal)."""

    def __init__(self, uri: str, sweep_dir: Path, heartbeat_every_s: float,
                 experiment_id: str | None = None, run_name: str | None = None) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        super().__init__(ClientRun(self.client, experiment_id, run_name), uri)
        self.sweep_dir, self.heartbeat_every_s = sweep_dir, heartbeat_every_s
        self._heartbeat: Heartbeat | None = None

    @classmethod
    def adopt(cls, uri: str, run_id: str, sweep_dir: Path, heartbeat_every_s: float) -> ParentRun:
        """An earlier start's parent, RUNNING again under this process (raises when the store
        does not hold it)."""
        parent = cls(uri, sweep_dir, heartbeat_every_s)
        parent.start({}, {}, run_id)
        return parent

    def start(self, params: dict, tags: dict, run_id: str | None = None,
              resumed: tuple[Path, int] | None = None) -> None:
        super().start(params, {**tags, **launcher_tags(self.heartbeat_every_s)}, run_id, resumed)
        self._heartbeat = Heartbeat(self.client, self.run_id, self.heartbeat_every_s)
        self._heartbeat.start()
        atexit.register(self.end, "FAILED")  # the sweep raised: don't leave it RUNNING

    def end(self, status: str) -> str | None:
        """The final status, once (returned; None when ended already); FAILED becomes KILLED
        after a job's signal, or the earlier start's status for a search whose start failed."""
        atexit.unregister(self.end)
        if self._heartbeat is None:
            return None
        self._heartbeat.stop()
        self._heartbeat = None
        stopped = stopped_by(self.sweep_dir)
        if stopped is not None and status != "FINISHED":
            status = "KILLED"
            when = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.tracker.set_tags({T.KILLED_AT: when, T.RESUMABLE: "true",
                                   T.KILLED_REASON: f"a job was stopped by {stopped}"})
        elif status == "FAILED" and self.tracker.previous:
            status = self.tracker.previous
        super().end(status)
        log.info("MLflow sweep parent run %s: %s", self.run_id, status)
        return status

    def abandon(self) -> None:
        """The store does not answer at the sweep's end: the parent is left as it is (its
        heartbeat stops; the next command that opens the store judges it by its dead
        launcher), with no end at exit that would wait on the store."""
        atexit.unregister(self.end)
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def status_of_jobs(self) -> str:
        """FINISHED when every job's newest run is, else FAILED (a job failed or never ran)."""
        from mlxlab.sweeps.jobs import job_runs_of
        from mlxlab.sweeps.store import sweep_children

        jobs = job_runs_of(sweep_children(self.client, self.run_id))
        return "FINISHED" if jobs and all(r.info.status == "FINISHED" for r in jobs) else "FAILED"
