"""Metrics kept while the tracking server is away: a JSON-lines spool in the run directory.

The tracker appends what it could not send to `<run dir>/mlflow_offline.jsonl` (first line: the
store and run id; then one metric per line; a final status line) and sends it itself when the
server answers again. A run that ends while the server is still away leaves the file; send it
later with

    python -m mlxlab.tracking.mlflow.offline <run dir>/mlflow_offline.jsonl

which logs the metrics to the run, sets its final status and renames the file `*.sent`.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import MAX_METRICS_PER_BATCH, chunks

SPOOL_FILE = "mlflow_offline.jsonl"

log = logging.getLogger(__name__)


def reachable(uri: str, timeout: float) -> bool:
    """Whether a TCP connection to the server of an http(s) URI opens within `timeout` seconds.
    A cheap check (no HTTP, no MLflow retries) made before talking to a server seen down."""
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class Spool:
    """Append-only file of the metrics (and the final status) a run could not send."""

    def __init__(self, path: Path, uri: str, run_id: str) -> None:
        self.path, self.uri, self.run_id = Path(path), uri, run_id
        self.metrics = 0  # metric values in the file

    def write(self, rows: Iterable[tuple[str, float, int, int]]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"uri": self.uri, "run_id": self.run_id}) + "\n")
            for key, value, timestamp, step in rows:
                f.write(json.dumps({"key": key, "value": value, "timestamp": timestamp,
                                    "step": step}) + "\n")
                self.metrics += 1

    def write_status(self, status: str) -> None:
        self.write([])
        with open(self.path, "a") as f:
            f.write(json.dumps({"status": status, "end_time": int(time.time() * 1000)}) + "\n")


def read_spool(path: str | Path) -> tuple[dict, list[tuple[str, float, int, int]], dict | None]:
    """(header, metric rows, final status record or None) of a spool file."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or "run_id" not in lines[0]:
        raise ValueError(f"{path} is not an mlxlab offline metrics file")
    rows = [(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
            for r in lines[1:] if "key" in r]
    status = next((r for r in reversed(lines) if "status" in r), None)
    return lines[0], rows, status


def send_spool(path: str | Path, client=None, set_status: bool = True,
               upto: int | None = None) -> int:
    """Log a spool file's metrics (and final status) to its run; renames it `*.sent`.
    Returns how many metric values were sent.

    Idempotent: values the run already holds (the same key, step, time and value: an earlier
    send that died before its rename) are not sent again. `upto`: only the values of steps up
    to it (a run resumed from its checkpoint at that step logs the later ones again), and no
    final status (the resumed run sets its own)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from mlxlab.tracking.mlflow.calls import retrying

    header, rows, status = read_spool(path)
    client = client or MlflowClient(tracking_uri=header["uri"])
    if upto is not None:
        rows, status = [r for r in rows if r[3] <= upto], None
    rows = unsent(client, header["run_id"], rows)
    metrics = [Metric(k, v, t, s) for k, v, t, s in rows]
    for batch in chunks(metrics, MAX_METRICS_PER_BATCH):
        retrying(client.log_batch, header["run_id"], metrics=batch)
    if set_status and status is not None:
        retrying(client.set_terminated, header["run_id"], status["status"],
                 end_time=status["end_time"])
    Path(path).rename(Path(str(path) + ".sent"))
    return len(metrics)


def unsent(client, run_id: str, rows: list[tuple[str, float, int, int]]) -> list:
    """The rows the run does not hold yet (compared by key, step, time and value)."""
    held: set[tuple[str, int, int, float]] = set()
    for key in sorted({row[0] for row in rows}):
        held.update((key, m.step, m.timestamp, m.value)
                    for m in client.get_metric_history(run_id, key))
    return [r for r in rows if (r[0], r[3], r[2], r[1]) not in held]


def spool_of(run: Any) -> Path | None:
    """The offline file a run's folder holds for that run (its run-dir tag), None if none."""
    run_dir = run.data.tags.get(T.RUN_DIR)
    path = Path(str(run_dir)) / SPOOL_FILE if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        header, _, _ = read_spool(path)
    except (OSError, ValueError):
        return None
    return path if header.get("run_id") == run.info.run_id else None


def replay_ended_run(client, run: Any) -> str | None:
    """A run whose process ended it while the server was away (its offline file holds its
    final status): the file sent now, the run given that status; returns it (None: no such
    file, nothing done). What the next command that opens the run does (sweeps/jobs.py)."""
    path = spool_of(run)
    if path is None:
        return None
    _, _, status = read_spool(path)
    if status is None:  # the process died: a resume replays it up to its checkpoint
        return None
    sent = send_spool(path, client)
    from mlxlab.tracking.mlflow.stale import clear_killed

    clear_killed(client, run)
    log.info("MLflow run %s: %d metric values kept while the server was away were sent from %s; "
             "it is %s, as its process ended it", run.info.run_id, sent, path, status["status"])
    return str(status["status"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mlxlab.tracking.mlflow.offline <run dir>/mlflow_offline.jsonl",
              file=sys.stderr)
        return 2
    path = Path(args[0])
    if path.is_dir():
        path = path / SPOOL_FILE
    sent = send_spool(path)
    print(f"sent {sent} metric values from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
