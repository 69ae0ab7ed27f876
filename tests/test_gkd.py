"""On-policy distillation (objective=gkd): the generalized JSD and its gradient equal TRL's
`GKDTrainer.generalized_jsd_loss` (trl 1.16, its own function on torch CPU), the objective's
loss is that divergence on the completion tokens of the rows it makes (the student's samples
with probability lmbda, the dataset's completions otherwise), a teacher with another tokenizer
is refused before anything is built, and the objective's state carries a killed run's next
batches to the bit. Tiny random Llamas (transformers-written): a teacher and a student of one
tokenizer. The loop-level runs (a real MLflow store, SIGKILL + resume) are at the end."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hf_helpers import save_tiny_model
from mlxlab.data.batching import Batching
from mlxlab.data.prompts import PromptRows
from mlxlab.errors import ConfigError
from mlxlab.objectives.base import ObjectiveSetup
from mlxlab.objectives.supervised.gkd import GKD
from mlxlab.objectives.supervised.gkd_loss import generalized_jsd, log_probs
from mlxlab.runs import load_teachers
from mlxlab.runtime.cluster import distributed

torch = pytest.importorskip("torch")
trl_gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

B, T, V = 3, 6, 11


# --- the divergence equals TRL's ---------------------------------------------------------------


def trl_jsd(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, beta: float,
            temperature: float) -> tuple[float, np.ndarray]:
    """TRL's GKDTrainer.generalized_jsd_loss (batchmean over the labels not -100): the loss and
    its gradient wrt the student's logits."""
    s = torch.tensor(student, requires_grad=True)
    loss = trl_gkd.GKDTrainer.generalized_jsd_loss(
        s, torch.tensor(teacher), labels=torch.tensor(labels), beta=beta,
        temperature=temperature)
    loss.backward()
    return loss.item(), s.grad.numpy()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_the_divergence_and_its_gradient_equal_trls(beta, temperature):
    rng = np.random.default_rng(3)
    student = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    teacher = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), np.float32)
    mask[:, :2] = 0  # the prompt's positions
    mask[1, 4:] = 0  # a shorter completion's padding
    labels[mask == 0] = -100
    want, want_grad = trl_jsd(student, teacher, labels, beta, temperature)

    def ours(x):
        return generalized_jsd(x, log_probs(mx.array(teacher), temperature), mx.array(mask),
                               beta, temperature)[0]

    got = ours(mx.array(student)).item()
    grad = np.array(mx.grad(ours)(mx.array(student)))
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert np.abs(want_grad[mask == 0]).max() == 0 and np.abs(want_grad).sum() > 0
    assert want > 0


