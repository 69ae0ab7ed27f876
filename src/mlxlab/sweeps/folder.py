"""What a multirun tells its jobs: files in the sweep folder, never the environment.

The sweep callback (callback.py) writes the sweep's files before any job starts, in the
process that launches the jobs; a job reads them where it runs: in that process (Hydra's basic
launcher), in worker processes started before or after (joblib), or on other hosts sharing the
sweep folder (submitit, Ray). Hydra tells each job where its sweep folder and its own folder are
(HydraConfig), so nothing else has to.

  <sweep dir>/.mlxlab_swept_keys.json  the keys the multirun varies (a JSON list): run names
  <sweep dir>/.mlflow_parent_run_id    the sweep's MLflow parent run: each job's run is its child
  <sweep dir>/.mlxlab_command          the command that continues the sweep (a stopped job's hint)
  <sweep dir>/.mlxlab_stopped          the sweep stopped by a signal (its name): the parent ends KILLED
  <job dir>/.mlflow_run_ids            the MLflow runs the job's trackers started (or resumed),
                                       one id a line, in order: the callback logs the job's
                                       outcome on the last one, or records a job that made none
  <job dir>/.mlxlab_job_failure        why the job failed (train.py's NaN carries no reason):
                                       the callback puts it on the job's MLflow runs
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxlab.tracking.run_info import JOB_RUNS_FILE  # the tracker writes the list (record_job_run)

if TYPE_CHECKING:  # omegaconf is imported where it is used: the tracking process never needs it
    from omegaconf import DictConfig

PARENT_ID_FILE = ".mlflow_parent_run_id"
SWEPT_KEYS_FILE = ".mlxlab_swept_keys.json"
COMMAND_FILE = ".mlxlab_command"
STOPPED_FILE = ".mlxlab_stopped"
JOB_FAILURE_FILE = ".mlxlab_job_failure"  # in a job's folder: why the job failed (one line)


@dataclass(frozen=True)
class SweepJob:
    """One multirun job's view of its sweep."""

    sweep_dir: Path
    job_dir: Path
    parent_run_id: str | None  # None: no MLflow parent run (tracking without MLflow, or it failed)
    swept_keys: tuple[str, ...]


def sweep_dir_of(hydra: DictConfig) -> Path:
    """The sweep folder a composed `hydra` node names, absolute (relative to the launch folder)."""
    from omegaconf import OmegaConf

    cwd = OmegaConf.select(hydra, "runtime.cwd", default=None) or os.getcwd()
    return (Path(cwd) / str(hydra.sweep.dir)).resolve()


def job_of(hydra: DictConfig) -> SweepJob:
    """The sweep facts of the job whose `hydra` node this is (its runtime.output_dir set)."""
    sweep_dir = sweep_dir_of(hydra)
    swept = sweep_dir / SWEPT_KEYS_FILE
    return SweepJob(
        sweep_dir=sweep_dir,
        job_dir=Path(str(hydra.runtime.output_dir)),
        parent_run_id=read_parent_run(sweep_dir),
        swept_keys=tuple(json.loads(swept.read_text())) if swept.is_file() else (),
    )


