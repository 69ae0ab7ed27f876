"""callbacks=per_example_losses: each example's loss per step, in per-epoch parquet files, from the
values the step already computes; `mlxlab runs hardest` ranks them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, PYTHON
from mlxlab.objectives import losses
from mlxlab.train import train
from mlxlab.training.per_example import hardest, read_losses
from test_losses import FixedLogits, np_cross_entropy

SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "trainer.batch_size=64",
         "trainer.max_epochs=2", "trainer.max_steps=null", "trainer.eval_every_steps=null",
         "callbacks=per_example_losses"]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_every_example_once_per_epoch_and_the_step_loss_is_their_mean(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, *SMALL)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    files = sorted((run_dir / "per_example").glob("*.parquet"))
    assert [f.name for f in files] == ["epoch_0001.parquet", "epoch_0002.parquet"]
    frame = read_losses(files)
    assert list(frame.columns) == ["example_id", "epoch", "step", "loss"]  # no teacher: no column
    for epoch, rows in frame.groupby("epoch"):
        # each training row of the CSV once per epoch (713 of Titanic's 891 rows are training)
        assert rows["example_id"].is_unique and len(rows) == 713, epoch
    assert frame["example_id"].max() < 891 and frame["step"].max() == 24

    # train/loss logged at each step (log_every_steps=1) is the mean of that step's rows
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name)
                                 .experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    means = frame.groupby("step")["loss"].mean()
    assert len(logged) == 24
    for step, value in logged.items():
        assert abs(means[step] - value) < 1e-5, (step, means[step], value)
    # the files are the run's artifacts too
    names = {a.path for a in client.list_artifacts(run.info.run_id, "per_example")}
    assert names == {"per_example/epoch_0001.parquet", "per_example/epoch_0002.parquet"}

    # the CLI ranks the last epoch's losses, highest first, by folder or by MLflow run id
    top = hardest(frame, n=5)
    last = frame[frame["epoch"] == 2].set_index("example_id")["loss"]
    assert list(top.index) == list(last.sort_values(ascending=False).index[:5])
    for run_ref in (str(run_dir), run.info.run_id):
        out = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "runs", "hardest", run_ref, "-n", "3",
                              "--uri", cfg.tracking.uri], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert str(int(top.index[0])) in out.stdout.splitlines()[2], out.stdout
    bad = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "runs", "hardest", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "callbacks=per_example_losses" in bad.stderr


def test_accumulated_steps_record_every_row_of_their_micro_batches(make_cfg):
    """trainer.grad_accum=2: a step's rows are its two micro-batches' (the per-row losses are
    concatenated after the update, and evaluated there: the writer thread has no MLX stream)."""
    cfg = make_cfg(*FAST, *SMALL, "trainer.grad_accum=2", "tracking=none")
    train(cfg)
    frame = read_losses(sorted((Path(cfg.paths.output_dir) / "per_example").glob("*.parquet")))
    for epoch, rows in frame.groupby("epoch"):
        assert rows["example_id"].is_unique and len(rows) == 713, epoch
    sizes = frame.groupby("step").size()
    assert sizes.max() == 128 and len(sizes) == frame["step"].max()


def test_distillation_adds_each_examples_teacher_loss(rng):
    student, teacher = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) * 2
    labels = rng.integers(0, 3, 6)
    batch = {"input_ids": mx.zeros((6, 4), mx.int32), "labels": mx.array(labels)}
    loss_fn = losses.distillation_loss([FixedLogits(teacher)], temperature=3.0, per_example=True)
    loss, aux = loss_fn(FixedLogits(student), batch)
    np.testing.assert_allclose(np.array(aux["example_loss"]), np_cross_entropy(student, labels),
                               rtol=1e-5)
    # the teacher's own cross-entropy, recovered from its softened distribution
    np.testing.assert_allclose(np.array(aux["example_teacher_loss"]),
                               np_cross_entropy(teacher, labels), rtol=1e-4)
    plain, plain_aux = losses.distillation_loss([FixedLogits(teacher)], temperature=3.0)(
        FixedLogits(student), batch)
    assert float(plain) == float(loss) and set(plain_aux) == {"ntokens", "ce", "kl"}


def test_lm_example_loss_is_the_mean_over_its_scored_tokens(rng):
    logits = rng.normal(size=(2, 5, 7))
    labels, mask = rng.integers(0, 7, (2, 5)), np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    batch = {"input_ids": mx.zeros((2, 5), mx.int32), "labels": mx.array(labels),
             "loss_mask": mx.array(mask)}
    _, aux = losses.task_loss("lm", per_example=True)(FixedLogits(logits), batch)
    ce = np_cross_entropy(logits, labels)
    np.testing.assert_allclose(np.array(aux["example_loss"]),
                               (ce * mask).sum(1) / mask.sum(1), rtol=1e-5)


STREAM = ["experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
          "model.max_seq_len=32", "data.packing.seq_len=32", "data.tokenizer.max_vocab=512",
          "data.tokenizer_sample=200", "data.splits.max_examples=40", "data.splits.val_examples=10",
          "trainer.batch_size=4", "trainer.max_steps=10", "trainer.eval_every_steps=10",
          "trainer.log_every_steps=1", "trainer.schedule.warmup_steps=0",
          "callbacks.progress.enabled=false", "callbacks=per_example_losses", "tracking=csv"]


def test_streamed_text_windows_carry_their_documents_id(make_cfg):
    """data=streaming: each packed window is a row whose example_id is the training document
    its first scored token comes from, the same ids recomputed here from the documents' tokens;
    each step's train/loss is the mean of its rows (full windows all score seq_len tokens)."""
    from tokenizers import Tokenizer

    from mlxlab.config import instantiate
    from mlxlab.tracking.csv_files import read_metrics

    cfg = make_cfg(*STREAM, "data.shuffle_buffer=0")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    frame = read_losses(sorted((run_dir / "per_example").glob("*.parquet")))
    assert len(frame) == 40 and frame["step"].tolist() == [s for s in range(1, 11) for _ in range(4)]

    data = instantiate(cfg.data)
    data.setup(None)
    tok = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    doc_of_token = []
    for i, example in enumerate(data.source.read(data.streams.unshuffled_train())):
        if i == 40:
            break
        text = data.source.text(example)
        doc_of_token += [i] * (len(tok.encode(text, add_special_tokens=False).ids) + 1) if text else []
    windows = np.arange(40) * 32 + 1  # window w's first label: token w * seq_len + 1
    assert frame["example_id"].tolist() == [doc_of_token[t] for t in windows]
    assert frame["example_id"].nunique() > 5

    logged = dict(read_metrics(run_dir / "tracking")["train/loss"])
    for step, rows in frame.groupby("step"):
        assert abs(rows["loss"].mean() - logged[step]) < 1e-5, step