# --- tiny teacher and student --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny random Llama student, a wider teacher of the same tokenizer, a Qwen2 (another
    tokenizer); 60 sums with their answers as completions (a few rows without one)."""
    root = tmp_path_factory.mktemp("gkd")
    student = save_tiny_model("llama", root / "student", seed=0)
    teacher = save_tiny_model("llama", root / "teacher", seed=1, hidden_size=96)
    other = save_tiny_model("qwen2", root / "other", seed=2)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)}
            for a in range(6) for b in range(10)]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    partial = [dict(r) for r in rows[:12]]
    for r in partial[::3]:
        r.pop("completion")
    (root / "partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    return {"student": student, "teacher": teacher, "other": other, "root": root,
            "sums": root / "sums.jsonl", "partial": root / "partial.jsonl"}


def prompt_data(tiny: dict, file: str = "sums", **kwargs) -> PromptRows:
    data = PromptRows(str(tiny[file]),
                      tokenizer={"path": str(tiny["student"] / "tokenizer.json")}, **kwargs)
    data.setup(None)
    return data


def student_model(tiny: dict, data: PromptRows, rank: int = 4):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    mx.random.seed(0)
    return MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(tiny["student"]),
                        lora={"rank": rank, "targets": ["query", "value"]} if rank else None)


def objective(tiny, data, model, **kwargs) -> GKD:
    settings = {"max_new_tokens": 4, "teachers": [{"run": str(tiny["teacher"])}], **kwargs}
    gkd = GKD(**settings, load_teachers=load_teachers)
    gkd.tags = gkd.setup(ObjectiveSetup(model=model, data=data, batching=Batching(batch_size=4),
                                        world=distributed.World()))
    return gkd


def as_numpy(batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}


def test_a_draft_sure_of_a_wrong_token_still_learns_under_forward_kl(make_cfg):
    """Where the student puts all its mass on a token the teacher never says (a draft whose
    logits ran away: a margin of ~100, as SmolLM2's first blocks reached after a few steps at
    1e-3), the JSD's gradient underflows to nothing (the run then stands still, its validation
    loss the same to the bit at every evaluation), and forward KL's is p_student - p_teacher:
    experiment=draft_model trains by forward KL (beta=0)."""
    student = mx.array([[[0.0, 120.0, 0.0, 0.0]]])
    teacher = log_probs(mx.array([[[30.0, 0.0, 0.0, 0.0]]]), 1.0)
    mask = mx.ones((1, 1))

    def gradient(beta: float) -> np.ndarray:
        return np.array(mx.grad(lambda s: generalized_jsd(s, teacher, mask, beta, 1.0)[0])(student))

    assert np.abs(gradient(0.5)).max() < 1e-30
    assert np.abs(gradient(0.0)).max() == pytest.approx(1.0, abs=1e-6)
    cfg = make_cfg("experiment=draft_model", "model.pretrained=x")
    assert cfg.objective.beta == 0.0 and cfg.model.freeze_embeddings is True


def test_a_draft_trains_on_the_fine_tunes_own_chat_data(tmp_path, make_cfg):
    """experiment=draft_model on a fine-tune's data=chat rows: the file is the user's alone (no
    arithmetic validation file or `answer` column carried over from another experiment), and a
    chat that ends with the assistant's reply is that reply's prompt with the reply as its
    completion."""
    import json

    from mlxlab.data.prompts import read_prompts

    cfg = make_cfg("experiment=draft_model", "model.pretrained=x", "data.train_file=chat.jsonl")
    assert cfg.data.train_file == "chat.jsonl" and cfg.data.val_file is None
    assert cfg.objective.completion_key == "completion"
    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}]
    chat.write_text(json.dumps({"messages": turns}) + "\n"
                    + json.dumps({"messages": turns[:2]}) + "\n")
    rows = read_prompts(chat, "prompt", "messages")
    assert rows.format == "chat"
    assert rows.rows[0][1] == {"messages": turns[:2], "completion": "Hello."}
    assert rows.rows[1][1] == {"messages": turns[:2]}  # a prompt without a reply stays one


def test_the_loss_is_trls_on_the_completion_tokens_of_the_rows_it_makes(tiny):
    """A batch of 8 prompts at lmbda = 0.5: some completed by the student (its samples), the
    others by the dataset (the answer and the end-of-text token); the objective's loss and its
    gradient wrt the student's logits are TRL's function on the two models' logits with the
    prompt and padding positions labelled -100."""
    data = prompt_data(tiny)
    model = student_model(tiny, data)
    gkd = objective(tiny, data, model, lmbda=0.5, beta=0.5, temperature=0.8)
    batch = next(iter(gkd.train_batches(data, Batching(batch_size=8), 0, model)))
    logs = gkd.logs()
    assert 0 < logs["on_policy_fraction"] < 1 and "completions/mean_length" in logs
    assert gkd.logs() == {}
    nb = as_numpy(batch)
    _, ids, columns = data.prompts("train", np.arange(len(data.train)))
    dataset_rows = 0
    for r in range(8):
        prompt_len = int(np.argmax(nb["loss_mask"][r] > 0)) + 1
        completion = nb["labels"][r][nb["loss_mask"][r] > 0]
        text = data.tokenizer.decode(nb["input_ids"][r][:prompt_len].tolist())
        answer = str(eval(text.removesuffix("=").strip()))
        want = data.encode_completions([answer])[0][:4]
        dataset_rows += completion.tolist() == want.tolist()
    assert 0 < dataset_rows < 8
    model.eval()
    student = model(batch["input_ids"])
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    teacher_model = MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(tiny["teacher"]))
    teacher = np.array(teacher_model(batch["input_ids"]))
    labels = np.where(nb["loss_mask"] > 0, nb["labels"], -100)
    want, want_grad = trl_jsd(np.array(student), teacher, labels, 0.5, 0.8)
    got, aux = gkd.loss(model, batch)
    assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want))
    assert aux["ntokens"].item() == nb["loss_mask"].sum()
    grad = mx.grad(lambda z: generalized_jsd(z, gkd._teacher_logps(batch), batch["loss_mask"],
                                             0.5, 0.8)[0])(student)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-4, atol=1e-6)


def test_lmbda_0_trains_on_the_dataset_and_1_on_the_students_samples(tiny):
    data = prompt_data(tiny)
    model = student_model(tiny, data)
    off = objective(tiny, data, model, lmbda=0.0)
    batch = as_numpy(next(iter(off.train_batches(data, Batching(batch_size=4), 0, model))))
    assert off.logs() == {"on_policy_fraction": 0.0}
    eot = data.eot_id
    for r in range(4):
        completion = batch["labels"][r][batch["loss_mask"][r] > 0]
        assert completion[-1] == eot or len(completion) == 4
    on = objective(tiny, data, model, lmbda=1.0)
    next(iter(on.train_batches(data, Batching(batch_size=4), 0, model)))
    assert on.logs()["on_policy_fraction"] == 1.0


def test_the_gradient_reaches_the_adapters_and_not_the_teacher(tiny):
    data = prompt_data(tiny)
    model = student_model(tiny, data)
    gkd = objective(tiny, data, model, lmbda=1.0, beta=0.0)
    batch = next(iter(gkd.train_batches(data, Batching(batch_size=4), 0, model)))
    (loss, aux), grads = nn.value_and_grad(model, gkd.loss)(model, batch)
    adapters = {n: float(mx.abs(g).sum()) for n, g in tree_flatten(grads) if "lora_b" in n}
    assert adapters and all(v > 0 for v in adapters.values()), adapters
    assert loss.item() > 0 and set(aux) == {"ntokens"}


def test_a_quantized_teacher_and_several_weighted_teachers_train_the_student(tiny, tmp_path):
    """A teacher folder mlx_lm.convert quantized to 4 bits (its layers stay QuantizedLinear)
    beside the float one, weighted 3:1: the loss is the divergence to their mixture, finite,
    with a gradient."""
    from mlx_lm import convert

    quantized = tmp_path / "teacher-q4"
    convert(str(tiny["teacher"]), str(quantized), quantize=True, q_group_size=32, q_bits=4)
    data = prompt_data(tiny)
    model = student_model(tiny, data)
    gkd = objective(tiny, data, model, lmbda=0.5, teachers=[
        {"run": str(quantized), "weight": 3.0}, {"run": str(tiny["teacher"]), "weight": 1.0}])
    assert gkd.weights == [0.75, 0.25] and gkd.tags["mlxlab.distill.teacher_weights"] == \
        "[0.75, 0.25]"
    batch = next(iter(gkd.train_batches(data, Batching(batch_size=4), 0, model)))
    (loss, _), grads = nn.value_and_grad(model, gkd.loss)(model, batch)
    assert np.isfinite(loss.item()) and loss.item() > 0
    assert any(float(mx.abs(g).sum()) > 0 for n, g in tree_flatten(grads) if "lora_b" in n)
    q, = load_teachers([{"run": str(quantized)}], data.vocab_size, None)[0]
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in q.named_modules())


def test_rows_without_a_completion_and_bad_settings_are_one_config_error(tiny):
    data = prompt_data(tiny, "partial")
    model = student_model(tiny, data)
    with pytest.raises(ConfigError, match=r"partial.jsonl: \d+ prompt rows \(line \d+ first\) "
                       r"have no 'completion' string"):
        objective(tiny, data, model, lmbda=0.5)
    objective(tiny, data, model, lmbda=1.0)  # on-policy only: no completion needed
    with pytest.raises(ConfigError, match=r"objective.lmbda=1.5 must be in \[0, 1\]"):
        GKD(teachers=["t"], lmbda=1.5)
    with pytest.raises(ConfigError, match="objective=gkd needs a teacher"):
        GKD(teachers=[])
    with pytest.raises(ConfigError, match="objective.max_new_tokens must be >= 1"):
        GKD(teachers=["t"], max_new_tokens=0)


def test_the_validation_loss_uses_the_dataset_and_the_students_greedy_completions(tiny):
    """Rows with a completion are scored on it; one without on the student's greedy one; the
    same model evaluates to the same bits twice (no sampling key consumed)."""
    data = prompt_data(tiny, "partial", val_file=str(tiny["partial"]))
    model = student_model(tiny, data)
    gkd = objective(tiny, data, model, lmbda=1.0)
    first = gkd.evaluate(model, data, Batching(batch_size=5)).metrics
    again = gkd.evaluate(model, data, Batching(batch_size=3)).metrics
    assert set(first) == {"val/loss"} and first["val/loss"] > 0
    assert first["val/loss"] == pytest.approx(again["val/loss"], rel=1e-5)


def test_the_state_carries_the_next_batches_to_the_bit(tiny):
    """Stopped after 3 batches, restored from its state.json (JSON, as checkpoints keep it) and
    the data's position: the next batches (coins, samples, dataset rows) equal the run that
    went on."""
    data = prompt_data(tiny)
    batching = Batching(batch_size=4)
    model = student_model(tiny, data)

    def run(gkd, data, n):
        return [as_numpy(b) for _, b in zip(range(n), gkd.train_batches(data, batching, 0,
                                                                        model))]

    through = run(objective(tiny, data, model, lmbda=0.5), data, 7)
    data_a = prompt_data(tiny)
    stopped = objective(tiny, data_a, model, lmbda=0.5)
    run(stopped, data_a, 3)
    state, data_state = json.loads(json.dumps(stopped.state_dict())), data_a.state_dict()
    data_b = prompt_data(tiny)
    data_b.load_state_dict(data_state)
    resumed = objective(tiny, data_b, model, lmbda=0.5)
    resumed.load_state_dict(state)
    rest = run(resumed, data_b, 4)
    assert len(rest) == 4
    for a, b in zip(rest, through[3:]):
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


# --- the run: validation, the loop, MLflow ------------------------------------------------------


def gkd_args(tiny: dict, *extra: str) -> list[str]:
    """experiment=gkd_arithmetic on the tiny Llamas: 4 prompts a step, half on-policy."""
    return [
        "experiment=gkd_arithmetic",
        f"model.pretrained={tiny['student']}",
        f"objective.teachers=[{{run: {tiny['teacher']}}}]",
        f"data.train_file={tiny['sums']}",
        "data.val_file=null",
        "model.lora.rank=4",
        "objective.lmbda=0.5",
        "objective.completion_key=completion",
        "objective.log_completions=3",
        "optimizer.learning_rate=3e-3",
        "trainer.batch_size=4",
        "trainer.max_steps=6",
        "trainer.eval_every_steps=3",
        "trainer.log_every_steps=1",
        "callbacks.progress.enabled=false",
        *extra,
    ]


def test_a_teacher_of_another_tokenizer_is_refused_before_anything_is_built(tiny, make_cfg,
                                                                           tmp_path):
    """A Qwen2 teacher for a Llama student: one ConfigError line from config.validate, no run
    folder, no tracked run."""
    from mlxlab.train import train

    cfg = make_cfg(*gkd_args(tiny, f"objective.teachers=[{{run: {tiny['other']}}}]"))
    with pytest.raises(ConfigError) as info:
        train(cfg)
    line = str(info.value)
    assert "\n" not in line and f"teacher {tiny['other']} and the student tokenize " \
        "differently" in line and "must share a tokenizer" in line
    assert not list(tmp_path.glob("outputs/**/*.json")) and not (tmp_path / "mlruns").exists()


def peak_of_a_step(tiny, tmp_path, rows: int, max_new_tokens: int) -> float:
    """MLX's peak memory of one step as trainer.micro_batch=auto measures it (micro_batch.probe)
    on GKD's probe batch of `rows` prompts."""
    from mlxlab.training.micro_batch import Fitting, probe
    from mlxlab.training.optim import default_optimizer
    from mlxlab.training.settings import TrainerSettings

    data = prompt_data(tiny)
    model = student_model(tiny, data)
    gkd = objective(tiny, data, model, max_new_tokens=max_new_tokens)
    fit = Fitting(model, data, gkd.loss, gkd.probe_batch, TrainerSettings(batch_size=rows),
                  distributed.World(), None, default_optimizer(), tmp_path, None, {}, {})
    return probe(fit, rows, 1)


