"""Losses whose rows are each other's negatives (MNRL, CachedMNRL, CoSENT, a MatryoshkaLoss over
one) compute on the whole batch: split into accumulation steps, micro-batches or data-parallel
ranks, each part would see only its own rows as negatives, a different loss. So a split is one
line before any run folder, and a run that runs out of memory is not restarted at half the
micro-batch (its parent ends it with its line instead)."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import compose_cfg, config_refusal
from embedder_fixtures import write_tiny_folder
from mlxlab.objectives.embedding.mnrl import ranking_loss
from mlxlab.runtime import settings

FAST = ["experiment=embed_retrieval", "tracking=none", "callbacks.progress.enabled=false",
        "trainer.batch_size=16", "trainer.eval_every_steps=4", "trainer.log_every_steps=2",
        "trainer.schedule.warmup_steps=0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "st")


def test_halves_of_a_batch_are_another_loss():
    """Why: 8 rows' MNRL against the mean of its two halves' (each half's negatives only)."""
    rng = np.random.default_rng(0)
    queries, docs = (mx.array(rng.normal(size=(8, 16)).astype(np.float32)) for _ in range(2))
    whole = float(ranking_loss([queries, docs], 20.0, ("query_to_doc",), "joint"))
    halves = np.mean([float(ranking_loss([queries[s], docs[s]], 20.0, ("query_to_doc",),
                                         "joint")) for s in (slice(0, 4), slice(4, 8))])
    assert abs(whole - halves) > 0.5, (whole, halves)


def refusal(tmp_path, *overrides: str) -> str | None:
    return config_refusal(tmp_path, ["experiment=embed_retrieval", *overrides])


@pytest.mark.parametrize("overrides, says", [
    (["trainer.grad_accum=2"], "trainer.grad_accum=2 splits each step's batch"),
    (["trainer.micro_batch=8"], "trainer.micro_batch=8 computes the batch of 32 in parts"),
    (["trainer.micro_batch=auto"], "trainer.micro_batch=auto computes the batch"),
    (["objective=cached_mnrl", "trainer.grad_accum=4"], "CachedMultipleNegativesRankingLoss"),
    (["objective=matryoshka", "trainer.grad_accum=2"], "MatryoshkaLoss ranks each row"),
])
def test_a_split_batch_is_one_line_before_a_run_folder(tiny, tmp_path, overrides, says):
    line = refusal(tmp_path, f"model.pretrained={tiny}", *overrides)
    assert line is not None and says in line and "objective=cached_mnrl" in line, line


def test_the_whole_batch_and_per_row_losses_pass(tiny, tmp_path):
    assert refusal(tmp_path, f"model.pretrained={tiny}", "trainer.micro_batch=32") is None
    assert refusal(tmp_path, f"model.pretrained={tiny}", "objective=cached_mnrl",
                   "trainer.batch_size=64", "objective.mini_batch_size=8") is None


def test_data_parallel_ranks_are_refused_tensor_parallel_is_not(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_RANK", "0")
    settings.reload()
    try:
        line = refusal(tmp_path, f"model.pretrained={tiny}")
        assert line is not None and "data-parallel ranks each compute their share" in line
        assert "data-parallel" not in (refusal(tmp_path, f"model.pretrained={tiny}",
                                               "trainer.distributed.mode=tensor") or "")
    finally:
        monkeypatch.delenv("MLX_RANK")
        settings.reload()


def test_an_out_of_memory_does_not_restart_an_in_batch_loss(tiny, tmp_path, monkeypatch):
    """The plan the run reports to its supervising parent says it can't be split."""
    from mlxlab.train import train

    shared = tmp_path / "supervisor"
    shared.mkdir()
    monkeypatch.setenv("MLXLAB_SUPERVISOR", str(shared))
    monkeypatch.setenv("MLXLAB_SUPERVISOR_PID", str(os.getppid()))
    settings.reload()
    try:
        cfg = compose_cfg(tmp_path / "run", [*FAST, f"model.pretrained={tiny}",
                                             "trainer.max_steps=1", "data.eval_dir=null",
                                             "optimized_metric=val/loss"])
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
        monkeypatch.delenv("MLXLAB_SUPERVISOR")
        monkeypatch.delenv("MLXLAB_SUPERVISOR_PID")
        settings.reload()
    plan = json.loads((shared / "run.json").read_text())
    assert plan["micro_batch"] == 16 and plan["restartable"] is False
