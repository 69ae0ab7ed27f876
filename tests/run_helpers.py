"""Training runs in subprocesses, killed and resumed: what test_resume.py and test_gpu.py share.
Nothing here imports MLflow or datasets, so the GPU tests need neither."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import PYTHON

TITANIC = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
    "trainer.batch_size=64",          # 713 rows -> 12 steps an epoch
    "trainer.max_epochs=3", "trainer.schedule.warmup_steps=4", "trainer.log_every_steps=1",
    "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=3", "checkpoint.save_every_minutes=null",
]
# A language model small enough for a test: a 32-wide layer over 300 examples.
TINY_LM = [
    "experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
    "model.max_seq_len=32", "data.packing.seq_len=32", "data.tokenizer.max_vocab=256",
    "data.splits.max_examples=300", "data.splits.val_examples=20",
]
STREAMING = [
    *TINY_LM, "trainer.batch_size=8",
    "trainer.max_steps=24", "trainer.eval_every_steps=12", "trainer.log_every_steps=1",
    "trainer.schedule.warmup_steps=2", "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=3", "checkpoint.save_every_minutes=null",
]


def start(args: list[str], run_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "mlxlab.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run(args: list[str], run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    proc = start(args, run_dir, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/COMMITTED"))


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    last = max(committed_steps(run_dir))
    return {k: np.array(v) for k, v in
            mx.load(str(run_dir / "checkpoints" / f"step_{last:08d}" / "model.safetensors")).items()}



def kill_when(proc: subprocess.Popen, condition, timeout: float = 300, group: bool = False) -> None:
    """SIGKILL `proc` at the first moment `condition()` holds. The process is frozen (SIGSTOP)
    and the condition checked again before the kill, so it holds at the moment of death.
    `group`: its whole process group (a launcher and its worker processes; `proc` started
    with start_new_session=True)."""

    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill"
        if condition():
            send(signal.SIGSTOP)
            if condition():
                send(signal.SIGKILL)
                proc.wait()
                return
            send(signal.SIGCONT)
        time.sleep(0.002)
