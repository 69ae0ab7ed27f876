"""CsvTracker: a run's tracking data as plain files in its run folder (`tracking=csv`).

    <run dir>/tracking/params.yaml, params.json   the resolved config, nested
    <run dir>/tracking/metrics.csv                one row per value: step,name,value
    <run dir>/tracking/tags.json                  tags, as MLflow would hold them
    <run dir>/tracking/artifacts/...              copies of every logged artifact

Values are written with repr(), which round-trips a float exactly, so the file holds the numbers
MLflow holds (`tracking=[mlflow,csv]` writes both). Rows are appended as they come and flushed
with the trainer's flush() (before every checkpoint), so a killed run keeps what it logged.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import yaml

from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)

HEADER = ["step", "name", "value"]


class CsvTracker:
    """The Tracker protocol on plain files; `dir=None` writes to `<run dir>/tracking`."""

    def __init__(self, dir: str | None = None, **_ignored: Any) -> None:  # noqa: A002 (config key)
        self.dir: Path | None = Path(dir) if dir else None
        # No MLflow run behind these files: a resumed run must not claim a source's MLflow run id.
        self.run_id: str | None = None
        self._file = None
        self._writer = None
        self._lock = threading.Lock()  # log_metrics may come from callbacks' background threads

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        if self.dir is None:
            self.dir = Path(str(tags.get(T.RUN_DIR) or ".")) / "tracking"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "params.json").write_text(json.dumps(params, indent=1, default=str) + "\n")
        (self.dir / "params.yaml").write_text(yaml.safe_dump(json.loads(
            json.dumps(params, default=str)), sort_keys=False))
        self._tags: dict[str, str] = {}
        self.set_tags(tags)
        path = self.dir / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(HEADER)
        log.info("csv tracking: %s", self.dir)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        with self._lock:
            for name, value in metrics.items():
                self._writer.writerow([int(step), name, repr(float(value))])

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def rewind(self, step: int) -> None:
        """Drop the rows logged after `step` (a resumed run logs those steps again)."""
        if self._file is None:
            return
        with self._lock:
            self._file.close()
            path = self.dir / "metrics.csv"
            with path.open(newline="") as f:
                rows = [r for r in csv.reader(f)]
            kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)
            self._file = path.open("a", newline="")
            self._writer = csv.writer(self._file)

    def set_tags(self, tags: dict) -> None:
        if self.dir is None:
            return
        self._tags.update({str(k): str(v) for k, v in tags.items()})
        (self.dir / "tags.json").write_text(json.dumps(self._tags, indent=1, sort_keys=True) + "\n")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, to artifacts/<artifact_path>/."""
        if self.dir is None:
            return
        src = Path(path)
        dest = self.dir / "artifacts" / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / src.name)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._write_artifact(artifact_file, json.dumps(data, indent=1, default=str))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write_artifact(artifact_file, text)

    def log_figure(self, figure: Any, name: str) -> None:
        if self.dir is None:
            return
        file = self.dir / "artifacts" / "plots" / (name if name.endswith(".png") else f"{name}.png")
        file.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(file)

    def _write_artifact(self, artifact_file: str, text: str) -> None:
        if self.dir is None:
            return
        file = self.dir / "artifacts" / artifact_file
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)

    def end(self, status: str = "FINISHED") -> None:
        if self.dir is not None:
            self.set_tags({"status": status})
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file, self._writer = None, None


def read_metrics(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv of a CsvTracker folder as {name: [(step, value), ...]} in logged order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with (Path(folder) / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return out