def test_micro_batch_auto_measures_the_completions_gkd_makes_and_trains(tiny, make_cfg,
                                                                        tmp_path):
    """trainer.micro_batch=auto under objective=gkd (refused before: the probe stepped on the
    data's batches, prompt positions alone): the probe is GKD's own batch, each prompt with a
    completion of max_new_tokens and the teacher run in the loss, so a longer completion
    measures more at the same rows; a run picks its micro-batch by it and trains."""
    from mlxlab.runs import load_run_model
    from mlxlab.train import train

    assert peak_of_a_step(tiny, tmp_path, 4, 24) > peak_of_a_step(tiny, tmp_path, 4, 4) > 0
    cfg = make_cfg(*gkd_args(tiny, "trainer.micro_batch=auto", "trainer.max_steps=2",
                             "trainer.eval_every_steps=2", "tracking=none"))
    train(cfg)
    _, state = load_run_model(Path(cfg.paths.output_dir), "last")
    plan = state.config["batch_plan"]
    assert plan["chosen_by"] == "auto" and plan["micro_batch"] * plan["grad_accum"] == 4, plan
    measured = [float(t.split(":")[1].removesuffix("GB")) for t in plan["tried"].split(", ")]
    assert [t.split(":")[0] for t in plan["tried"].split(", ")] == ["1", "2", "4"], plan
    assert all(m > 0 for m in measured) and measured == sorted(measured), plan
    assert state.step == 2


