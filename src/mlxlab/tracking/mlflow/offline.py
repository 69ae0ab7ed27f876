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
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from mlxlab.tracking.mlflow.calls import MAX_METRICS_PER_BATCH, chunks

SPOOL_FILE = "mlflow_offline.jsonl"


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


def send_spool(path: str | Path, client=None, set_status: bool = True) -> int:
    """Log a spool file's metrics (and final status) to its run; renames it `*.sent`.
    Returns how many metric values were sent."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    header, rows, status = read_spool(path)
    client = client or MlflowClient(tracking_uri=header["uri"])
    metrics = [Metric(k, v, t, s) for k, v, t, s in rows]
    for batch in chunks(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(header["run_id"], metrics=batch)
    if set_status and status is not None:
        client.set_terminated(header["run_id"], status["status"], end_time=status["end_time"])
    Path(path).rename(Path(str(path) + ".sent"))
    return len(metrics)


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
