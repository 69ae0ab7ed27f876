"""Nothing RUNNING for ever: runs whose process died without ending them, marked KILLED.

A run says which process trains it (train.py tags the host, the pid and the process's start
time: a pid the system gave to another process since has another start time), and the tracking
side rewrites a heartbeat tag (heartbeat.py). A RUNNING run is dead when

- of this host (and, on Linux, this pid namespace: containers sharing a hostname do not see
  each other's pids): its pid is gone, or now belongs to a process started at another time;
- of another host (its process cannot be seen from here): its heartbeat is older than
  STALE_BEATS intervals.

A dead run is marked KILLED, ending at its last sign of life (its heartbeat, its latest metric:
`last_alive_ms`, so its duration is how long it ran, not until it was found), with tags saying
when it was found (`mlxlab.killed_at`), why
(`mlxlab.killed_reason`) and whether a committed checkpoint can continue it
(`mlxlab.resumable`); a resume sets it RUNNING again. Every command that opens the store runs
this: a run's start, `mlxlab runs list|show|compare`, a sweep's start. A run with neither a
live-process record nor a heartbeat (written before either existed) is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxlab.runtime.processes import gone_reason, pid_namespace, process_start
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying
from mlxlab.tracking.mlflow.store import resolve_uri, sqlite_path

log = logging.getLogger(__name__)

STALE_BEATS = 4  # heartbeats missed before another host's run is judged dead
# the tags a RUNNING run is judged by (dead_reason): a resumed run gets its new process's
# before it is RUNNING again, so no check in between reads the killed process's
LIVENESS_TAGS = (
    T.PID, T.HOST, T.PID_NAMESPACE, T.PROCESS_START, T.HEARTBEAT, T.HEARTBEAT_EVERY
)
# what a run's interrupted end said of it (mark_killed; a sweep's failed job: its error, and
# resumable after a full disk): gone once a continuation takes the run up again
ENDED_TAGS = (T.KILLED_AT, T.KILLED_REASON, T.RESUMABLE, T.ERROR)


def process_tags() -> dict[str, str]:
    """Tags naming the process that trains a run (read back by `mark_dead_runs`)."""
    tags = {T.PID: str(os.getpid()), T.HOST: socket.gethostname()}
    namespace = pid_namespace()
    if namespace is not None:
        tags[T.PID_NAMESPACE] = namespace
    start = process_start(os.getpid())
    if start is not None:
        tags[T.PROCESS_START] = start
    return tags


def dead_reason(tags: dict[str, str], host: str, now: float) -> str | None:
    """Why the run these tags describe has no live process, or None (alive, or unknown)."""
    pid = tags.get(T.PID, "")
    namespace = tags.get(T.PID_NAMESPACE)
    # its pid means something here only on this host and in this pid namespace
    visible = namespace is None or namespace == pid_namespace()
    if tags.get(T.HOST) == host and pid.isdigit() and visible:
        return gone_reason(pid, host, namespace, tags.get(T.PROCESS_START), here=host)
    beat, every = tags.get(T.HEARTBEAT), tags.get(T.HEARTBEAT_EVERY)
    try:
        age, interval = now - float(beat), float(every)
    except (TypeError, ValueError):
        return None  # no heartbeat to judge by
    if age > STALE_BEATS * interval:
        return (
            f"no heartbeat from {tags.get(T.HOST, 'its host')} for {age:.0f} s (one every "
            f"{interval:g} s expected)"
        )
    return None


def has_checkpoint(run_dir: str | None) -> bool:
    """A committed checkpoint in the run folder: `resume=` can continue the run."""
    return bool(run_dir) and any(Path(run_dir).glob("checkpoints/*/COMMITTED"))


def mark_dead_runs_quietly(
    uri: str | None, experiment_name: str | None = None, task_name: str | None = None
) -> list[str]:
    """mark_dead_runs as housekeeping, which never stops the command that runs it."""
    try:
        return mark_dead_runs(uri, experiment_name, task_name)
    except Exception as e:
        log.warning("could not check for dead MLflow runs: %s", e)
        return []


def mark_dead_runs(
    uri: str | None, experiment_name: str | None = None, task_name: str | None = None
) -> list[str]:
    """Mark the store's RUNNING runs whose process is dead as KILLED; returns their ids.
    A sqlite store that does not exist is not created."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
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
    runs = retrying(
        client.search_runs, [e.experiment_id for e in experiments], query, max_results=5000
    )
    host, now = socket.gethostname(), time.time()
    marked = []
    for run in runs:
        reason = dead_reason(run.data.tags, host, now)
        if reason is not None:
            mark_killed(client, run, reason)
            marked.append(run.info.run_id)
    return marked


def mark_killed(client: Any, run: Any, reason: str) -> None:
    """`run` KILLED, with when, why and whether a committed checkpoint can continue it."""
    from mlflow.entities import RunTag

    resumable = has_checkpoint(run.data.tags.get(T.RUN_DIR))
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    retrying(
        client.log_batch,
        run.info.run_id,
        tags=[
            RunTag(T.KILLED_AT, when),
            RunTag(T.KILLED_REASON, reason),
            RunTag(T.RESUMABLE, str(resumable).lower()),
        ],
    )
    # its end is its last sign of life, not this moment: a run found dead days later did not
    # run for days
    retrying(client.set_terminated, run.info.run_id, "KILLED", end_time=last_alive_ms(run))
    log.warning(
        "MLflow run %s was left RUNNING: marked KILLED (%s%s)",
        run.info.run_id,
        reason,
        "; a checkpoint can continue it" if resumable else "",
    )


def last_alive_ms(run: Any, now: float | None = None) -> int:
    """When `run`'s process last showed it was alive (ms since the epoch): its heartbeat tag,
    its latest metrics' timestamps, its start; never later than now."""
    now_ms = int((time.time() if now is None else now) * 1000)
    seen = [run.info.start_time or 0]
    with contextlib.suppress(ValueError):
        seen.append(int(float(run.data.tags.get(T.HEARTBEAT, "")) * 1000))
    # the latest value of each metric, with its timestamp (the run's data as MLflow sends it)
    seen += [m.timestamp for m in run.data.to_proto().metrics if m.timestamp]
    return min(max(seen), now_ms)


def mark_run_killed(uri: str, run_id: str, reason: str) -> None:
    """Run `run_id` of store `uri` KILLED (mark_killed) unless it already ended: a stalled
    training process its supervising parent ended (runtime/supervision/supervise.py)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_uri(uri))
    run = retrying(client.get_run, run_id)
    if run.info.status == "RUNNING":
        mark_killed(client, run, reason)


def clear_killed(client: Any, run: Any) -> None:
    """A run a continuation takes up (a resume, an adopted parent, a replayed offline file):
    the tags of its interrupted end go, so a run that then finishes does not say it was killed,
    failed or resumable. Killed again, mark_killed writes them anew."""
    for key in ENDED_TAGS:
        if key in run.data.tags:
            retrying(client.delete_tag, run.info.run_id, key)
