"""The background checkpoint writer: same files as a synchronous save, one save in flight,
errors surface on the training thread, and a SIGKILL during a background write is harmless."""

from __future__ import annotations

import errno
import logging
import signal
import subprocess
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import mlxlab.checkpoint as ckpt
from conftest import PYTHON
from mlxlab.checkpoint import CheckpointManager, check_committed, load_checkpoint
from mlxlab.training.async_writer import CheckpointWriter


def model_and_optimizer(seed: int = 0, width: int = 16):
    mx.random.seed(seed)
    model, opt = nn.Linear(width, width), optim.AdamW(1e-2)
    opt.init(model.trainable_parameters())
    return model, opt


def train_one(model, opt) -> None:
    x = mx.random.normal((4, model.weight.shape[1]))
    _, grads = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())(model)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)


class SlowWrites:
    """Holds every safetensors write until released, so a test sees a save in flight."""

    def __init__(self, monkeypatch):
        self.release, self.started = threading.Event(), threading.Event()
        real = ckpt.atomic._write_safetensors

        def held(path, arrays):
            self.started.set()
            assert self.release.wait(30), "the test never released the write"
            real(path, arrays)

        monkeypatch.setattr(ckpt.atomic, "_write_safetensors", held)


def test_background_save_matches_the_state_at_the_step_not_later(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    train_one(model, opt)
    expected = {k: np.array(v) for k, v in model.parameters().items()}
    slow = SlowWrites(monkeypatch)
    writer = CheckpointWriter(CheckpointManager(tmp_path, keep_last_n=2))
    path = writer.save(model, opt, {"step": 1})
    assert slow.started.wait(10) and writer.busy  # the step returned while the write goes on
    for _ in range(3):  # training goes on and changes the weights
        train_one(model, opt)
    slow.release.set()
    writer.wait()
    assert check_committed(path) is None
    fresh, _ = model_and_optimizer(seed=1)
    load_checkpoint(path, fresh)
    for key, value in fresh.parameters().items():
        assert np.array_equal(np.array(value), expected[key]), key


def test_one_save_in_flight_wait_or_skip(tmp_path, monkeypatch, caplog):
    model, opt = model_and_optimizer()
    slow = SlowWrites(monkeypatch)
    skipper = CheckpointWriter(CheckpointManager(tmp_path / "skip"), when_busy="skip")
    skipper.save(model, opt, {"step": 1})
    assert slow.started.wait(10)
    with caplog.at_level(logging.INFO, logger="mlxlab.training.async_writer"):
        assert skipper.save(model, opt, {"step": 2}) is None
    assert "step 2 skipped: step 1 is still being written" in caplog.text
    threading.Timer(0.3, slow.release.set).start()
    start = time.perf_counter()
    forced = skipper.save(model, opt, {"step": 3}, force=True)  # final saves are never skipped
    assert time.perf_counter() - start >= 0.2
    skipper.wait()
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == [
        "step_00000001", forced.name]

    waiter = CheckpointWriter(CheckpointManager(tmp_path / "wait"))
    waiter.save(model, opt, {"step": 1})
    with caplog.at_level(logging.INFO, logger="mlxlab.training.async_writer"):
        waiter.save(model, opt, {"step": 2})
    assert "step 2 waits for step 1" in caplog.text
    waiter.wait()
    assert [p.name for p in CheckpointManager(tmp_path / "wait").list_committed()] == [
        "step_00000002", "step_00000001"]
    with pytest.raises(ValueError, match="when_busy"):
        CheckpointWriter(CheckpointManager(tmp_path), when_busy="later")


def test_a_failed_background_write_raises_on_the_training_thread(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    writer = CheckpointWriter(CheckpointManager(tmp_path))
    writer.save(model, opt, {"step": 1})
    writer.wait()

    def full_disk(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.atomic, "_write_safetensors", full_disk)
    writer.save(model, opt, {"step": 2})
    with pytest.raises(OSError, match="step_00000002.*intact") as info:
        writer.wait()
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    writer.save(model, opt, {"step": 3})
    writer.close()  # cleanup paths log the error instead of raising it over another one


# A model big enough that a background write takes a while, so the kill lands inside one.
KILL_DURING_WRITE = [
    "model.hidden_size=128", "model.num_layers=2", "model.num_heads=4",
    "trainer.batch_size=64", "trainer.max_epochs=1", "trainer.schedule.warmup_steps=4",
    "trainer.log_every_steps=1", "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=1", "checkpoint.save_every_minutes=null",
    "checkpoint.keep_last_n=2",
]
LAST = 12  # 713 rows / 64


def committed(run_dir) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step_*/COMMITTED"))


def weights(run_dir) -> dict:
    last = max(committed(run_dir))
    path = run_dir / "checkpoints" / f"step_{last:08d}" / "model.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def train(args, run_dir, env) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "mlxlab.train", *args, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_during_a_background_write_then_resume_is_bitwise_identical(tmp_path, cli_env):
    reference = tmp_path / "reference"
    out = train(KILL_DURING_WRITE, reference, cli_env).communicate(timeout=600)
    assert max(committed(reference)) == LAST, out[1][-2000:]

    killed = tmp_path / "killed"
    proc = train(KILL_DURING_WRITE, killed, cli_env)
    deadline = time.time() + 300
    # Kill while a background write is in flight: a temp dir exists after a first commit.
    while not (committed(killed) and list((killed / "checkpoints").glob(".tmp-step_*"))):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list((killed / "checkpoints").iterdir())
    assert any(p.name.startswith(".tmp-") for p in left), "the kill missed the write"
    for path in killed.glob("checkpoints/step_*"):  # what the kill interrupted is not committed
        assert (check_committed(path) is None) == (path / "COMMITTED").exists()
    assert max(committed(killed)) < LAST

    resumed = tmp_path / "resumed"
    out = train([*KILL_DURING_WRITE, f"resume={killed}"], resumed, cli_env).communicate(timeout=600)
    assert max(committed(resumed)) == LAST, out[1][-2000:]
    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key
