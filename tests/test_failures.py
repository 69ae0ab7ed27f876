"""Failures that end: an out-of-memory from MLX becomes one line and an exit within seconds, even
when the cleanup after it hangs (as MLX on CUDA can: mlx#2821), with the committed checkpoints
intact; in a sweep the trial fails (NaN) and the next one runs. Real runs in real processes; the
GPU's error is raised by tests/failure_helpers.py (see why there)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import FAST, PYTHON
from failure_helpers import CUDA_OOM
from mlxlab.runtime.supervision import failures

TESTS = Path(__file__).resolve().parent
RUN = [*FAST, "trainer.max_steps=12", "trainer.eval_every_steps=null",
       "checkpoint.save_every_steps=4", "checkpoint.save_every_minutes=null",
       "tracking=csv"]


@pytest.mark.parametrize("message, kind", [
    ("[malloc] Unable to allocate 1099511627776 bytes.", "out of memory"),  # MLX's allocator
    ("[metal::malloc] Attempting to allocate 42949672960 bytes which is greater than the maximum "
     "allowed buffer size of 28991029248 bytes.", "out of memory"),  # Metal
    ("cudaMallocAsync(&data, size, stream) failed: out of memory", "out of memory"),  # CUDA
    (CUDA_OOM, "out of memory"),  # mlx#2821: what an H100/B200 said
    ("cudaGraphLaunch(graph, stream) failed: an illegal memory access was encountered",
     "device error"),  # what every call says after that
    ("[matmul] Last dimension of first input with shape (2,3) must match second to last "
     "dimension of second input with shape (4,5).", None),  # a bug: its traceback stays
])
def test_mlx_device_failures_are_told_from_bugs(message, kind):
    assert failures.kind_of(RuntimeError(message)) == kind


def test_an_out_of_memory_ends_the_run_with_one_line_though_its_cleanup_hangs(tmp_path, cli_env):
    env = {**cli_env, "PYTHONPATH": str(TESTS)}
    started = time.monotonic()
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *RUN, "hydra.run.dir=" + str(tmp_path / "run"),
         "+callbacks.fail={_target_: failure_helpers.FailAt, step: 6, hang: true}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    wall = time.monotonic() - started
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlxlab: error:")]
    assert errors == [out.stderr.strip().splitlines()[-1]], out.stderr[-3000:]
    assert errors[0].startswith(f"mlxlab: error: the device ran out of memory at step 6 ({CUDA_OOM}")
    assert "lower trainer.batch_size" in errors[0] and "step_00000004" in errors[0]
    assert "Traceback" not in out.stderr
    # the hang after the error cost the watchdog's allowance, not the test's timeout
    assert wall < 60 + failures.CLEANUP_S, wall
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert (checkpoint / "COMMITTED").exists()
    assert mx.load(str(checkpoint / "model.safetensors"))  # intact: it loads


def test_an_out_of_memory_fails_its_sweep_trial_and_the_sweep_goes_on(tmp_path, cli_env):
    env = {**cli_env, "PYTHONPATH": str(TESTS)}
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", "-m", *RUN, "trainer.max_steps=8",
         "+callbacks.fail={_target_: failure_helpers.FailAt, step: 6}", "seed=1,2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert text.count("trial failed: the device ran out of memory at step 6") == 2, text[-3000:]
    assert text.count("#1 : ") == 1  # Hydra launched the second trial after the first failed
