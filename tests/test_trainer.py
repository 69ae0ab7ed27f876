"""The one training loop and its hooks, with real MLX steps on the real shipped data."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlx.utils import tree_flatten

from conftest import FAST
from mlxlab.config import instantiate
from mlxlab.data.batching import Batching
from mlxlab.launch.wiring import seed_everything
from mlxlab.objectives import losses
from mlxlab.objectives.base import ObjectiveSetup
from mlxlab.objectives.supervised.distill import Distill
from mlxlab.objectives.supervised.supervised import Supervised
from mlxlab.runs import load_teachers
from mlxlab.runtime.cluster.distributed import World
from mlxlab.train import train
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step, with_precision
from mlxlab.training.trainer import TrainingError

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.dropout=0.0"]
# test_cnn_hybrid_trains: two epochs (23 steps each) at a higher rate learn Titanic well past
# its label prior (val/loss 0.42, val/accuracy 0.81 against 0.665 and 0.618)
CNN_STEPS = ["trainer.max_epochs=2", "trainer.max_steps=46", "trainer.eval_every_steps=46",
             "optimizer.learning_rate=3e-3"]
# test_two_weighted_teachers: two teachers that disagree (another width, seed and length); the
# students' 4 steps move each a quarter closer to the teacher it weights more (KL 0.0084 vs
# 0.0106 to A, 0.0043 vs 0.0059 to B)
TEACHERS = {"a": ["model.hidden_size=32"],
            "b": ["model.hidden_size=64", "seed=7", "trainer.max_steps=8",
                  "trainer.eval_every_steps=8"]}


def adamw(learning_rate: float):
    """optimizer=adamw (bias-corrected AdamW) at a given peak learning rate."""
    return partial(default_optimizer(), learning_rate=learning_rate)


def build(make_cfg, tmp_path, *overrides):
    cfg = make_cfg(*FAST, "tracking=none", *overrides)
    data = instantiate(cfg.data)
    data.setup(tmp_path / "run")
    seed_everything(cfg.seed)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    return cfg, data, model


def distill(**settings) -> Distill:
    """objective=distill as its config node builds it: with runs.load_teachers."""
    return Distill(load_teachers=load_teachers, **settings)


def objective_loss(objective, data, model, batch_size: int = 32):
    """The loss `objective` trains `model` on `data` with, set up as a fit sets it up."""
    objective.setup(ObjectiveSetup(model=model, data=data, batching=Batching(batch_size=batch_size),
                                   world=World()))
    return objective.loss


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_grad_accumulation_equals_one_big_batch(make_cfg, tmp_path):
    _, data, model_a = build(make_cfg, tmp_path, *TINY)
    _, _, model_b = build(make_cfg, tmp_path, *TINY)
    batch = next(iter(data.train_batches(Batching(batch_size=16), 0)))
    halves = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    loss_fn = losses.task_loss("classification")
    results = []
    for model, accum, batches in ((model_a, 1, [batch]), (model_b, 2, halves)):
        settings = TrainerSettings(grad_accum=accum, grad_clip=0.5)
        opt = build_optimizer(adamw(1e-2), settings.schedule, total_steps=10)
        opt.init(model.trainable_parameters())
        loss, _, _ = make_step(model, opt, loss_fn, settings)(batches)
        results.append((loss.item(), params(model)))
    (loss_a, pa), (loss_b, pb) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    changed = False
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # and the update really moved the weights
    _, _, fresh = build(make_cfg, tmp_path, *TINY)
    changed = any(not np.array_equal(v, pa[k]) for k, v in params(fresh).items())
    assert changed


def test_same_seed_same_run(make_cfg):
    first = train(make_cfg(*FAST, "tracking=none"))
    second = train(make_cfg(*FAST, "tracking=none"))
    assert first == second
    third = train(make_cfg(*FAST, "tracking=none", "seed=7"))
    assert third != first


def test_nan_loss_is_a_clear_error_and_marks_the_run_failed(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "optimizer.learning_rate=1e12", "trainer.grad_clip=0",
                   "trainer.max_steps=30", "trainer.eval_every_steps=30", "model.hidden_size=32")
    with pytest.raises(TrainingError, match="lower optimizer.learning_rate"):
        train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.get_metric_history(runs[0].info.run_id, "train/loss")  # data kept


def test_optimized_trainer_with_dynamic_batches_and_quantization(make_cfg):
    metrics = train(make_cfg(*FAST, "tracking=none", "trainer=optimized", "model.hidden_size=64",
                             "callbacks.memory.every=1"))
    assert 0.0 <= metrics["val_q8/accuracy"] <= 1.0
    assert abs(metrics["val_q8/loss"] - metrics["val/loss"]) < 0.2


def val_labels(data) -> np.ndarray:
    return np.concatenate([np.array(b["labels"]) for b in data.val_batches(Batching(batch_size=64))])


def test_cnn_hybrid_trains(make_cfg, tmp_path):
    """The CNN hybrid learns from its inputs: on Titanic's validation rows it beats the best a
    model blind to them can do, always the majority class (accuracy) and the label prior (loss:
    its entropy), each by a margin."""
    cfg, data, _ = build(make_cfg, tmp_path, "model=cnn_hybrid", "model.cnn_filters=16")
    labels = val_labels(data)
    prior = np.bincount(labels) / len(labels)
    majority, prior_loss = prior.max(), float(-(prior * np.log(prior)).sum())
    metrics = train(make_cfg(*FAST, "tracking=none", "model=cnn_hybrid", "model.cnn_filters=16",
                             *CNN_STEPS))
    assert metrics["val/accuracy"] >= majority + 0.1, (metrics, majority)
    assert metrics["val/loss"] <= prior_loss - 0.1, (metrics, prior_loss)


def test_language_model_loss_falls(make_cfg):
    cfg = make_cfg("experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
                   "model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.max_seq_len=64",
                   "data.packing.seq_len=64", "data.tokenizer.max_vocab=512", "trainer.batch_size=8",
                   "trainer.max_steps=40", "trainer.eval_every_steps=20", "trainer.log_every_steps=5",
                   "trainer.schedule.warmup_steps=5")
    from mlxlab.config import to_container

    metrics = train(cfg)
    assert math.isfinite(metrics["val/perplexity"])
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-6)
    assert to_container(cfg)["optimized_metric"] == "val/loss"
    assert metrics["val/loss"] < math.log(512)  # better than uniform over the vocabulary


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """One finished Titanic run (8 steps) the distillation tests below share as their teacher."""
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg

    cfg = compose_cfg(tmp_path_factory.mktemp("teacher"),
                      [*FAST, "tracking=none", "trainer.max_steps=8", "trainer.eval_every_steps=8"])
    train(cfg)
    GlobalHydra.instance().clear()
    return str(cfg.paths.output_dir)


def test_distillation_from_a_finished_run(make_cfg, tmp_path, teacher_dir):
    student_cfg = make_cfg(*FAST, "experiment=distill_titanic",
                           f"objective.teachers=[{{run: '{teacher_dir}'}}]")
    student_cfg.paths.output_dir = str(tmp_path / "outputs" / "student")
    metrics = train(student_cfg)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    client = MlflowClient(student_cfg.tracking.uri)
    exp = client.get_experiment_by_name(student_cfg.tracking.experiment_name)
    run = client.search_runs([exp.experiment_id])[0]
    assert client.get_metric_history(run.info.run_id, "train/kl")
    assert client.get_metric_history(run.info.run_id, "train/ce")


def test_a_hugging_face_classifier_teaches_as_the_run_it_was_exported_from(make_cfg, tmp_path):
    """objective.teachers may name a Hugging Face folder: a run exported as a
    BertForSequenceClassification teaches a student as the run itself does (the same train/kl at
    every step); a folder without its tokenizer or whose labels are not the student's is one line
    naming that."""
    import json
    from pathlib import Path

    from mlxlab.errors import ConfigError
    from mlxlab.export import export_run
    from mlxlab.tracking.csv_files import read_metrics

    teacher_cfg = make_cfg(*FAST, "tracking=none", "trainer.max_steps=8",
                           "trainer.eval_every_steps=8", "model.norm_position=post",
                           "model.pooler=true")
    train(teacher_cfg)
    run, folder = teacher_cfg.paths.output_dir, tmp_path / "hf_teacher"
    export_run(run, folder, fmt="hf")

    def student(teacher, name: str) -> dict:
        cfg = make_cfg(*FAST, "experiment=distill_titanic", "tracking=csv",
                       f"objective.teachers=[{{run: '{teacher}'}}]")
        cfg.paths.output_dir = str(tmp_path / "outputs" / name)
        train(cfg)
        return read_metrics(Path(cfg.paths.output_dir) / "tracking")

    from_run, from_folder = student(run, "from_run"), student(folder, "from_folder")
    assert [s for s, _ in from_folder["train/kl"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(from_run["train/kl"], from_folder["train/kl"], strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)

    # without its tokenizer.json the student would train a tokenizer of its own (other ids)
    (folder / "tokenizer.json").rename(tmp_path / "teacher_tokenizer.json")
    with pytest.raises(ConfigError, match="has no tokenizer.json: .* set data.tokenizer.path="):
        student(folder, "no_tokenizer")
    (tmp_path / "teacher_tokenizer.json").rename(folder / "tokenizer.json")

    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has 3 trained labels .* the student's data has 2"):
        student(folder, "three_labels")


def test_a_hugging_face_decoder_teaches_a_student_of_its_tokenizer(make_cfg, tmp_path):
    """A Llama folder written by transformers, its embedding table padded past its tokenizer
    (600 rows, 512 ids), teaches a from-scratch student: its logits are transformers' cut to the
    tokenizer's ids, the student trains on the folder's tokenizer and logs the KL; a classifier
    student is refused in one line."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from hf_helpers import mlx_logits, save_tiny_model, torch_logits
    from mlxlab.errors import ConfigError
    from mlxlab.runs.model import load_teachers

    folder = save_tiny_model("llama", tmp_path / "llama", vocab_size=600)
    [teacher], _ = load_teachers([{"run": str(folder)}], 512, None)
    ids = np.random.default_rng(0).integers(0, 512, (2, 12))
    expected = torch_logits(AutoModelForCausalLM.from_pretrained(folder), ids)[..., :512]
    np.testing.assert_allclose(mlx_logits(teacher, ids), expected, atol=2e-4)

    cfg = make_cfg("experiment=distill_tinystories", "tracking=csv", "model.dim=32",
                   "model.num_layers=1", "model.num_heads=2", "model.max_seq_len=32",
                   "data.packing.seq_len=32", "data.splits.val_examples=10",
                   "data.splits.max_examples=100", "trainer.batch_size=4", "trainer.max_steps=3",
                   "trainer.eval_every_steps=3", "trainer.log_every_steps=1",
                   "callbacks.progress.enabled=false", f"objective.teachers=[{{run: '{folder}'}}]")
    train(cfg)
    from pathlib import Path

    from mlxlab.tracking.csv_files import read_metrics

    logged = read_metrics(Path(cfg.paths.output_dir) / "tracking")
    assert [s for s, _ in logged["train/kl"]] == [1, 2, 3]
    assert Path(cfg.data.tokenizer.path) == folder / "tokenizer.json"
    with pytest.raises(ConfigError, match="is a llama decoder but the student is a classifier"):
        load_teachers([{"run": str(folder)}], 512, 2)


