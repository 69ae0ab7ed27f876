"""A sweep's parent run while its launcher lives: started or continued, kept alive, ended.

The launching process holds it: its host, pid and start time are the parent's tags, and a
heartbeat thread rewrites its heartbeat tag (tracking/mlflow/stale.py judges a parent whose
launcher died as it judges any run: KILLED). It ends FINISHED when every job is (the callback
decides), KILLED when a signal stopped the sweep (a grid's job that saved and left, or the
search's own process, writes that into the sweep folder: folder.record_stop; the one way, for
grids and searches), FAILED when the launch raised; a search started again returns to the
status its earlier start left when this start fails before its jobs.
"""

from __future__ import annotations

import atexit
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxlab.sweeps.folder import stopped_by
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying
from mlxlab.tracking.mlflow.heartbeat import Heartbeat, heartbeat_tags
from mlxlab.tracking.mlflow.stale import clear_killed, process_tags

log = logging.getLogger(__name__)


def launcher_tags(heartbeat_every_s: float) -> dict[str, str]:
    """What says the launching process is alive (stale.py reads them back)."""
    return {**process_tags(), **heartbeat_tags(heartbeat_every_s)}


class ParentRun:
    """The parent run `run_id` held by this process until `end`; at exit without `end`, it ends
    FAILED (or KILLED after a signal)."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        sweep_dir: Path,
        heartbeat_every_s: float,
        previous: str | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.uri, self.run_id, self.sweep_dir, self.previous = uri, run_id, sweep_dir, previous
        self.client = MlflowClient(tracking_uri=uri)
        self._heartbeat = Heartbeat(self.client, run_id, heartbeat_every_s)
        self._heartbeat.start()
        atexit.register(self.end, "FAILED")  # the sweep raised: don't leave it RUNNING

    @classmethod
    def adopt(cls, uri: str, run_id: str, sweep_dir: Path, heartbeat_every_s: float) -> ParentRun:
        """An earlier start's parent, RUNNING again under this process (raises when the store
        does not hold it)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = retrying(client.get_run, run_id)
        for key, value in launcher_tags(heartbeat_every_s).items():  # before RUNNING (stale.py)
            retrying(client.set_tag, run_id, key, value)
        retrying(client.update_run, run_id, status="RUNNING")
        clear_killed(client, run)
        previous = run.info.status
        return cls(uri, run_id, sweep_dir, heartbeat_every_s, previous)

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
            for key, value in (
                (T.KILLED_AT, when),
                (T.RESUMABLE, "true"),
                (T.KILLED_REASON, f"a job was stopped by {stopped}"),
            ):
                retrying(self.client.set_tag, self.run_id, key, value)
        elif status == "FAILED" and self.previous:
            status = self.previous
        retrying(self.client.set_terminated, self.run_id, status)
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

    def tag(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            retrying(self.client.set_tag, self.run_id, key, str(value))
