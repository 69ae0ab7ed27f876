"""A disk that fills up mid-job: a real ENOSPC from a small tmpfs the test mounts (root only;
skipped elsewhere), real training, a real sqlite MLflow store.

- a single run: one line naming the checkpoint's folder, the space it needs and what is free,
  exit 2, no traceback;
- a grid whose top job finds the disk full after its first checkpoint: the job fails with that
  line, the other jobs train and the sweep's summary is written (exit 1: not every job
  finished); the same command with space again resumes the job from its checkpoint into its
  run, and the continued sweep's groups, description and tags equal an uninterrupted sweep's
  (the top run moved to the resumed job: params could not say so, tags do).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import PYTHON
from mlxlab.sweeps.folder import JOB_FAILURE_FILE
from mlxlab.tracking import tags as T
from run_helpers import committed_steps
from test_sweep_faults import env_for, grid_args


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` for the block: a filesystem that really fills."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space(tmp_path, cli_env):
    with small_disk(tmp_path / "disk", "5m") as disk:  # one checkpoint (3.2 MB) fits, not two
        proc = subprocess.run(
            [PYTHON, "-m", "mlxlab.train", "trainer.max_epochs=1", "trainer.max_steps=4",
             "trainer.eval_every_steps=null", "checkpoint.save_every_steps=2",
             "checkpoint.save_every_minutes=null", "callbacks.progress.enabled=false",
             "model.num_layers=1", "model.num_heads=2", "data.max_length=48", "tracking=none",
             f"hydra.run.dir={disk}/run"],
            cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and lines[-1].startswith("mlxlab: error: disk full: ")
        folder = f"{disk}/run/checkpoints"
        assert f"checkpoint {folder}/step_00000004 needs " in lines[-1] and " MB free in " in lines[-1]
        assert f"resume={disk}/run" in lines[-1] and "from step_00000002" in lines[-1]
        assert committed_steps(disk / "run") == [2]  # the committed one intact


ARGS = grid_args(replicates="2") + ["optimized_metric=val/loss"]  # 4 jobs, no ties on the metric


def parent_summary(root: Path) -> dict:
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{T.ROLE}` = 'sweep'")
    tags = parent.data.tags
    kept = {k: v for k, v in tags.items() if k.startswith(("group.", "top_run.", "mlxlab.num_"))
            or k in (T.VERDICT, T.LEADER, "mlflow.note.content")}
    groups = {k: v for k, v in parent.data.metrics.items() if k.startswith(("g1/", "g2/", "top_run/"))}
    return {"status": parent.info.status, "tags": kept, "metrics": groups,
            "top": client.get_run(tags[T.TOP_RUN_ID]).data.tags[T.RUN_DIR]}


@pytest.mark.slow
def test_a_sweep_whose_top_job_fills_the_disk_continues_to_the_uninterrupted_summary(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    done = subprocess.run([PYTHON, "-m", "mlxlab.train", *ARGS, "hydra.sweep.dir=sweep"],
                          cwd=whole, env=env_for(whole), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = parent_summary(whole)
    job = Path(reference["top"]).name  # the job the disk will fail: the top run's

    root = tmp_path / "full"
    root.mkdir()
    with small_disk(root / "disk", "200m") as disk:
        cmd = [PYTHON, "-m", "mlxlab.train", *ARGS, f"hydra.sweep.dir={disk}/sweep"]
        proc = subprocess.Popen(cmd, cwd=root, env=env_for(root), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        folder, filler, deadline = disk / "sweep" / job, disk / "filler", time.monotonic() + 600
        while not committed_steps(folder):  # its first checkpoint is in: the disk fills now
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)
        assert len(committed_steps(folder)) < 4, "the job finished before the disk filled"
        with open(filler, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * (shutil.disk_usage(disk).free - 2**20))  # 1 MB left
        os.kill(proc.pid, signal.SIGCONT)
        while not (folder / JOB_FAILURE_FILE).is_file():  # it failed: space for the others
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.005)
        filler.unlink()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 1, out[-4000:]
        assert out.count("trial failed: disk full: checkpoint ") == 1, out[-4000:]
        assert "Traceback" not in out
        assert out.strip().splitlines()[-1].startswith("mlxlab: error: sweep ")
        first = parent_summary(root)  # the other jobs and the summary are there
        assert first["status"] == "FAILED" and first["tags"]["mlxlab.num_finished"] == "3"

        again = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        assert f"sweep: job {job} was killed: its run" not in again.stderr + again.stdout
        assert f"resumes from {folder}" in again.stdout + again.stderr
        continued = parent_summary(root)
        client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        resumed = client.search_runs(
            [client.get_experiment_by_name("train").experiment_id],
            f"tags.`{T.RUN_DIR}` = '{folder}'")
        assert [r.info.status for r in resumed] == ["FINISHED"]  # into its own run
        assert not {T.KILLED_AT, T.KILLED_REASON, T.RESUMABLE, T.ERROR} & set(resumed[0].data.tags)
    assert continued["status"] == "FINISHED" and continued["top"] == str(folder)
    assert continued["tags"] == reference["tags"]
    assert continued["metrics"] == reference["metrics"]
