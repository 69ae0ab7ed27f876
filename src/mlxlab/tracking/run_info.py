"""What a training run says about itself: its name, its tags, its dataset, its closing lines.

train.py wires the parts; these are the facts it hands the tracker and prints, read from the
composed config and Hydra's job context (the command line's overrides; a multirun job's swept
keys are given by train.py, which reads the sweep folder), from git, and from the data module.
It also keeps the job folder's list of the runs a job's trackers started (`record_job_run`,
written by the tracker in whichever process it runs; sweeps/folder.py reads it).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlxlab.tracking import tags as T
from mlxlab.tracking.source import source_tags


def task_overrides() -> list[str]:
    """The command line's overrides of this Hydra job (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task or [])


def hydra_context(cfg: Any) -> tuple[Path, dict[str, str], bool]:
    """The run folder, the chosen config-group options (as `choice.*` tags) and whether this is
    a multirun's job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = Path(cfg.paths.output_dir)
    if not HydraConfig.initialized():
        return run_dir, {}, False
    hc = HydraConfig.get()
    choices = {f"{T.CHOICE_PREFIX}{k}": str(v) for k, v in hc.runtime.choices.items()
               if not k.startswith("hydra")}
    return run_dir, choices, hc.mode == RunMode.MULTIRUN


def run_name(cfg: Any, swept: Sequence[str] = ()) -> str:
    """tracking.run_name, else `<task_name>-<MMDD-HHMMSS>` plus the overrides of a multirun job
    that set the `swept` keys (`train-1122-093012 model.hidden_size=64 optimizer.learning_rate=3e-4`)."""
    given = cfg.tracking.get("run_name")
    if given:
        return str(given)
    name = f"{cfg.task_name}-{time.strftime('%m%d-%H%M%S')}"
    overrides = [str(o).lstrip("+~") for o in task_overrides()]
    shown = [o for o in overrides if o.split("=", 1)[0] in swept]
    return " ".join([name, *shown])[:250]


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout holding `folder`, if any (2 s at most, never raises)."""
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: Any, choices: Mapping[str, str], run_hash: str, run_dir: Path,
             resumed_from: Path | None = None, extra: Mapping[str, str] | None = None) -> dict:
    """The run's tags: config-group choices, config hash, folder, task, overrides, Source and
    command line, git commit, the run it resumed, `extra` (e.g. a search trial's), then the
    user's own `tags.*`, which win."""
    tags = {
        **choices,
        T.CONFIG_HASH: run_hash,
        T.RUN_DIR: str(run_dir),
        T.TASK_NAME: cfg.task_name,
        T.OVERRIDES: " ".join(task_overrides()),
        **source_tags(),  # Source: mlxlab-train / mlxlab train, and the command line as typed
        **(extra or {}),
    }
    commit = git_commit(Path(__file__).parent)  # the code that trained, not the data's folder
    if commit:
        tags[T.GIT_COMMIT] = commit
    if resumed_from is not None:  # the run folder (or checkpoint) this run goes on from
        tags[T.RESUMED_FROM] = str(resumed_from)
    return {**tags, **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}}


def describe_dataset(data: Any) -> tuple[str, str, str, int | None] | None:
    """(name, source, digest, rows) of a file-backed dataset, for the run's MLflow input."""
    path = Path(str(data.path or ""))  # DataModule.path: None unless read from one file
    if not path.is_file():
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    rows = data.examples
    return path.stem, str(path.resolve()), digest, len(rows) if rows is not None else None


def track_dataset(tracker: Any, data: Any) -> None:
    """The run's MLflow input: a file-backed dataset's name, source, digest and rows."""
    dataset = describe_dataset(data)
    if dataset is not None:
        tracker.set_dataset(*dataset)


def summary_lines(result: Any, tracker: Any) -> list[str]:
    """The end of a run: the best checkpoint's metrics, rounded, and where to look."""
    metrics = dict(result.metrics)
    step = metrics.pop("best_step", None)
    where = f"best checkpoint, step {int(step)}" if step is not None else "best checkpoint"
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    if not shown:  # e.g. streamed text with data.splits.val_examples=0
        where, shown = "none", "no validation data"
    return [f"validation ({where}): {shown}", f"run dir:    {result.run_dir}", *tracker.summary()]


JOB_RUNS_FILE = ".mlflow_run_ids"


def record_job_run(job_dir: str | Path, run_id: str) -> None:
    """Add a run a tracker of this job started, to <job dir>/.mlflow_run_ids (one id a line):
    the sweep callback logs the job's outcome on the last one (sweeps/folder.py job_runs)."""
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(job_dir) / JOB_RUNS_FILE, "a") as f:
        f.write(run_id + "\n")
