"""The objective interface (objectives/base.py): an objective the loop has never heard of,
written here, trains on the one loop through `objective=` alone, making its own batches (as GRPO
does), keeping its own state in every checkpoint, logging and tagging through the interface,
and a run of it resumed from a mid-run checkpoint is bitwise the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from conftest import FAST
from mlxlab.errors import ConfigError
from mlxlab.objectives import losses
from mlxlab.objectives.base import (
    MetricSpec,
    Objective,
    ObjectiveSetup,
    check_objective,
    pack_array,
    unpack_array,
)
from mlxlab.objectives.supervised.supervised import Supervised
from mlxlab.objectives.validation import evaluate_cross_entropy
from mlxlab.train import train
from run_helpers import committed_steps, final_weights
from test_csv_tracking import assert_same_csv_metrics


class Repeating(Objective):
    """Makes its own batches from the data's: each data batch is trained `passes` times (GRPO's
    num_iterations), each pass with rows dropped by a mask drawn from its own numpy generator
    (GRPO's sampling). What decides the next batch (the batch in hand, the passes done, the
    generator) is in its state, never in the generator's locals."""

    def __init__(self, passes: int = 2, keep: float = 0.75, seed: int = 0) -> None:
        if passes < 1:
            raise ConfigError(f"objective.passes must be >= 1, got {passes}")
        self.passes, self.keep, self.seed = passes, keep, seed
        self.pending: dict[str, np.ndarray] | None = None
        self.done = 0
        self.made_since_log = 0
        self.rng = np.random.default_rng(seed)
        self._loss = None

    def setup(self, setup: ObjectiveSetup) -> dict[str, str]:
        self._loss = losses.task_loss(setup.data.task)
        return {"test.objective.passes": str(self.passes)}  # the run's tags

    def train_batches(self, data: Any, batching: Any, epoch: int, model: Any):
        source = iter(data.train_batches(batching, epoch))
        while True:
            if self.pending is None:  # a restored batch in hand is trained first
                batch = next(source, None)
                if batch is None:
                    return
                self.pending, self.done = {k: np.array(v) for k, v in batch.items()}, 0
            keep = self.rng.random(len(self.pending["labels"])) < self.keep
            keep[0] = True  # a row always counts
            made = {k: mx.array(v) for k, v in self.pending.items()}
            made["loss_mask"] = mx.array(keep.astype(np.float32))
            self.done += 1
            self.made_since_log += 1
            if self.done == self.passes:
                self.pending = None
            yield made

    def plan(self, grad_accum: int) -> int:
        return self.passes

    def loss(self, model, batch):
        return self._loss(model, batch)

    def evaluate(self, model, data, batching, world=None, prefix="val", step=None):
        return evaluate_cross_entropy(model, data, batching, world, prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return Supervised.metrics(kind)

    def logs(self) -> dict[str, float]:
        made, self.made_since_log = self.made_since_log, 0
        return {"made_batches": float(made)}

    def state_dict(self) -> dict:
        pending = None if self.pending is None else {k: pack_array(v)
                                                     for k, v in self.pending.items()}
        return {"pending": pending, "done": self.done, "made_since_log": self.made_since_log,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        pending = state["pending"]
        self.pending = None if pending is None else {k: unpack_array(v)
                                                     for k, v in pending.items()}
        self.done, self.made_since_log = state["done"], state["made_since_log"]
        self.rng.bit_generator.state = state["rng"]


OBJECTIVE = ["objective._target_=test_objectives.Repeating", "~objective.label_smoothing",
             "~objective.head_chunk", "+objective.passes=2"]
ARGS = [*FAST, *OBJECTIVE, "tracking=csv", "trainer.max_steps=12", "trainer.eval_every_steps=6",
        "trainer.log_every_steps=3", "checkpoint.save_every_steps=3",
        "checkpoint.save_every_minutes=null", "checkpoint.keep_last_n=5"]


def state_of(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())


def test_an_objective_the_loop_never_named_makes_its_batches_and_resumes_bitwise(make_cfg,
                                                                                 tmp_path):
    """`objective._target_=<a class of this file>` trains on the loop unchanged: two passes of
    each data batch (the plan counts them: 12 steps), its logs as train/<key> at each logged
    step, its tags on the run, its state (the batch in hand after a first pass, the generator)
    in every checkpoint; resumed from step 3's checkpoint, taken between a data batch's two
    passes, the weights, every logged value and the objective's state equal the uninterrupted
    run's to the bit."""
    from mlxlab.tracking.csv_files import read_metrics

    cfg = make_cfg(*ARGS)
    cfg.paths.output_dir = str(tmp_path / "whole")
    metrics = train(cfg)
    whole = tmp_path / "whole"
    assert 0.0 <= metrics["val/accuracy"] <= 1.0 and max(committed_steps(whole)) == 12
    logged = read_metrics(whole / "tracking")
    assert logged["train/made_batches"] == [(3, 3.0), (6, 3.0), (9, 3.0), (12, 3.0)]
    assert [s for s, _ in logged["val/accuracy"]] == [6, 12]
    tags = json.loads((whole / "tracking" / "tags.json").read_text())
    assert tags.get("test.objective.passes") == "2", tags
    in_hand = state_of(whole, 3)["objective"]  # data batch 2 after its first pass
    assert in_hand["done"] == 1 and in_hand["pending"] is not None
    assert state_of(whole, 6)["objective"]["pending"] is None  # batch 3 after its second

    cfg = make_cfg(*ARGS, f"resume={whole / 'checkpoints' / 'step_00000003'}")
    cfg.paths.output_dir = str(tmp_path / "resumed")
    train(cfg)
    resumed = tmp_path / "resumed"
    expected, got = final_weights(whole), final_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key
    assert_same_csv_metrics(whole / "tracking", resumed / "tracking")
    assert state_of(resumed, 12)["objective"] == state_of(whole, 12)["objective"]


def test_a_part_that_is_not_an_objective_is_one_line():
    with pytest.raises(TypeError, match="dict is not an objective of mlxlab"):
        check_objective({})


def test_arrays_in_an_objectives_state_come_back_to_the_bit():
    for array in (np.float32([1 / 3, -0.0, 1e-38, np.inf]), np.arange(6, dtype=np.int32).reshape(2, 3),
                  mx.array([0.1, 0.2], dtype=mx.float32)):
        packed = json.loads(json.dumps(pack_array(array)))
        back = unpack_array(packed)
        original = np.array(array)
        assert back.dtype == original.dtype and back.shape == original.shape
        assert back.tobytes() == original.tobytes()
    assert pack_array(None) is None and unpack_array(None) is None


def test_a_resume_trains_the_checkpoints_objective(make_cfg, tmp_path):
    """`resume=<run>` alone (no objective named) continues with the objective the run trained:
    the objective node is a trained setting the checkpoint's config rebuilds, as the model is."""
    cfg = make_cfg(*FAST, *OBJECTIVE, "tracking=none")
    cfg.paths.output_dir = str(tmp_path / "first")
    train(cfg)
    assert state_of(tmp_path / "first", 4)["objective"]["done"] == 2
    cfg = make_cfg(*FAST, "tracking=none", "trainer.max_steps=6", f"resume={tmp_path / 'first'}")
    cfg.paths.output_dir = str(tmp_path / "second")
    train(cfg)
    # the resume trains a new config (the checkpoint's); the one composed here is left as it is
    assert cfg.objective._target_ == "mlxlab.objectives.supervised.supervised.Supervised"
    assert state_of(tmp_path / "second", 6)["objective"]["done"] == 2  # Repeating's state


@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=dpo_chat", "model.pretrained=/a/folder", "objective=supervised"],
     "^preference pairs train with a preference objective: set objective=dpo, objective=orpo "
     "or objective=reward"),
    (["experiment=kto_chat", "model.pretrained=/a/folder", "objective=supervised"],
     "^completions rated good or bad train with objective=kto"),
    (["objective=dpo"], "^objective Preference does not train on classification data"),
    (["objective=distill", "optimized_metric=val/rewards/accuracy"],
     r"^optimized_metric='val/rewards/accuracy' is not computed for classification data by "
     r"objective Distill: choose one of \['val/loss', 'val/accuracy'"),
])
def test_an_objective_on_data_it_does_not_train_on_is_one_line_before_anything_is_built(
        make_cfg, overrides, message):
    from mlxlab.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))