def test_cached_teacher_probabilities_give_the_per_step_loss(make_cfg, tmp_path, teacher_dir):
    """The cache (one teacher pass before training) equals running the teacher in the step, for
    rows batched and padded differently, and the pass leaves the data position where it was."""
    _, data, student = build(make_cfg, tmp_path, *TINY)
    data.load_state_dict({"epoch": 0, "batches_done": 3})
    teachers = [{"run": teacher_dir}]
    cached_fn = objective_loss(distill(teachers=teachers, temperature=2.0), data, student, 16)
    assert data.state_dict() == {"epoch": 0, "batches_done": 3}
    per_step_fn = objective_loss(distill(teachers=teachers, temperature=2.0, cache_teacher=False),
                                 data, student, 16)
    student.eval()  # no dropout: the two losses see the same student
    for batch in list(data.train_batches(Batching(batch_size=7), 1))[:4]:
        (cached, aux_c), (direct, aux_d) = cached_fn(student, batch), per_step_fn(student, batch)
        assert cached.item() == pytest.approx(direct.item(), rel=1e-5)
        assert aux_c["kl"].item() == pytest.approx(aux_d["kl"].item(), rel=1e-4)


def test_distillation_loss_form_is_a_config_choice(make_cfg, tmp_path, teacher_dir):
    """objective.loss / kl_scale reach the loss: a student trains with reverse_kl and with
    mse (train/<loss> logged, cached teacher targets = the teachers run in the step), and a
    misspelled form fails at validation with one line naming the key."""
    from hydra.errors import InstantiationException

    from mlxlab.config import ConfigError, instantiate, validate
    from mlxlab.tracking.csv_files import read_metrics

    teachers = f"objective.teachers=[{{run: '{teacher_dir}'}}]"
    for form in (["objective.loss=reverse_kl", "objective.kl_scale=none"],
                 ["objective.loss=mse"]):
        cfg = make_cfg(*FAST, "tracking=csv", "experiment=distill_titanic", teachers, *form)
        name = form[0].split("=")[1]
        cfg.paths.output_dir = str(tmp_path / "outputs" / name)
        metrics = train(cfg)
        assert 0.0 <= metrics["val/accuracy"] <= 1.0
        logged = read_metrics(tmp_path / "outputs" / name / "tracking")
        assert f"train/{name}" in logged and "train/kl" not in logged
        assert all(math.isfinite(v) for _, v in logged[f"train/{name}"])

    _, data, student = build(make_cfg, tmp_path, *TINY)
    student.eval()
    batch = next(iter(data.train_batches(Batching(batch_size=7), 1)))
    for loss in ("reverse_kl", "mse"):
        teachers = [{"run": teacher_dir}]
        cached_fn = objective_loss(distill(teachers=teachers, loss=loss), data, student, 16)
        direct_fn = objective_loss(distill(teachers=teachers, loss=loss, cache_teacher=False),
                                   data, student, 16)
        (cached, aux_c), (direct, aux_d) = cached_fn(student, batch), direct_fn(student, batch)
        assert cached.item() == pytest.approx(direct.item(), rel=1e-5)
        assert aux_c[loss].item() == pytest.approx(aux_d[loss].item(), rel=1e-4)

    bad = make_cfg(*FAST, "objective=distill", "objective.kl_scale=T2")
    with pytest.raises(ConfigError, match=r"^objective.kl_scale='T2' is not one of"):
        validate(bad)  # the owner (DistillConfig) checks it: validate builds the settings
    with pytest.raises(InstantiationException) as raised:
        instantiate(bad.objective)
    assert isinstance(raised.value.__cause__, ConfigError)
    assert str(raised.value.__cause__).startswith("objective.kl_scale='T2' is not one of")


