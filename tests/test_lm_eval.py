"""lm-evaluation-harness's tasks on mlxlab's models: lm-eval's local task YAMLs (multiple choice,
generate_until with its regex filter, loglikelihood_rolling; `dataset_path: json`, written
here, no network) scored through `MlxlabLM` give the per-example log-likelihoods and scores of
lm-eval's own `hf` model on the same weights; `mlxlab eval --tasks` keeps every example in the
store, a LoRA run scored unfused equals its fused export, `mlxlab runs compare` pairs a base and
its fine-tune per example, a training run scores lm-eval tasks at each evaluation, lm-eval's own
command runs `--model mlxlab`; a dataset that is not there offline is one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, REPO
from hf_helpers import save_tiny_model

pytest.importorskip("lm_eval")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_lm_eval", REPO / "benchmarks" / "parity" / "bench_lm_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env(**extra: str) -> dict:
    return {**os.environ, **OFFLINE, **extra}


def mlxlab(*args, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mlxlab.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env(**(extra_env or {})))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny Llama, the three task YAMLs, and a LoRA fine-tune that scores the
    multiple-choice YAML at each evaluation (eval.tasks naming an lm-eval task)."""
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("lmeval")
    base = save_tiny_model("llama", root / "tiny-llama")
    tasks = bench().write_tasks(root / "tasks", 12)
    rows = [json.loads(line) for line in (root / "tasks" / "tiny_mc.jsonl").read_text().splitlines()]
    pairs = [{"prompt": r["prompt"], "completion": " " + r["choices"][r["answer"]]} for r in rows]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    run_dir = root / "finetune"
    # trained in this process (a process start less: the verbs below run as users run them)
    train(compose_config(root, [
        "experiment=finetune_completions", f"model.pretrained={base}",
        f"data.train_file={root / 'pairs.jsonl'}", f"data.val_file={root / 'pairs.jsonl'}",
        "data.max_length=64", f"tracking.uri={uri}", "callbacks.progress.enabled=false",
        "trainer.max_steps=12", "trainer.eval_every_steps=6", "optimizer.learning_rate=1e-2",
        "trainer.batch_size=4", f"eval.tasks=[{tasks[0]}]"], output_dir=run_dir))
    GlobalHydra.instance().clear()
    return {"root": root, "base": base, "tasks": tasks, "uri": uri, "run": run_dir}


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_per_example_loglikelihoods_and_scores_equal_lm_eval_hf(world):
    """The three YAMLs through MlxlabLM and through lm-eval's `hf` model (float32, CPU) on the
    same folder: every log-likelihood within 1e-4 relative, every score and generation equal."""
    from lm_eval.models.huggingface import HFLM

    from mlxlab.evaluation.lm_eval.registered import harness_lm
    from mlxlab.runs.named_model import load_eval_model

    b = bench()
    ours, _ = b.evaluate(harness_lm(load_eval_model(world["base"]), 4), world["tasks"])
    theirs, _ = b.evaluate(HFLM(pretrained=str(world["base"]), dtype="float32", device="cpu",
                                batch_size=4), world["tasks"])
    report, same = b.compare(ours, theirs, 1e-4)
    assert same, report
    assert report["tiny_gen"]["generations_differing"] == []
    assert report["tiny_mc"]["examples"] == 12 and report["tiny_ppl"]["examples"] >= 2


def test_training_run_scores_the_lm_eval_task_at_each_evaluation(world):
    from mlxlab.evaluation.results import read_scores

    saved = read_scores(world["run"] / "eval_tasks" / "last")["tiny_mc"]
    assert saved.kind == "lm_eval:multiple_choice" and len(saved.rows) == 12
    assert saved.higher_is_better == {"acc": True, "acc_norm": True}
    assert saved.metrics["acc"] == pytest.approx(np.mean([r["acc"] for r in saved.rows]))
    assert all(len(r["resps"]) == 4 for r in saved.rows)  # each choice's log-likelihood


def cli(capsys, *args) -> str:
    """An `mlxlab` verb in this process (its main, as the console script calls it)."""
    from mlxlab.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out