TRL_METRICS = ("loss", "on_policy_fraction", "completions/mean_length",
               "completions/clipped_ratio")


@pytest.mark.slow  # ~1 min on 2 loaded cores (train + eval task + export)
def test_a_gkd_run_logs_its_metrics_samples_and_exports(tiny, make_cfg, tmp_path):
    """The one loop, a real MLflow store: TRL's metrics each step, val/loss at each evaluation,
    the student's samples as artifacts, an eval task scored, and an exported folder."""
    from mlxlab.export import export_run
    from test_grpo import finished_run, sums_task

    task = sums_task(tmp_path / "sums_task.jsonl")
    cfg = make_cfg(*gkd_args(tiny, f"eval.tasks=[{task}]", "eval.max_new_tokens=3"))
    client, run, history = finished_run(cfg)
    for key in TRL_METRICS:
        assert len(history(f"train/{key}")) >= 3, key
    assert len(history("val/loss")) == 2
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "gkd_samples")]
    assert samples == ["gkd_samples/step_00000003.jsonl", "gkd_samples/step_00000006.jsonl"]
    local = client.download_artifacts(run.info.run_id, samples[-1])
    rows = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "completion"} <= set(rows[0])
    assert len(history("eval/sums_task/exact_match")) == 2
    assert run.data.tags["mlxlab.distill.teacher_weights"] == "[1.0]"
    report = export_run(run.data.tags["mlxlab.run_dir"], tmp_path / "exported", "hf")
    assert (tmp_path / "exported" / "config.json").is_file() and report["format"] == "hf"


