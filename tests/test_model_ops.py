"""Scheduled model operations (training/model_ops.py): function-preserving growth mid-run, the
optimizer state carried over, and a SIGKILL across the growth step resumes bitwise."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlx.utils import tree_flatten

from mlxlab.models.decoders.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.runs import load_run_model
from mlxlab.train import train
from mlxlab.training.model_ops import ModelSchedule, check_schedule, grow_layers, widen_mlp
from mlxlab.training.optim import build_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step
from test_resume import (
    STREAMING,
    assert_same_history,
    assert_same_weights,
    committed_steps,
    final_state,
    kill_when,
    run,
    start,
)

LM = ["experiment=tinystories_nano", "model.dim=32", "model.num_heads=2", "model.max_seq_len=32",
      "data.packing.seq_len=32", "data.tokenizer.max_vocab=256", "data.splits.max_examples=200",
      "data.splits.val_examples=16", "trainer.batch_size=8", "trainer.schedule.warmup_steps=0",
      "callbacks.progress.enabled=false", "trainer.log_every_steps=1"]


def lm_batch(seed: int = 0, vocab: int = 64) -> dict[str, mx.array]:
    tokens = mx.random.randint(0, vocab, (4, 17), key=mx.random.key(seed))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": mx.ones((4, 16), mx.float32)}


def small_lm(num_layers: int = 2) -> Transformer:
    mx.random.seed(0)
    return Transformer(vocab_size=64, dim=32, num_layers=num_layers, num_heads=2, max_seq_len=32)


def adamw(lr: float):
    return partial(optim.AdamW, learning_rate=lr, bias_correction=True)


def train_steps(model, optimizer, n: int, settings: TrainerSettings) -> list[float]:
    step = make_step(model, optimizer, losses.task_loss("lm"), settings)
    return [step([lm_batch(k % 2)])[0].item() for k in range(n)]  # two batches, learnable


def test_identity_growth_keeps_the_loss_and_training_goes_on():
    model, settings = small_lm(2), TrainerSettings(max_steps=20)
    optimizer = build_optimizer(adamw(1e-2), settings.schedule, total_steps=20)
    optimizer.init(model.trainable_parameters())
    train_steps(model, optimizer, 5, settings)  # trained weights, non-zero moments
    loss_fn = losses.task_loss("lm")
    batch = lm_batch(0)
    before = loss_fn(model, batch)[0].item()
    moments = np.array(optimizer.state["layers"][0]["attention"]["query"]["weight"]["m"])

    schedule = ModelSchedule([{"at_step": 5, "op": "grow_layers", "num_layers": 4}])
    assert schedule.due(5) == [0] and schedule.due(4) == []

    class Quiet:
        def set_tags(self, tags): ...

        def log_metrics(self, metrics, step):
            self.logged = (metrics, step)

    tracker = Quiet()
    schedule.run_due(5, model, optimizer, tracker)
    assert len(model.layers) == 4 and model.architecture["num_layers"] == 4
    assert loss_fn(model, batch)[0].item() == before  # the same function, bit for bit
    assert tracker.logged[1] == 6 and tracker.logged[0]["model/ops_done"] == 1
    # the old layers kept their moments, the new ones start fresh; the step count goes on
    kept = np.array(optimizer.state["layers"][0]["attention"]["query"]["weight"]["m"])
    np.testing.assert_array_equal(kept, moments)
    assert not np.any(np.array(optimizer.state["layers"][3]["attention"]["query"]["weight"]["m"]))
    assert optimizer.state["step"].item() == 5

    out_before = np.array(model.layers[3].attention.out.weight)
    assert not out_before.any()
    losses_after = train_steps(model, optimizer, 8, settings)  # a step rebuilt over the new model
    assert np.isfinite(losses_after).all()
    assert np.array(model.layers[3].attention.out.weight).any()  # the new layers learn
    assert loss_fn(model, batch)[0].item() < before


def test_copy_growth_widening_dropout_and_lora_unfreeze():
    model = small_lm(2)
    grow_layers(model, 3, init="copy")  # a stack: the new top layer is a copy of the top one
    np.testing.assert_array_equal(np.array(model.layers[2].mlp.up.weight),
                                  np.array(model.layers[1].mlp.up.weight))
    batch = lm_batch(1)
    before = losses.task_loss("lm")(model, batch)[0].item()
    widen_mlp(model, 192)
    assert model.layers[0].mlp.up.weight.shape == (192, 32)
    assert losses.task_loss("lm")(model, batch)[0].item() == pytest.approx(before, abs=1e-6)

    dropped = Transformer(vocab_size=64, dim=32, num_layers=1, num_heads=2, dropout=0.5)
    x = lm_batch(2)["input_ids"]
    assert not np.array_equal(np.array(dropped(x)), np.array(dropped(x)))  # dropout on
    ModelSchedule([{"at_step": 0, "op": "set_dropout", "p": 0.0}]).apply(dropped, 0)
    np.testing.assert_array_equal(np.array(dropped(x)), np.array(dropped(x)))

    lora = Transformer(vocab_size=64, dim=32, num_layers=1, num_heads=2,
                       lora={"rank": 2, "targets": ["query"]})
    names = dict(tree_flatten(lora.trainable_parameters()))
    assert "layers.0.attention.query.linear.weight" not in names
    ModelSchedule([{"at_step": 0, "op": "unfreeze_lora_base"}]).apply(lora, 0)
    assert "layers.0.attention.query.linear.weight" in dict(tree_flatten(lora.trainable_parameters()))


@pytest.mark.parametrize("bad", [
    [{"at_step": 3, "op": "shrink"}], [{"op": "grow_layers", "num_layers": 4}],
    [{"at_step": 3, "op": "grow_layers"}], [{"at_step": 3, "op": "set_dropout", "p": 0, "q": 1}],
])
def test_bad_schedule_entries_are_named(bad):
    with pytest.raises(ValueError, match=r"trainer.model_schedule\[0\]"):
        check_schedule(bad)


def test_growth_mid_run_is_logged_checkpointed_and_reloads(make_cfg, tmp_path):
    sched = "[{at_step: 4, op: grow_layers, num_layers: 2, init: identity}]"
    cfg = make_cfg(*LM, "model.num_layers=1", "trainer.max_steps=8", "trainer.eval_every_steps=4",
                   f"+trainer.model_schedule={sched}",
                   f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    state = final_state(run_dir)
    assert state["model_ops"]["done"] == [0]
    model, best = load_run_model(run_dir)  # rebuilt from the config, grown, loaded strictly
    assert len(model.layers) == 2 and best.step == 8  # best/ is a grown checkpoint
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [r] = client.search_runs([client.get_experiment_by_name("tinystories_nano").experiment_id])
    [(step, count)] = [(m.step, m.value) for m in
                       client.get_metric_history(r.info.run_id, "model/num_parameters")]
    assert step == 5 and count == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert "grow_layers num_layers=2" in r.data.tags["mlxlab.model_op.0"]


@pytest.mark.slow
def test_sigkill_across_the_growth_step_resumes_bitwise(tmp_path, cli_env):
    """Killed after the growth step (a checkpoint of the grown model) and, separately, before it:
    both resumes end bitwise equal to the uninterrupted run, metric history included."""
    args = [*STREAMING, "model.num_layers=1", "trainer.max_steps=24",
            "+trainer.model_schedule=[{at_step: 10, op: grow_layers, num_layers: 2}]"]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    assert final_state(reference)["model_ops"]["done"] == [0]
    for name, kill_after in (("after", 12), ("before", 6)):
        killed = tmp_path / f"killed-{name}"
        proc = start(args, killed, cli_env)
        kill_when(proc, lambda d=killed, k=kill_after: any(s >= k for s in committed_steps(d)))
        assert max(committed_steps(killed)) < 24
        resumed = tmp_path / f"resumed-{name}"
        run([*args, f"resume={killed}"], resumed, cli_env)
        assert_same_weights(reference, resumed, name)
        assert_same_history(uri, reference, resumed, name)
