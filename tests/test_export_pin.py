"""Exporting a run while it trains: a real training process saves a checkpoint every step and
keeps only the newest while the run is exported
again and again; every export reads a committed checkpoint whole (export/pin.py) and says the
run has not finished, in its report and its model card. Killed, the run still exports with that
note; finished, without it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import mlx_logits, torch_logits
from mlxlab.export import export_run
from mlxlab.runs import load_run_model
from run_helpers import TINY_LM, committed_steps, start

WRITING = [
    *TINY_LM, "tracking=none", "callbacks.progress.enabled=false", "trainer.batch_size=8",
    "trainer.schedule.warmup_steps=2", "trainer.log_every_steps=1",
    "trainer.eval_every_steps=1", "checkpoint.save_every_steps=1",
    "checkpoint.save_every_minutes=null", "checkpoint.keep_last_n=1",
    "checkpoint.async_write=false", "callbacks.early_stopping.patience=0",
]


def same_logits(out: Path, model) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(1, 16))
    assert np.abs(torch_logits(hf, ids) - mlx_logits(model, ids)).max() <= 1e-4


@pytest.mark.slow  # ~40 s: a training process that outlives several exports
def test_exporting_a_run_while_it_trains_and_after_it_is_killed(tmp_path, cli_env):
    env = cli_env
    run_dir = tmp_path / "writing"
    # no evaluation, so no best/: each export takes the newest step, which the next step deletes
    proc = start([*WRITING, "trainer.max_steps=100000", "trainer.eval_every_steps=100000"],
                 run_dir, env)
    try:
        deadline = time.time() + 120
        while not committed_steps(run_dir):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        steps = []
        for i in range(5):  # rotation deletes the previous step's checkpoint at every step
            report = export_run(run_dir, tmp_path / f"out{i}", "hf", "float32")
            steps.append(report["step"])
            assert report["unfinished"] and "has not finished" in report["unfinished"]
            card = (tmp_path / f"out{i}" / "README.md").read_text()
            assert "**Unfinished run.**" in card and f"step {report['step']}" in card
            assert (tmp_path / f"out{i}" / "model.safetensors").is_file()
        assert proc.poll() is None and len(set(steps)) > 1  # it trained on under the exports
        assert not list((run_dir / "checkpoints").glob(".export-pin-*"))  # no pin left behind
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # killed: its newest committed checkpoint exports, and says the run did not finish
    report = export_run(run_dir, tmp_path / "killed", "hf", "float32")
    assert report["unfinished"]
    model, _ = load_run_model(run_dir)
    same_logits(tmp_path / "killed", model)


def test_a_finished_run_exports_without_the_unfinished_note(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train

    cfg = compose_cfg(tmp_path, [*WRITING, "trainer.max_steps=3"])
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    run_dir = Path(cfg.paths.output_dir)
    assert json.loads((run_dir / "finished.json").read_text()) == {"step": 3}
    report = export_run(run_dir, tmp_path / "out", "hf", "float32")
    assert report["unfinished"] is None
    card = (tmp_path / "out" / "README.md").read_text()  # no task scores: the export's check
    assert "Unfinished run" not in card and "## Export check" in card
    # a run from before finished.json: its checkpoint at trainer.max_steps says it finished
    (run_dir / "finished.json").unlink()
    assert export_run(run_dir, tmp_path / "old", "hf", "float32")["unfinished"] is None