@pytest.mark.slow  # three runs in subprocesses
def test_a_sigkilled_gkd_run_resumes_bitwise(tiny, tmp_path, cli_env):
    """experiment=gkd_arithmetic (lmbda = 0.5: coins, samples and dataset rows) SIGKILLed after
    its checkpoint at step 5 and resumed: the weights, the whole MLflow history and state.json
    equal an uninterrupted run's."""
    from test_resume import assert_resumes_bitwise

    args = gkd_args(tiny, "trainer.max_steps=10", "trainer.eval_every_steps=5",
                    "trainer.log_every_steps=2", "checkpoint.save_every_steps=5",
                    "checkpoint.save_every_minutes=null")
    assert_resumes_bitwise(args, tmp_path, cli_env, "gkd")


@pytest.mark.slow  # ~3 min on 2 loaded cores: two SFTs, two evaluations, four short GKD runs
def test_the_on_off_policy_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/quality/bench_gkd_learning.py --smoke: the teacher and student runs, their exports, a
    sweep of lmbda = 0 and 1 over two seeds, and `mlxlab runs compare latest:g1 latest:g2`
    pairing the two arms over the 200 held-out prompts."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality" / "bench_gkd_learning.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    (comparison,) = json.loads(results["compare"])["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n_pairs"]) == ("g1", "g2", 2)
    (exact,) = [t for t in comparison["tasks"] if t["metric"] == "exact_match"]
    assert exact["n"] == 200 and exact["seeds_a"] == exact["seeds_b"] == 2, exact
    assert {"teacher_exact_match", "student_exact_match", "wall_s"} <= set(results)