def test_distillation_rejects_a_teacher_with_other_labels(make_cfg, tmp_path, teacher_dir):
    student_cfg = make_cfg(*FAST, "tracking=none", "objective=distill", "data.label_column=Pclass",
                           "data.template=null", "data.feature_columns=[Sex,Age]",
                           f"objective.teachers=[{{run: '{teacher_dir}'}}]")
    student_cfg.paths.output_dir = str(tmp_path / "outputs" / "student")
    with pytest.raises(ValueError, match="num_labels=2 but the student's data has .*num_labels=3"):
        train(student_cfg)


@pytest.mark.parametrize(
    ("change", "expect"),
    [("model.num_layers=2", "re-initialized"), ("model.lora.rank=4", "mapped")],
)
def test_resume_into_a_changed_architecture_reports_the_mapping(make_cfg, tmp_path, caplog, change,
                                                                 expect):
    base = [o for o in FAST if not o.startswith("model.num_layers")] + ["tracking=none"]
    first = make_cfg(*base, "model.num_layers=1")
    train(first)
    key = change.split("=")[0]
    second = make_cfg(*base, *(["model.num_layers=1"] if key != "model.num_layers" else []), change,
                      f"resume={first.paths.output_dir}", "trainer.max_steps=8",
                      "trainer.eval_every_steps=8")
    second.paths.output_dir = str(tmp_path / "outputs" / "second")
    with caplog.at_level("WARNING"):
        metrics = train(second)
    assert "val/accuracy" in metrics
    assert expect in caplog.text