def current_job() -> SweepJob | None:
    """This process's multirun job, from Hydra's job context; None outside a multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or OmegaConf.select(hydra, "runtime.output_dir") is None:
        return None
    return job_of(hydra)


def swept_keys_here() -> tuple[str, ...]:
    """The keys this process's multirun job varies (none outside one): its run's name."""
    job = current_job()
    return job.swept_keys if job is not None else ()


def tracker_arguments(job: SweepJob | None, tracking: Any) -> dict[str, str]:
    """What an MLflow tracker of this job is handed (its `parent_run_id`, `sweep_job_dir`):
    none outside a multirun job, none for a `tracking` node without MLflow, and none the node
    names itself. Read here, in the job's process, so a tracker in a child process gets them
    as arguments and no tracker reads the sweep folder."""
    from mlxlab.tracking.mlflow.store import builds_mlflow

    if job is None or not builds_mlflow(tracking):
        return {}
    found = {"sweep_job_dir": str(job.job_dir)}
    if job.parent_run_id:
        found["parent_run_id"] = job.parent_run_id
    return {k: v for k, v in found.items() if tracking.get(k) is None}


def begin_sweep(
    sweep_dir: Path, swept_keys: list[str], keep_parent: bool = False, command: str = ""
) -> None:
    """Before any job: the swept keys and the command that continues the sweep written, an
    earlier start's stop removed, a reused folder's parent run id removed (kept for a sweep
    started again in its folder: it continues that parent run)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not keep_parent:
        (sweep_dir / PARENT_ID_FILE).unlink(missing_ok=True)
    (sweep_dir / STOPPED_FILE).unlink(missing_ok=True)
    (sweep_dir / SWEPT_KEYS_FILE).write_text(json.dumps(swept_keys))
    (sweep_dir / COMMAND_FILE).write_text(command)


def continue_in(config: DictConfig, sweep_dir: Path) -> None:
    """Make the launch about to start use `sweep_dir`, an earlier start's sweep folder: each
    job's folder is then the one its earlier try trained in (and checkpointed). Hydra composes
    every job's config again from the multirun's `hydra.overrides.hydra` (the launcher's
    load_sweep_config), so the folder goes there too, not only into this config."""
    from omegaconf import open_dict, read_write

    quoted = "'" + str(sweep_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = str(sweep_dir)
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted}")


def sweep_command(sweep_dir: Path) -> str | None:
    """The command that continues the sweep in `sweep_dir` (None: not written)."""
    path = Path(sweep_dir) / COMMAND_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def signal_name(exit_code: int) -> str:
    """SIGTERM for 143: a stop's exit code is 128 + its signal."""
    try:
        return signal.Signals(exit_code - 128).name
    except ValueError:
        return "a signal"


def record_stop(sweep_dir: Path, exit_code: int) -> None:
    """The sweep was stopped by a signal (a grid's job that saved and left, or the search's
    own process): the launcher's parent run ends KILLED, not FAILED (parent.py, at exit). The
    one way a stop reaches the parent, for grids and searches, whatever the launcher."""
    (Path(sweep_dir) / STOPPED_FILE).write_text(signal_name(exit_code))


def stopped_by(sweep_dir: Path) -> str | None:
    path = Path(sweep_dir) / STOPPED_FILE
    return (path.read_text().strip() or "a signal") if path.is_file() else None


def read_parent_run(sweep_dir: Path) -> str | None:
    """The parent run id a sweep folder holds (a search's folder keeps it across starts)."""
    path = Path(sweep_dir) / PARENT_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def write_parent_run(sweep_dir: Path, run_id: str) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_ID_FILE).write_text(run_id)


def clear_job_files(job_dir: Path) -> None:
    """At a job's start: a job run again in the same folder (a continued sweep, a search's
    restart) starts a new list of runs and has no failure yet."""
    (Path(job_dir) / JOB_RUNS_FILE).unlink(missing_ok=True)
    (Path(job_dir) / JOB_FAILURE_FILE).unlink(missing_ok=True)


def job_runs(job_dir: Path) -> list[str]:
    """The runs the job's trackers started, in order."""
    path = Path(job_dir) / JOB_RUNS_FILE
    return path.read_text().split() if path.is_file() else []


def write_job_failure(job_dir: Path, reason: str) -> None:
    """Why this job failed, for its MLflow run (train.py returns NaN to the sweeper, which
    carries no reason)."""
    (Path(job_dir) / JOB_FAILURE_FILE).write_text(reason[:5000])


def read_job_failure(job_dir: Path) -> str | None:
    path = Path(job_dir) / JOB_FAILURE_FILE
    return path.read_text() if path.is_file() else None