@pytest.mark.slow  # the default run's budget: test_serve_draft.py holds the drafted text
def test_a_draft_model_trains_from_its_target_and_drafts_for_it(tiny, tmp_path):
    """experiment=draft_model: the teacher's first block (model.keep_layers=1) trains on-policy
    against it, each evaluation logs the acceptance rate and the expected speed-up; the finished
    draft then drafts for the teacher in `mlxlab generate --draft`, the greedy text the
    teacher's alone. keep_layers past the folder's depth is one line."""
    import subprocess

    from conftest import MLXLAB

    teacher = tiny["teacher"]
    args = [MLXLAB, "train", "experiment=draft_model", f"model.pretrained={teacher}",
            "model.keep_layers=1", f"objective.teachers=[{{run: {teacher}}}]",
            f"data.train_file={tiny['sums']}", "data.val_file=null",
            "objective.completion_key=completion", "trainer.max_steps=6",
            "trainer.eval_every_steps=3", "trainer.batch_size=4", "tracking=csv",
            "callbacks.progress.enabled=false", f"paths.root_dir={tmp_path}"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next((tmp_path / "outputs" / "draft_model").iterdir())
    logged = (done.stdout + done.stderr)
    assert "val/acceptance" in logged and "val/expected_speedup" in logged
    from mlxlab.decoding.speculative import draft_metrics

    assert draft_metrics(1.0, 3, 0.25)["val/tokens_per_target_pass"] == 4.0
    assert draft_metrics(0.0, 3, 0.25)["val/expected_speedup"] < 1.0
    prompt = [MLXLAB, "generate", str(teacher), "--prompt", "3+4=", "--max-tokens", "12",
              "--temperature", "0"]
    alone = subprocess.run(prompt, capture_output=True, text=True, timeout=300)
    drafted = subprocess.run([*prompt, "--draft", str(run)], capture_output=True, text=True,
                             timeout=300)
    assert drafted.returncode == 0, drafted.stderr[-2000:]
    assert drafted.stdout == alone.stdout and "proposed by the draft" in drafted.stderr
    deep = subprocess.run([*args[:4], "model.keep_layers=9", *args[5:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert deep.returncode == 2 and "model.keep_layers=9" in deep.stderr.strip().splitlines()[-1]
