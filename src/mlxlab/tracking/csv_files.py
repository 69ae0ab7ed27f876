"""CsvTracker: a run's tracking data as plain files in its run folder (`tracking=csv`).

    <run dir>/tracking/params.yaml, params.json   the resolved config, nested
    <run dir>/tracking/metrics.csv                one row per value: step,name,value
    <run dir>/tracking/tags.json                  tags, as MLflow would hold them
    <run dir>/tracking/artifacts/...              copies of every logged artifact

Values are written with repr(), which round-trips a float exactly, so the file holds the numbers
MLflow holds (`tracking=[mlflow,csv]` writes both). Rows are appended as they come and flushed
with the trainer's flush() (before every checkpoint), so a killed run keeps what it logged.

A resumed run continues the killed run's record, as MLflow continues its run id: the trainer
calls `continue_from(<killed run's folder>, <checkpoint step>)` before `start`, and `start` copies
that folder's params, tags, artifacts and the metric rows up to the checkpoint's step (the later
ones are logged again by the resumed run) into the new folder.
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
from mlxlab.tracking.base import BaseTracker

log = logging.getLogger(__name__)

HEADER = ["step", "name", "value"]


class CsvTracker(BaseTracker):
    """The Tracker protocol on plain files; `dir=None` writes to `<run dir>/tracking`."""

    def __init__(self, dir: str | None = None, **_ignored: Any) -> None:  # noqa: A002 (config key)
        self.dir: Path | None = Path(dir) if dir else None
        # No MLflow run behind these files: a resumed run must not claim a source's MLflow run id.
        self.run_id: str | None = None
        self._file = None
        self._writer = None
        self._lock = threading.Lock()  # log_metrics may come from callbacks' background threads
        self._source: tuple[Path, int] | None = None  # (killed run's tracking folder, step)

    def continue_from(self, source_run_dir: str | Path, step: int) -> None:
        """The run resumes `source_run_dir`'s checkpoint of `step`: carry its record (at start)."""
        # tracking.csv.dir given (self.dir is set before start only then): the killed run, resumed
        # with the same settings, wrote its record there too, not in <its run dir>/tracking
        record = self.dir if self.dir is not None else Path(source_run_dir) / "tracking"
        self._source = (record, int(step))

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        if self.dir is None:
            self.dir = Path(str(tags.get(T.RUN_DIR) or ".")) / "tracking"
        self.dir.mkdir(parents=True, exist_ok=True)
        carried = self._carry_over()
        self._tags: dict[str, str] = dict(carried.get("tags", {}))
        self._tags.pop("status", None)  # the killed run's end; this run sets its own at its end
        if not carried.get("params"):
            self._write_params(params)
        self.set_tags(tags)
        path = self.dir / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(HEADER)
        if carried.get("same_folder"):  # tracking.csv.dir names one folder for both runs
            self.rewind(self._source[1])
        log.info("csv tracking: %s", self.dir)

    def _write_params(self, params: dict) -> None:
        (self.dir / "params.json").write_text(json.dumps(params, indent=1, default=str) + "\n")
        (self.dir / "params.yaml").write_text(yaml.safe_dump(json.loads(
            json.dumps(params, default=str)), sort_keys=False))

    def _carry_over(self) -> dict:
        """Copy the resumed run's record into this folder: its params (write-once, as MLflow's:
        a resume's changed settings are in its `resume.changed.*` tags), its artifacts, its
        metric rows up to the checkpoint's step; returns what was carried."""
        if self._source is None:
            return {}
        source, step = self._source
        if source.resolve() == self.dir.resolve():
            return {"same_folder": True, "params": True,
                    "tags": _read_json(source / "tags.json")}
        if not (source / "metrics.csv").is_file():
            log.info("csv tracking: %s holds no metrics.csv; this run's record starts here", source)
            return {}
        rows = [HEADER] + [r for r in _rows(source / "metrics.csv") if r[0] <= step]
        with (self.dir / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        params = False
        for name in ("params.json", "params.yaml"):
            if (source / name).is_file():
                shutil.copy2(source / name, self.dir / name)
                params = True
        if (source / "artifacts").is_dir():
            shutil.copytree(source / "artifacts", self.dir / "artifacts", dirs_exist_ok=True)
        log.info("csv tracking: continued %s (%d metric rows up to step %d)", source,
                 len(rows) - 1, step)
        return {"params": params, "tags": _read_json(source / "tags.json")}

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
            kept = [HEADER] + [r for r in _rows(path) if r[0] <= step]
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

    def summary(self) -> list[str]:
        return [f"csv files:  {self.dir}"] if self.dir else []

    def end(self, status: str = "FINISHED") -> None:
        if self.dir is not None:
            self.set_tags({"status": status})
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file, self._writer = None, None


def _rows(path: Path) -> list[list]:
    """metrics.csv's rows as [step, name, value] (header skipped). A row cut short by a SIGKILL
    mid-write (only ever after the last flush, so after the last checkpoint) is dropped."""
    out = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if len(row) == 3 and row[0].isdigit() and row[2]:
                out.append([int(row[0]), row[1], row[2]])
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a killed run may not have written it, or only in part
        return {}


def read_metrics(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv of a CsvTracker folder as {name: [(step, value), ...]} in logged order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with (Path(folder) / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return out
