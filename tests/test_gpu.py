"""On a GPU: a training step, bf16, a resume, LoRA. Marked `gpu`: they run where MLX's default
device is a GPU (`pytest -m gpu` on the GPU machine, benchmarks/README.md) and are skipped elsewhere
(conftest.py). Each writes what it measured to $MLXLAB_GPU_REPORT (JSON lines) when set, for
docs/benchmarks.md's GPU section: the determinism figures (same process, two processes, a SIGKILLed
run's resume) come from here."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import FAST, GPU_RTOL, REPO, compose_cfg, same_array
from run_helpers import TITANIC, committed_steps, final_weights, kill_when, run, start

pytestmark = pytest.mark.gpu


def report(test: str, **figures) -> None:
    line = json.dumps({"test": test, **figures})
    print(line)
    if os.environ.get("MLXLAB_GPU_REPORT"):
        with open(os.environ["MLXLAB_GPU_REPORT"], "a") as f:
            f.write(line + "\n")


def weight_gap(a: dict, b: dict) -> tuple[bool, float, dict]:
    """(bitwise equal, largest relative difference ||x - y|| / ||y|| over the tensors, and where:
    the worst tensor's name and norm, the median gap, how many tensors are bitwise equal). The
    2026-11-25 H100 window failed here with a gap of 1.1 and no name: the next one says which."""
    gaps = {k: float(np.linalg.norm(a[k].astype(np.float64) - b[k]) /
                     max(np.linalg.norm(b[k].astype(np.float64)), 1e-30)) for k in a}
    worst = max(gaps, key=gaps.get)
    where = {"worst_tensor": worst, "worst_norm": float(np.linalg.norm(b[worst])),
             "median_gap": float(np.median(list(gaps.values()))),
             "bitwise_tensors": f"{sum(np.array_equal(a[k], b[k]) for k in a)}/{len(a)}"}
    return all(np.array_equal(a[k], b[k]) for k in a), gaps[worst], where


def test_a_training_step_runs_on_the_gpu(tmp_path, caplog):
    from mlxlab.train import train

    assert mx.default_device().type == mx.DeviceType.gpu
    with caplog.at_level(logging.INFO, logger="mlxlab"):
        metrics = train(compose_cfg(tmp_path, [*FAST, "tracking=none"]))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("device: "))
    assert line.startswith("device: gpu, ") and "off on the GPU" in line
    assert math.isfinite(metrics["val/loss"])
    report("train_step", device=line, val_loss=metrics["val/loss"])


def tiny_llama(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    from tiny_hf_model import save_tiny_llama_without_torch

    return save_tiny_llama_without_torch(folder)


# The shipped prompt/completion pairs: no `datasets` needed on the GPU machine.
FINETUNE = ["experiment=finetune_completions", "tracking=none", "trainer.max_steps=20",
            "trainer.eval_every_steps=20", "callbacks.progress.enabled=false"]


def test_bf16_language_model_trains_on_the_gpu(tmp_path):
    from mlxlab.train import train

    cfg = compose_cfg(tmp_path, [*FINETUNE, f"model.pretrained={tiny_llama(tmp_path / 'llama')}",
                                 "model.lora.rank=0", "trainer.precision=bf16",
                                 "optimizer.learning_rate=1e-3"])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    report("bf16_lm", val_loss=metrics["val/loss"])


def test_runs_repeat_and_resume_to_the_gpu_tolerance(tmp_path, cli_env):
    """The same config twice (two processes) and a SIGKILLed run resumed, against one
    uninterrupted run: bitwise on the CPU (test_resume.py); here, what holds is reported and
    the tolerance (conftest.GPU_RTOL) asserted."""
    args = [*TITANIC, "tracking=none"]
    reference, again = tmp_path / "reference", tmp_path / "again"
    run(args, reference, cli_env)
    run(args, again, cli_env)
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 7 for s in committed_steps(killed)))
    run([*args, f"resume={killed}"], resumed, cli_env)
    base = final_weights(reference)
    two_processes, resume = weight_gap(final_weights(again), base), weight_gap(
        final_weights(resumed), base)
    report("determinism", two_processes_bitwise=two_processes[0],
           two_processes_rel_gap=two_processes[1], two_processes_where=two_processes[2],
           resume_bitwise=resume[0], resume_rel_gap=resume[1], resume_where=resume[2],
           tolerance=GPU_RTOL)
    for key in base:
        assert same_array(final_weights(resumed)[key], base[key]), key


def test_lora_fine_tunes_a_llama_on_the_gpu(tmp_path):
    from mlxlab.train import train

    cfg = compose_cfg(tmp_path, [*FINETUNE, f"model.pretrained={tiny_llama(tmp_path / 'llama')}"])
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    report("lora", val_loss=metrics["val/loss"])
    assert Path(cfg.paths.output_dir, "checkpoints", "best").is_dir()
