"""Runs that are killed or stopped resume as if nothing had happened (real subprocesses)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON

TITANIC = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
    "trainer.batch_size=64",          # 713 rows -> 12 steps an epoch
    "trainer.max_epochs=3", "trainer.warmup_steps=4", "trainer.log_every_steps=1",
    "trainer.early_stopping.patience=0", "trainer.progress=false",
    "trainer.checkpoint.save_every_steps=3", "trainer.checkpoint.save_every_minutes=null",
]
STREAMING = [
    "experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
    "model.max_seq_len=32", "data.seq_len=32", "data.tokenizer.max_vocab=256",
    "data.max_examples=300", "data.val_examples=20", "trainer.batch_size=8",
    "trainer.max_steps=24", "trainer.eval_every_steps=12", "trainer.log_every_steps=1",
    "trainer.warmup_steps=2", "trainer.progress=false",
    "trainer.checkpoint.save_every_steps=3", "trainer.checkpoint.save_every_minutes=null",
]


def start(args: list[str], run_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "mlxlab.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run(args: list[str], run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    proc = start(args, run_dir, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/COMMITTED"))


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    last = max(committed_steps(run_dir))
    return {k: np.array(v) for k, v in
            mx.load(str(run_dir / "checkpoints" / f"step_{last:08d}" / "model.safetensors")).items()}


def run_id_of(run_dir: Path) -> str:
    import json

    last = max(committed_steps(run_dir))
    return json.loads((run_dir / "checkpoints" / f"step_{last:08d}" / "state.json").read_text())["run_id"]


def loss_history(uri: str, run_id: str) -> dict[int, float]:
    """train/loss by step of one MLflow run; a step logged twice (re-run after resume) must agree."""
    by_step: dict[int, float] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"):
        assert by_step.setdefault(m.step, m.value) == m.value, f"step {m.step} logged twice, differently"
    return by_step


@pytest.mark.parametrize(
    ("name", "args", "kill_after"),
    [("titanic-mid-epoch", TITANIC, 5),  # the default run keeps one; the others are slow
     pytest.param("titanic-next-epoch", TITANIC, 15, marks=pytest.mark.slow),
     pytest.param("streaming", STREAMING, 7, marks=pytest.mark.slow)],
)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, cli_env, name, args, kill_after):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)

    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    deadline = time.time() + 300
    while not any(s >= kill_after for s in committed_steps(killed)):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(committed_steps(killed)) < max(committed_steps(reference))

    resumed = tmp_path / "resumed"
    run([*args, f"resume={killed}"], resumed, cli_env)
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), f"{name}: {key} differs after resume"
    assert run_id_of(resumed) == run_id_of(killed)  # the resumed run appends to the killed one
    assert loss_history(uri, run_id_of(resumed)) == loss_history(uri, run_id_of(reference))


def test_sigterm_checkpoints_marks_killed_and_resume_auto_finishes(tmp_path, cli_env):
    args = [*TITANIC, "trainer.checkpoint.save_every_steps=null", "trainer.max_epochs=40",
            "task_name=sigterm"]
    run_dir = tmp_path / "outputs" / "sigterm" / "first"
    run_dir.parent.mkdir(parents=True)
    proc = start(args, run_dir, cli_env)
    while not (run_dir / "checkpoints").is_dir():  # the first epoch-end checkpoint
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received" in err
    stopped_at = max(committed_steps(run_dir))
    assert stopped_at % 12 != 0 or stopped_at > 12  # the emergency checkpoint, not only epoch ends

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("sigterm")
    [killed_run] = client.search_runs([exp.experiment_id])
    assert killed_run.info.status == "KILLED"

    again = tmp_path / "outputs" / "sigterm" / "second"
    out = run([*args, "trainer.max_epochs=4", "resume=auto"], again, cli_env)
    assert max(committed_steps(again)) == 48
    [finished] = client.search_runs([exp.experiment_id])
    assert finished.info.run_id == killed_run.info.run_id
    assert finished.info.status == "FINISHED"
    assert finished.data.tags.get("resume.changed.trainer.max_epochs") == "40 -> 4"
    assert "resume: trainer.max_epochs changed" in out.stdout + out.stderr
