"""Runs left RUNNING by a process that died before it could end them (SIGKILL, OOM, power loss).

train.py tags each run with the host and process id training it. A RUNNING run whose process is
gone and whose run folder holds no committed checkpoint (nothing `resume=` could continue) is
marked KILLED, with a tag saying why, by the next start of a run of the same task and by
`mlxlab runs list`. Runs of other hosts are left alone: their processes cannot be seen.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying
from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path

log = logging.getLogger(__name__)


def process_tags() -> dict[str, str]:
    """Tags naming the process that trains a run (read back by `mark_dead_runs`)."""
    return {T.PID: str(os.getpid()), T.HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _has_checkpoint(run_dir: str | None) -> bool:
    return bool(run_dir) and any(Path(run_dir).glob("checkpoints/*/COMMITTED"))


def mark_dead_runs_quietly(uri: str | None, experiment_name: str | None,
                           task_name: str | None) -> None:
    """mark_dead_runs before a run starts: housekeeping, which never stops a run."""
    try:
        mark_dead_runs(uri, experiment_name, task_name)
    except Exception as e:
        log.warning("could not check for dead MLflow runs: %s", e)


def mark_dead_runs(
    uri: str | None, experiment_name: str | None = None, task_name: str | None = None
) -> list[str]:
    """Mark this host's dead RUNNING runs without a checkpoint as KILLED; returns their ids.

    Only sqlite stores that exist are read (a tracking server is never waited on here).
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is None or not db.exists():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment_name is None:
        experiments = retrying(client.search_experiments)
    else:
        found = retrying(client.get_experiment_by_name, experiment_name)
        experiments = [found] if found is not None else []
    if not experiments:
        return []
    query = "attributes.status = 'RUNNING'"
    if task_name is not None:
        query += f" and tags.`{T.TASK_NAME}` = '{task_name}'"
    runs = retrying(client.search_runs, [e.experiment_id for e in experiments], query,
                    max_results=5000)
    host, marked = socket.gethostname(), []
    for run in runs:
        tags = run.data.tags
        pid = tags.get(T.PID, "")
        if tags.get(T.HOST) != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if _has_checkpoint(tags.get(T.RUN_DIR)):
            continue  # resume= continues it and sets its status
        reason = (f"process {pid} on {host} ended without setting a status and left no "
                  "checkpoint (killed before its first one)")
        retrying(client.set_tag, run.info.run_id, T.KILLED_REASON, reason)
        retrying(client.set_terminated, run.info.run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING: marked KILLED (%s)", run.info.run_id, reason)
        marked.append(run.info.run_id)
    return marked