def test_eval_keeps_every_example_compare_pairs_them_and_lora_unfused_equals_fused(
        world, capsys, monkeypatch):
    """`mlxlab eval` of the base and of the LoRA run (unfused) into the store; `runs compare`
    pairs them per example (McNemar for acc, a paired bootstrap for bits per byte); the run's
    fused export scores the same log-likelihoods as the run."""
    root, uri, tasks = world["root"], world["uri"], ",".join(world["tasks"])
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    ids = {}
    for name, model in (("base", world["base"]), ("run", world["run"])):
        out = cli(capsys, "eval", model, "--tasks", tasks, "--uri", uri,
                  "--out", root / f"out_{name}", "--json")
        report = json.loads(out.strip().splitlines()[-1])
        assert report["tasks"]["tiny_gen"]["kind"] == "lm_eval:generate_until"
        assert "exact_match.first-word" in report["tasks"]["tiny_gen"]["metrics"]
        ids[name] = report["run_id"]
    out = cli(capsys, "runs", "compare", ids["base"], ids["run"], "--uri", uri, "--json")
    paired = {(p["task"], p["metric"]): p for p in json.loads(out)["paired"]}
    assert paired[("tiny_mc", "acc")]["test"] == "mcnemar" and paired[("tiny_mc", "acc")]["n"] == 12
    assert paired[("tiny_gen", "exact_match.first-word")]["test"] == "mcnemar"
    bpb = paired[("tiny_ppl", "bits_per_byte")]
    assert bpb["test"] == "bootstrap" and not bpb["higher_is_better"]
    assert bpb["verdict"].startswith(("A is better", "B is better", "no difference"))

    from mlxlab.evaluation.results import read_scores
    from mlxlab.export import export_run

    export_run(world["run"], root / "fused", fmt="mlx-lm", dtype="float32")
    cli(capsys, "eval", root / "fused", "--tasks", world["tasks"][0], "--no-track",
        "--out", root / "out_fused")
    table = cli(capsys, "runs", "compare", ids["base"], ids["run"], "--uri", uri)
    assert "verdict" in table.splitlines()[3] and ("no difference" in table or "B " in table)
    unfused = read_scores(root / "out_run")["tiny_mc"].rows
    fused = read_scores(root / "out_fused")["tiny_mc"].rows
    a = np.array([[c[0][0] for c in r["resps"]] for r in unfused])
    b = np.array([[c[0][0] for c in r["resps"]] for r in fused])
    np.testing.assert_allclose(b, a, rtol=1e-4)
    assert [r["acc"] for r in fused] == [r["acc"] for r in unfused]
    base = read_scores(root / "out_base")["tiny_mc"].rows
    assert not np.allclose([[c[0][0] for c in r["resps"]] for r in base], a)  # it trained


@pytest.mark.slow  # lm-eval's command indexes its ~15,000 task files first (tens of seconds)
def test_lm_eval_command_runs_the_mlxlab_model(world, tmp_path):
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.evaluation.lm_eval.command", "run", "--model", "mlxlab",
         "--model_args", f"model={world['run']},checkpoint=last", "--tasks", world["tasks"][0],
         "--limit", "3", "--batch_size", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout


@pytest.mark.slow  # a task name is looked up in lm-eval's index of its task files
def test_a_dataset_missing_offline_is_one_line_and_leaves_no_run(world, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = mlxlab("eval", world["base"], "--tasks", "arc_easy", "--uri", uri, cwd=tmp_path,
                  extra_env={"HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("mlxlab eval: error: lm-eval task arc_easy: its dataset allenai/ai2_arc")
    from mlflow import MlflowClient

    experiments = MlflowClient(tracking_uri=uri).search_experiments()
    assert not MlflowClient(tracking_uri=uri).search_runs([e.experiment_id for e in experiments])


@pytest.mark.parametrize("entry, message", [
    # a name is looked up in lm-eval's index of its ~15,000 task files (tens of seconds)
    pytest.param("no_such_task_xyz", "neither a jsonl task file nor an lm-eval task",
                 marks=pytest.mark.slow),
    ("missing.yaml", "lm-eval task file not found"),
])
def test_a_bad_task_entry_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                            entry, message):
    """In-process (`mlxlab eval` runs as a process of its own in test_eval_tasks, test_reward)."""
    from mlxlab.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(tmp_path / "nowhere"), "--tasks", entry, "--no-track"]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_harness_tasks_pair_binary_scores_by_mcnemar_and_others_by_bootstrap():
    from mlxlab.evaluation.paired import pair_task
    from mlxlab.evaluation.results import SavedTask

    def task(acc, ppl):
        rows = [{"id": str(i), "acc": a, "word_perplexity": p}
                for i, (a, p) in enumerate(zip(acc, ppl))]
        return SavedTask("t", "lm_eval:multiple_choice", {}, rows, "plain",
                         {"acc": True, "word_perplexity": False})

    a = task([0, 0, 1, 1, 0, 0, 0, 0], [5.0, 6, 7, 8, 9, 5, 6, 7])
    b = task([1, 1, 1, 1, 1, 1, 1, 0], [4.0, 5, 6, 7, 8, 4, 5, 6])
    got = {p.metric: p for p in pair_task(a, b, rounds=2000)}
    assert got["acc"].test == "mcnemar" and (got["acc"].only_a, got["acc"].only_b) == (0, 5)
    assert got["word_perplexity"].test == "bootstrap" and got["word_perplexity"].diff == -1.0
    assert not got["word_perplexity"].higher_is_better
    # a sweep's seeds (replicates): each example averaged over a group's seeds, McNemar per seed
    from mlxlab.evaluation.paired import pair_replicates

    seeds = {p.metric: p for p in pair_replicates({"0": {"t": a}, "1": {"t": a}},
                                                  {"0": {"t": b}, "1": {"t": b}}, rounds=500)}
    assert [m["only_b"] for m in seeds["acc"].mcnemar] == [5, 5]
    assert seeds["word_perplexity"].diff == -1.0 and not seeds["word_perplexity"].mcnemar


@pytest.mark.slow
def test_smollm2_scores_equal_lm_eval_hf_on_the_same_weights(tmp_path):
    """benchmarks/parity/bench_lm_eval.py on the real SmolLM2-135M-Instruct (its Q4_1 GGUF
    through mlxlab, transformers' float32 load of it through `hf`): log-likelihoods within
    5e-4 relative and equal multiple-choice and perplexity scores (exit 0). The 4-bit layers'
    matmuls round differently from transformers' float32 ones on the dequantized weights: a
    short choice's log-likelihood (a few nats) lands up to ~2e-4 relative apart (docs/benchmarks.md
    "lm-eval-harness tasks"); the same scoring on float weights agrees to ~2e-7 (the tiny model
    test above)."""
    assert bench().main(["--out", str(tmp_path), "--questions", "40", "--skip-mlx-lm",
                         "--rtol", "5e-4"]) == 0


def test_lm_eval_scores_have_directions_for_sweeps():
    """A sweep's objective can be an lm-eval score: its direction is known, a filter's too."""
    from mlxlab.objectives.catalog import metric_definition

    assert metric_definition("eval/gsm8k/exact_match.strict-match").mode == "max"
    assert metric_definition("eval/arc_easy/acc_norm").mode == "max"
    assert metric_definition("eval/wikitext/word_perplexity").mode == "min"


def test_scoring_lm_eval_tasks_in_a_run_leaves_the_model_training(tmp_path):
    """A run's evaluation (TaskEvaluation.on_eval) scores lm-eval's three kinds of request
    (loglikelihood, generate_until, loglikelihood_rolling) with dropout off and hands the model
    back in training mode, as it found it."""
    from mlxlab.evaluation.in_training import TaskEvaluation
    from mlxlab.evaluation.lm_eval.registered import harness_lm
    from mlxlab.evaluation.settings import TaskSettings
    from mlxlab.runs.named_model import load_eval_model

    class Tracker:
        logged: dict = {}

        def log_metrics(self, metrics: dict, step: int) -> None:
            self.logged.update(metrics)

    tasks = bench().write_tasks(tmp_path / "tasks", 2)
    lm = harness_lm(load_eval_model(save_tiny_model("llama", tmp_path / "tiny")), 4)
    modes: list[bool] = []
    forward = type(lm.model).__call__

    def spy(model, *args, **kwargs):
        modes.append(model.training)
        return forward(model, *args, **kwargs)

    scoring = TaskEvaluation(TaskSettings(tasks=tasks, batch_size=4))
    scoring.model, scoring.harness_lm, scoring.tracker = lm.model, lm, Tracker()
    scoring.folder, scoring.monitor, scoring.mode = tmp_path / "eval_tasks", "val/loss", "min"
    lm.model.train()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(lm.model), "__call__", spy)
        scoring.on_eval(1, {"val/loss": 1.0})
    assert modes and not any(modes)  # scored with dropout off
    assert {"eval/tiny_mc/acc", "eval/tiny_gen/exact_match.first-word",
            "eval/tiny_ppl/word_perplexity"} <= Tracker.logged.keys()
    assert lm.model.training


MT_YAML = """task: tiny_mt
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{prompt}}}}"
generation_kwargs: {{until: ["\\n"], do_sample: false, max_gen_toks: 12}}
metric_list: [{{metric: bleu}}, {{metric: chrf}}, {{metric: ter}}]
"""
CORPUS_SCORES = {"tiny_ppl": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
                 "tiny_mt": ("bleu", "chrf", "ter")}