def test_bf16_compute_keeps_fp32_master_weights(make_cfg, tmp_path):
    _, data, model = build(make_cfg, tmp_path, *TINY)
    settings = TrainerSettings(precision="bf16", grad_clip=1.0)
    loss_fn = with_precision(objective_loss(Supervised(), data, model), settings.precision)
    opt = build_optimizer(adamw(1e-2), settings.schedule, total_steps=10)
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, loss_fn, settings)
    before = params(model)
    batches = iter(data.train_batches(Batching(batch_size=16), 0))
    losses_seen = [step([next(batches)])[0].item() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses_seen)
    after = {k: v for k, v in tree_flatten(model.parameters())}
    assert all(v.dtype == mx.float32 for v in after.values())  # masters stay fp32
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in after.items())


def mean_kl(teacher, student, batches: list[dict]) -> float:
    """KL(teacher || student) of the two models' label distributions, averaged over the rows."""
    total, rows = 0.0, 0
    for batch in batches:
        log_t = nn.log_softmax(losses.forward(teacher, batch), axis=-1)
        log_s = nn.log_softmax(losses.forward(student, batch), axis=-1)
        total += (mx.exp(log_t) * (log_t - log_s)).sum().item()
        rows += batch["labels"].shape[0]
    return total / rows


def test_two_weighted_teachers(make_cfg, tmp_path):
    """objective.teachers' weights set how much each teacher counts: two students distilled from
    the same start on the soft term alone (alpha=0), one from teachers A:0.7 B:0.3 and one from
    A:0.3 B:0.7, differ, and each is the closer of the two to the teacher it weighted more."""
    from mlxlab.runs import load_run_model

    teachers = {}
    for name, extra in TEACHERS.items():
        cfg = make_cfg(*FAST, "tracking=none", *extra)
        cfg.paths.output_dir = str(tmp_path / "outputs" / f"teacher_{name}")
        train(cfg)
        teachers[name] = cfg.paths.output_dir
    students, finals = {}, {}
    for weight_a in (0.7, 0.3):
        spec = (f"{{run: '{teachers['a']}', weight: {weight_a}}},"
                f"{{run: '{teachers['b']}', weight: {round(1 - weight_a, 1)}}}")
        cfg = make_cfg(*FAST, "tracking=none", "objective=distill", "objective.alpha=0.0",
                       f"objective.teachers=[{spec}]")
        cfg.paths.output_dir = str(tmp_path / "outputs" / f"student_a{weight_a}")
        finals[weight_a] = train(cfg)
        students[weight_a] = load_run_model(cfg.paths.output_dir, "last")[0]
    assert finals[0.7]["val/loss"] != finals[0.3]["val/loss"]  # the weights change the student

    _, data, _ = build(make_cfg, tmp_path)
    batches = list(data.val_batches(Batching(batch_size=64)))
    kl = {(w, name): mean_kl(load_run_model(run)[0], students[w], batches)
          for w in students for name, run in teachers.items()}
    assert kl[0.7, "a"] < kl[0.3, "a"], kl  # weighting A more brings the student closer to A
    assert kl[0.3, "b"] < kl[0.7, "b"], kl  # ... and B more, closer to B


def test_accumulation_keeps_an_epochs_last_micro_batches(make_cfg, tmp_path):
    # 713 rows / 32 = 23 micro-batches: 11 updates of 2 and a last update of 1
    cfg = make_cfg(*[o for o in FAST if "max_steps" not in o and "eval_every" not in o],
                   "tracking=none", "trainer.grad_accum=2", "trainer.max_steps=null")
    train(cfg)
    steps = sorted(p.name for p in (tmp_path / "outputs" / "run" / "checkpoints").glob("step_*"))
    assert steps[-1] == "step_00000012"


def test_nan_never_counts_as_better():
    from mlxlab.checkpoint import is_better

    assert is_better(0.5, None, "max") and is_better(0.5, math.nan, "max")
    assert not is_better(math.nan, 0.5, "max") and not is_better(math.nan, None, "min")
    assert is_better(0.4, 0.5, "min") and not is_better(0.5, 0.5, "max")