def test_compare_pairs_corpus_scores_as_lm_eval_aggregates_them(tmp_path):
    """Perplexities, bits per byte, BLEU, chrF and TER are lm-eval's aggregates over a task's
    documents: `runs compare` pairs each run's aggregate over the shared documents (what lm-eval
    reported for the task), with the bootstrap over documents around their difference, not the
    mean of per-document values."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlxlab.evaluation.lm_eval.registered import harness_lm
    from mlxlab.evaluation.lm_eval.scores import score_harness
    from mlxlab.evaluation.lm_eval.tasks import HarnessOptions
    from mlxlab.evaluation.paired import pair_task
    from mlxlab.evaluation.results import read_scores, write_scores
    from mlxlab.runs.named_model import load_eval_model

    tasks = bench().write_tasks(tmp_path / "tasks", 10)
    ppl = next(t for t in tasks if t.endswith("tiny_ppl.yaml"))
    (tmp_path / "tasks" / "tiny_mt.yaml").write_text(
        MT_YAML.format(data=tmp_path / "tasks" / "tiny_gen.jsonl"))
    base = save_tiny_model("llama", tmp_path / "tiny")
    saved = []
    for scale in (1.0, 1.3):
        lm = harness_lm(load_eval_model(base), 4)
        lm.model.update(tree_unflatten([(k, v * scale) for k, v in
                                        tree_flatten(lm.model.parameters())]))
        scores, _ = score_harness(lm, [ppl, str(tmp_path / "tasks" / "tiny_mt.yaml")],
                                  HarnessOptions())
        saved.append(read_scores(write_scores(scores, tmp_path / f"scores-{scale}")))
    for task, metrics in CORPUS_SCORES.items():
        a, b = saved[0][task], saved[1][task]
        paired = {p.metric: p for p in pair_task(a, b, rounds=500)}
        for metric in metrics:
            p = paired[metric]
            assert (p.a, p.b) == pytest.approx((a.metrics[metric], b.metrics[metric]),
                                               rel=1e-9), metric
            assert p.diff == pytest.approx(p.b - p.a) and p.low <= p.diff <= p.high, metric
        # the per-document values the rows also keep average to another number
        mean = np.mean([r["word_perplexity" if task == "tiny_ppl" else "ter"] for r in a.rows])
        assert mean != pytest.approx(a.metrics[metrics[0] if task == "tiny_ppl" else "ter"])


def test_corpus_scores_pair_as_lm_eval_aggregates_stored_pieces():
    """Stored rows' pieces (a reference and an answer; a log-likelihood and its words) paired:
    each side is lm-eval's own aggregation function of its pieces, the difference B - A."""
    from lm_eval.api import metrics as lm_metrics

    from mlxlab.evaluation.paired import pair_task
    from mlxlab.evaluation.results import SavedTask

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "to", "the", "red", "house"]
    refs = [" ".join(rng.choice(words, 8)) for _ in range(12)]
    answers = {side: [" ".join(rng.choice(r.split() + words[:shift], 7)) for r in refs]
               for side, shift in (("a", 6), ("b", 2))}
    functions = {"bleu": lm_metrics.bleu, "chrf": lm_metrics.chrf, "ter": lm_metrics.ter,
                 "word_perplexity": lm_metrics.weighted_perplexity,
                 "bits_per_byte": lm_metrics.bits_per_byte}

    def task(side: str) -> SavedTask:
        pieces = [{"bleu": [r, x], "chrf": [r, x], "ter": [r, x],
                   "word_perplexity": [-float(len(x)), len(x.split())],
                   "bits_per_byte": [-float(len(x)), len(x)]}
                  for r, x in zip(refs, answers[side])]
        rows = [{"id": str(i), **{m: float(functions[m]([p[m]])) for m in p}, "pieces": p}
                for i, p in enumerate(pieces)]
        higher = {"bleu": True, "chrf": True, "ter": False, "word_perplexity": False,
                  "bits_per_byte": False}
        return SavedTask("t", "lm_eval:generate_until", {}, rows, "plain", higher,
                         {m: functions[m].__name__ for m in functions})

    a, b = task("a"), task("b")
    for p in pair_task(a, b, rounds=300):
        expected = [functions[p.metric]([r["pieces"][p.metric] for r in t.rows]) for t in (a, b)]
        assert [p.a, p.b] == pytest.approx(expected, rel=1e-12), p.metric
        assert p.n == 12 and p.low <= p.diff <= p.high and p.diff == pytest.approx(p.b - p.a)
