"""Evaluation tasks: a tiny random Llama saved by transformers is fine-tuned with LoRA on 100
prompt/completion pairs while `eval.tasks=[...]` scores a 100-question multiple-choice task (and
a generation and a perplexity task) at each evaluation; `mlxlab eval` scores the base folder into
its own MLflow run; `mlxlab runs compare <base> <fine-tune> --json` pairs the two over the 100
examples; `mlxlab export` writes the scores into the model card. The scoring itself is checked
against transformers on the same weights."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, compose_cfg
from hf_helpers import save_tiny_model
from mlxlab.errors import ConfigError, UserError
from mlxlab.evaluation.paired import pair_task
from mlxlab.evaluation.results import SavedTask, read_scores
from mlxlab.evaluation.scoring import greedy_ids, score_task
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import read_task
from mlxlab.runs.named_model import load_eval_model

WORDS = ["red", "blue", "green", "yellow"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tasks(root: Path) -> dict[str, Path]:
    """100 'Ball i is <colour>' facts: the training pairs, a 100-question multiple-choice task on
    them, a generation task on 8 of them and a perplexity task of 6 sentences."""
    rng = np.random.default_rng(1)
    answers = rng.integers(0, len(WORDS), size=100)
    prompts = [f"Ball {i} is" for i in range(100)]
    pairs = [{"prompt": p, "completion": " " + WORDS[a]} for p, a in zip(prompts, answers)]
    return {
        "pairs": write_jsonl(root / "pairs.jsonl", pairs),
        "val": write_jsonl(root / "val.jsonl", pairs[:16]),
        "mc": write_jsonl(root / "mc.jsonl", [
            {"id": f"q{i}", "prompt": p, "choices": WORDS, "answer": int(a)}
            for i, (p, a) in enumerate(zip(prompts, answers))]),
        "gen": write_jsonl(root / "gen.jsonl", [
            {"prompt": p, "answer": WORDS[a]} for p, a in zip(prompts[:8], answers[:8])]),
        "ppl": write_jsonl(root / "ppl.jsonl", [
            {"text": f"Ball {i} is {WORDS[a]}. The ball was round and it rolled away."}
            for i, a in enumerate(answers[:6])]),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The base folder and the fine-tune (tracked in a sqlite store), trained in this process
    (a process start less: the verbs below run as users run them)."""
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("evaltasks")
    base = save_tiny_model("llama", root / "tiny-llama")
    files = make_tasks(root)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    run_dir = root / "finetune"
    train(compose_config(root, [
        "experiment=finetune_completions", f"model.pretrained={base}",
        f"data.train_file={files['pairs']}", f"data.val_file={files['val']}", "data.max_length=32",
        f"tracking.uri={uri}", "callbacks.progress.enabled=false", "trainer.max_steps=40",
        "trainer.eval_every_steps=20", "optimizer.learning_rate=1e-2", "trainer.batch_size=8",
        f"eval.tasks=[{files['mc']},{files['gen']},{files['ppl']}]", "eval.max_new_tokens=4"],
        output_dir=run_dir))
    GlobalHydra.instance().clear()
    return {"root": root, "base": base, "run": run_dir, "uri": uri, **files}


def cli(capsys, verb: str, *args: str) -> str:
    """An `mlxlab` verb run in this process (its main, as the console script calls it)."""
    from mlxlab.cli.main import main

    capsys.readouterr()
    code = main([verb, *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return out.out


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def training_run(world: dict):
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.runs import choose_checkpoint

    run_id = CheckpointState.read(choose_checkpoint(world["run"])).run_id
    return client(world["uri"]).get_run(run_id)


# --- inside the training run --------------------------------------------------------------------


def test_finetune_logs_task_metrics_at_each_evaluation(world):
    run = training_run(world)
    history = client(world["uri"]).get_metric_history(run.info.run_id, "eval/mc/acc")
    assert [m.step for m in history] == [20, 40]
    for key in ("eval/mc/acc_norm", "eval/gen/exact_match", "eval/gen/contains",
                "eval/ppl/loss", "eval/ppl/perplexity", "eval/ppl/bits_per_byte"):
        assert key in run.data.metrics
    best = read_scores(world["run"] / "eval_tasks" / "best")
    assert len(best["mc"].rows) == 100 and [r["id"] for r in best["mc"].rows][:2] == ["q0", "q1"]
    # the files hold what was logged: the mean of the per-example scores at that step
    last = read_scores(world["run"] / "eval_tasks" / "last")
    assert history[-1].value == pytest.approx(np.mean([r["acc"] for r in last["mc"].rows]))
    with_artifacts = {a.path for a in client(world["uri"]).list_artifacts(
        run.info.run_id, "eval_tasks/best")}
    assert "eval_tasks/best/mc.jsonl" in with_artifacts


# --- mlxlab eval, runs compare, export ------------------------------------------------------


@pytest.fixture(scope="module")
def base_eval(world) -> dict:
    """`mlxlab eval <base folder> mc.jsonl --json`, its main in this process (the verb runs as a
    process of its own in test_mlxlab_eval_writes_its_progress_to_stderr_when_it_is_a_file)."""
    import contextlib
    import io
    import os

    from mlxlab.cli.main import main

    out, here = io.StringIO(), os.getcwd()
    os.chdir(world["root"])
    try:
        with contextlib.redirect_stdout(out):
            code = main(["eval", str(world["base"]), str(world["mc"]), "--uri", world["uri"],
                         "--json"])
    finally:
        os.chdir(here)
    assert code == 0, out.getvalue()[-3000:]
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_mlxlab_eval_on_the_base_folder_logs_a_run_with_the_same_metric(world, base_eval):
    assert base_eval["kind"] == "pretrained" and base_eval["tasks"]["mc"]["n"] == 100
    run = client(world["uri"]).get_run(base_eval["run_id"])
    assert run.data.tags["mlxlab.role"] == "eval"
    assert run.data.tags["mlxlab.eval.model"] == str(world["base"].resolve())
    acc = base_eval["tasks"]["mc"]["metrics"]["acc"]
    assert run.data.metrics["eval/mc/acc"] == pytest.approx(acc["value"])
    assert acc["low"] < acc["value"] < acc["high"]
    # the same number in this process, from the folder loaded here
    source = load_eval_model(world["base"])
    assert score_task(source.model, source.tokenizer, read_task(world["mc"])).metrics["acc"] \
        == pytest.approx(acc["value"])


def test_runs_compare_pairs_base_and_finetune_over_the_100_examples(world, base_eval, capsys):
    ft = training_run(world).info.run_id
    out = json.loads(cli(capsys, "runs", "compare", base_eval["run_id"], ft, "--uri",
                         world["uri"], "--json"))
    acc = next(p for p in out["paired"] if (p["task"], p["metric"]) == ("mc", "acc"))
    assert acc["n"] == 100 and acc["test"] == "mcnemar" and 0 <= acc["p"] <= 1
    assert acc["low"] <= acc["diff"] <= acc["high"]
    # McNemar's counts and the difference are those of the two per-example files
    base_rows = {r["id"]: r["acc"] for r in read_scores_of_run(world, base_eval["run_id"])}
    ft_rows = {r["id"]: r["acc"] for r in
               read_scores(world["run"] / "eval_tasks" / "best")["mc"].rows}
    assert acc["only_b"] == sum(ft_rows[i] > base_rows[i] for i in base_rows)
    assert acc["only_a"] == sum(ft_rows[i] < base_rows[i] for i in base_rows)
    assert acc["diff"] == pytest.approx(np.mean(list(ft_rows.values()))
                                        - np.mean(list(base_rows.values())))
    from scipy.stats import binomtest

    discordant = acc["only_a"] + acc["only_b"]
    expected = binomtest(acc["only_b"], discordant, 0.5).pvalue if discordant else 1.0
    assert acc["p"] == pytest.approx(expected)
    assert acc["verdict"].split(" ")[0] in ("no", "A", "B")
    text = cli(capsys, "runs", "compare", base_eval["run_id"], ft, "--uri", world["uri"])
    assert "verdict:" in text and "mcnemar" in text


def read_scores_of_run(world: dict, run_id: str) -> list[dict]:
    from mlxlab.evaluation.run_scores import run_scores

    c = client(world["uri"])
    return run_scores(c, c.get_run(run_id))["mc"].rows


def test_scores_agree_across_run_export_and_mlx_lm_folder(world, tmp_path):
    """The fine-tune's weights three ways: the run (best checkpoint), the Hugging Face folder
    `mlxlab export` writes (LoRA fused) and mlx-lm's layout; the same log-likelihoods."""
    from mlxlab.export import export_run

    export_run(world["run"], tmp_path / "hf", fmt="hf", dtype="float32")
    export_run(world["run"], tmp_path / "mlx", fmt="mlx-lm", dtype="float32")
    task = read_task(world["mc"])
    scored = {}
    for where in (world["run"], tmp_path / "hf", tmp_path / "mlx"):
        source = load_eval_model(where)
        scored[source.kind if where == world["run"] else where.name] = score_task(
            source.model, source.tokenizer, task)
    assert set(scored) == {"run", "hf", "mlx"}
    lls = {k: np.array([r["loglikelihoods"] for r in s.rows]) for k, s in scored.items()}
    np.testing.assert_allclose(lls["hf"], lls["run"], atol=1e-4)
    np.testing.assert_allclose(lls["mlx"], lls["run"], atol=1e-4)
    # ... and the run's score is the one training logged at its best evaluation
    logged = read_scores(world["run"] / "eval_tasks" / "best")["mc"].metrics
    assert scored["run"].metrics == pytest.approx(logged)
    # the export's model card carries the task scores with their intervals, and the base's
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "model-index:" in card and "{type: acc, value:" in card
    assert "| mc | acc | 100 |" in card


def test_model_card_pairs_with_the_base_models_eval_run(world, base_eval, tmp_path):
    from mlxlab.export import export_run

    export_run(world["run"], tmp_path / "card", fmt="hf", dtype="float32")
    card = (tmp_path / "card" / "README.md").read_text()
    assert base_eval["run_id"] in card and "base model" in card
    row = next(line for line in card.splitlines() if line.startswith("| mc | acc |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[5]) == pytest.approx(base_eval["tasks"]["mc"]["metrics"]["acc"]["value"])


# --- scoring against transformers on the same weights ----------------------------------------


@pytest.fixture(scope="module")
def hf_model(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world["base"]).float().eval()
    return model, AutoTokenizer.from_pretrained(world["base"])


def torch_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """lm-eval-harness's HFLM with add_bos_token: ids of context+continuation after the
    context's, the float32 log-softmax summed over them (trailing spaces move onto the
    continuation)."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    head = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return float(sum(logp[len(head) - 1 + j, t] for j, t in enumerate(whole[len(head):])))


def test_multiple_choice_loglikelihoods_equal_transformers(world, hf_model, tmp_path):
    model, tok = hf_model
    rows = [{"prompt": "Once upon a time there was a", "choices": ["cat", "little dog", "sun"],
             "answer": 1},
            {"prompt": "The answer is: ", "choices": ["yes", "no"], "answer": "no"},  # trailing space
            {"prompt": "", "choices": ["Tom", "Lily went home."], "answer": 0}]
    task = read_task(write_jsonl(tmp_path / "mc3.jsonl", rows))
    source = load_eval_model(world["base"])
    scores = score_task(source.model, source.tokenizer, task, TaskSettings(batch_size=2))
    for ex, row in zip(task.examples, scores.rows):
        ours = np.array(row["loglikelihoods"])
        theirs = np.array([torch_loglikelihood(model, tok, ex.prompt, " " + c)
                           for c in ex.choices])
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert row["pred"] == int(np.argmax(theirs))
        lengths = np.array([len(c) for c in ex.choices], float)
        assert row["pred_norm"] == int(np.argmax(theirs / lengths))
        assert row["acc"] == float(row["pred"] == ex.answer)
    assert task.examples[1].answer == 1  # "no" named by its text


def test_greedy_generation_equals_transformers_generate(world, hf_model):
    import torch

    model, tok = hf_model
    source = load_eval_model(world["base"])
    for prompt in ("Once upon a time", "Ball 3 is"):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            theirs = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        theirs = theirs[0, len(ids):].tolist()
        eos = tok.eos_token_id
        ours = greedy_ids(source.model, ids, 8, eos)
        assert ours == (theirs[:theirs.index(eos)] if eos in theirs else theirs)


def test_perplexity_task_equals_transformers_nll(world, hf_model):
    import torch

    model, tok = hf_model
    task = read_task(world["ppl"])
    source = load_eval_model(world["base"])
    scores = score_task(source.model, source.tokenizer, task)
    for ex, row in zip(task.examples, scores.rows):
        ids = tok(ex.text)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
        nll = -float(sum(logp[j, t] for j, t in enumerate(ids[1:])))
        assert row["nll"] == pytest.approx(nll, abs=1e-3) and row["tokens"] == len(ids) - 1
    total = sum(r["nll"] for r in scores.rows) / sum(r["tokens"] for r in scores.rows)
    assert scores.metrics["perplexity"] == pytest.approx(math.exp(total))


# --- task files and settings -------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "choices": ["x"], "answer": 0}], "two or more"),
    ([{"prompt": "a", "choices": ["x", "y"], "answer": 2}], "index of the right choice"),
    ([{"prompt": "a", "choices": ["x", "y"], "answer": 0}, {"prompt": "b", "answer": "y"}],
     "one kind per file"),
    ([{"question": "a"}], "a task row has"),
    ([{"id": 1, "text": "a b"}, {"id": 1, "text": "c d"}], "must be unique"),
])
def test_bad_task_files_are_one_clear_error(tmp_path, rows, message):
    with pytest.raises(ConfigError, match=message):
        read_task(write_jsonl(tmp_path / "t.jsonl", rows))


def test_eval_tasks_are_checked_before_training(tmp_path):
    from mlxlab.config import validate

    cfg = compose_cfg(tmp_path, [f"eval.tasks=[{tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(UserError, match="task file not found"):
        validate(cfg)
    cfg = compose_cfg(tmp_path, ["eval.max_new_tokens=0"])
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        validate(cfg)


def test_no_tasks_keeps_the_config_hash():
    """Runs without tasks hash as if the eval node did not exist (a grid finds its finished jobs by the hash)."""
    from omegaconf import OmegaConf

    from mlxlab.config import config_hash

    cfg = OmegaConf.create({"seed": 1, "eval": {"tasks": []}})
    assert config_hash(cfg) == config_hash(OmegaConf.create({"seed": 1}))
    assert config_hash(OmegaConf.create({"seed": 1, "eval": {"tasks": ["a.jsonl"]}})) \
        != config_hash(OmegaConf.create({"seed": 1}))


def test_paired_scores_match_counts_and_continuous_bootstrap():
    a = SavedTask("t", "multiple_choice", {}, [{"id": str(i), "acc": float(i < 50),
                                                 "acc_norm": 0.0} for i in range(100)])
    b = SavedTask("t", "multiple_choice", {}, [{"id": str(i), "acc": float(i < 70),
                                                 "acc_norm": 0.0} for i in range(100)])
    acc = pair_task(a, b)[0]
    assert (acc.only_a, acc.only_b, acc.n) == (0, 20, 100)
    assert acc.p == pytest.approx(2 * 0.5 ** 20) and acc.diff == pytest.approx(0.2)
    assert "B is better" in acc.as_dict()["verdict"]
    pa = SavedTask("p", "perplexity", {}, [{"id": str(i), "loss": 3.0} for i in range(30)])
    pb = SavedTask("p", "perplexity", {}, [{"id": str(i), "loss": 2.5 + 0.01 * i}
                                           for i in range(30)])
    loss = pair_task(pa, pb)[0]
    assert loss.test == "bootstrap" and loss.diff < 0 and loss.high < 0
    assert "B is better" in loss.as_dict()["verdict"]  # lower loss is better


@pytest.mark.slow
def test_acc_and_acc_norm_equal_lm_eval_harness(tmp_path):
    """benchmarks/parity/bench_lm_eval.py --scorer: a 100-question task scored by mlxlab and by
    lm-eval 0.4's `hf` model on the same folder; acc and acc_norm agree on every example (exit 0)."""
    pytest.importorskip("lm_eval")
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(
        "bench_lm_eval", REPO / "benchmarks" / "parity" / "bench_lm_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--scorer", "--out", str(tmp_path)]) == 0


def test_chat_models_see_prompts_through_their_template(tmp_path):
    """A tiny Llama with a ChatML template: each choice's log-likelihood is that of the choice
    right after transformers' apply_chat_template(user turn, add_generation_prompt=True); greedy
    generation stops at the template's <|im_end|>; eval.chat=plain writes plain prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model("llama", tmp_path / "tiny-chat", chat="chatml")
    rows = [{"prompt": "Name a colour.", "choices": ["red", "a blue sky"], "answer": 0},
            {"prompt": "Who is Lily?", "choices": ["a girl", "a dog"], "answer": 1}]
    task = read_task(write_jsonl(tmp_path / "chat_mc.jsonl", rows))
    source = load_eval_model(folder)
    assert source.template is not None
    scores = score_task(source.model, source.tokenizer, task, template=source.template)
    assert scores.prompts == "chat template"
    model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for ex, row in zip(task.examples, scores.rows):
        head = tok.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                       add_generation_prompt=True, tokenize=False)
        assert head.endswith("<|im_start|>assistant\n")
        theirs = []
        for choice in ex.choices:  # lm-eval's pair: the trailing newline moves onto the choice
            context, continuation = head[:-1], "\n" + choice
            h = tok(context, add_special_tokens=False)["input_ids"]
            w = tok(context + continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([w[:-1]])).logits[0].float(), -1)
            theirs.append(float(sum(logp[len(h) - 1 + j, t] for j, t in enumerate(w[len(h):]))))
        np.testing.assert_allclose(row["loglikelihoods"], theirs, atol=1e-4)
    from mlxlab.evaluation.scoring import Prompts

    assert Prompts(source.tokenizer, source.template).eot == tok.convert_tokens_to_ids("<|im_end|>")
    plain = load_eval_model(folder, chat="plain")
    assert plain.template is None
    assert score_task(plain.model, plain.tokenizer, task).prompts == "plain"
    with pytest.raises(ConfigError, match="no chat template"):
        load_eval_model(save_tiny_model("llama", tmp_path / "no-chat"), chat="template")


def test_runs_scored_with_different_prompts_are_not_paired():
    rows = [{"id": "0", "acc": 1.0, "acc_norm": 1.0}]
    a = SavedTask("t", "multiple_choice", {}, rows, "plain")
    b = SavedTask("t", "multiple_choice", {}, rows, "chat template")
    with pytest.raises(ValueError, match="score both the same way"):
        pair_task(a, b)


def test_replicates_pair_over_examples_averaged_over_seeds():
    from mlxlab.evaluation.paired import pair_replicates
    from mlxlab.stats import mcnemar_exact, paired_bootstrap

    rng = np.random.default_rng(0)

    def group(p: float) -> dict:
        return {str(s): {"mc": SavedTask("mc", "multiple_choice", {}, [
            {"id": f"q{i}", "acc": float(rng.random() < p), "acc_norm": 0.0}
            for i in range(60)])} for s in (1, 2, 3)}

    a, b = group(0.3), group(0.8)
    acc = pair_replicates(a, b)[0]
    ma = np.array([[r["acc"] for r in a[s]["mc"].rows] for s in a])
    mb = np.array([[r["acc"] for r in b[s]["mc"].rows] for s in b])
    assert (acc.n, acc.seeds_a, acc.seeds_b) == (60, 3, 3)
    assert (acc.diff, acc.low, acc.high, acc.p) == pytest.approx(paired_bootstrap(ma, mb))
    assert [m["seed"] for m in acc.mcnemar] == ["1", "2", "3"]
    assert acc.mcnemar[0]["p"] == pytest.approx(mcnemar_exact(ma[0] > 0.5, mb[0] > 0.5)[2])
    assert "B is better on mc acc" in acc.as_dict()["verdict"]


@pytest.mark.slow
def test_runs_compare_of_a_sweep_pairs_tasks_over_seeds(world, tmp_path):
    """Two learning rates x 2 seeds of the fine-tune, each scoring the task: `runs compare
    latest --json` carries the per-example comparison of the two configs over their seeds."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "train", "--multirun", "replicates=2",
         "optimizer.learning_rate=1e-4,1e-2", "experiment=finetune_completions",
         f"model.pretrained={world['base']}", f"data.train_file={world['pairs']}",
         f"data.val_file={world['val']}", "data.max_length=32", f"tracking.uri={uri}",
         "callbacks.progress.enabled=false", "trainer.max_steps=20",
         "trainer.eval_every_steps=20", "trainer.batch_size=8", f"eval.tasks=[{world['mc']}]",
         f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "runs", "compare", "latest",
                           "--uri", uri, "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    tasks = out["comparisons"][0]["tasks"]
    acc = next(t for t in tasks if t["metric"] == "acc")
    assert (acc["n"], acc["seeds_a"], acc["seeds_b"]) == (100, 2, 2)
    assert len(acc["mcnemar"]) == 2 and acc["low"] <= acc["diff"] <= acc["high"]
    # the base model against one config's seeds (`runs compare BASE SWEEP:GROUP`)
    done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "eval", str(world["base"]),
                           str(world["mc"]), "--uri", uri, "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    base = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "runs", "compare", base,
                           "latest:g2", "--uri", uri, "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    acc = next(t for t in out["paired"] if t["metric"] == "acc")
    assert (acc["n"], acc["seeds_a"], acc["seeds_b"]) == (100, 1, 2)
    assert acc["low"] <= acc["diff"] <= acc["high"] and len(out["per_seed"]) == 2


def test_a_chat_models_run_scores_its_tasks_through_the_template(tmp_path):
    """Fine-tuning a ChatML model: the run folder keeps its template, and the evaluations score
    the task through it (the per-example files say so; the logged values are those of the
    template's prompts, recomputed here on the run's best checkpoint)."""
    base = save_tiny_model("llama", tmp_path / "tiny-chat", chat="chatml")
    files = make_tasks(tmp_path)
    mc10 = write_jsonl(tmp_path / "mc10.jsonl",
                       [json.loads(line) for line in files["mc"].read_text().splitlines()[:10]])
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train

    run_dir = tmp_path / "run"
    train(compose_config(tmp_path, [
        "experiment=finetune_completions", f"model.pretrained={base}",
        f"data.train_file={files['pairs']}", f"data.val_file={files['val']}",
        "data.max_length=32", "tracking=none", "callbacks.progress.enabled=false",
        "trainer.max_steps=4", "trainer.eval_every_steps=2", "trainer.batch_size=8",
        f"eval.tasks=[{mc10}]"], output_dir=run_dir))
    GlobalHydra.instance().clear()
    best = read_scores(run_dir / "eval_tasks" / "best")["mc10"]
    assert best.prompts == "chat template"
    source = load_eval_model(run_dir)
    again = score_task(source.model, source.tokenizer, read_task(mc10), template=source.template)
    assert again.prompts == "chat template"
    np.testing.assert_allclose([r["loglikelihoods"] for r in again.rows],
                               [r["loglikelihoods"] for r in best.rows], atol=1e-5)


def test_mlxlab_eval_bad_task_file_is_one_line_exit_2(tmp_path, capsys):
    from mlxlab.cli.main import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "choices": ["x"], "answer": 0}])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(["eval", str(tmp_path / "model"), str(bad), "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: choices must be a list" in err[0]


def test_generation_shows_progress_count_rate_and_time(world, caplog):
    """Long scoring shows itself: a line at each tenth of the answers (count, rate,
    time left) and one at the end, from the decoding loop itself."""
    import logging

    rows = [{"id": f"g{i}", "prompt": f"Ball {i} is", "answer": "red"} for i in range(20)]
    task = read_task(write_jsonl(world["root"] / "gen20.jsonl", rows))
    source = load_eval_model(world["base"])
    with caplog.at_level(logging.INFO, logger="mlxlab.evaluation.scoring"):
        score_task(source.model, source.tokenizer, task,
                   TaskSettings(batch_size=2, max_new_tokens=4))
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if "answers," in line and "left" in line]
    assert len(steps) == 9 and steps[0].startswith("task gen20: 2/20 answers, ")
    assert lines[-1].startswith("task gen20: 20 answers in ")


@pytest.mark.slow  # the budget: test_generation_shows_progress_count_rate_and_time holds them
def test_mlxlab_eval_writes_its_progress_to_stderr_when_it_is_a_file(world, tmp_path):
    """`mlxlab eval MODEL tasks.jsonl 2> file`: no terminal, no logging set up; the progress
    lines (count, rate, time left at each tenth, and the end) are in the file all the same."""
    rows = [{"id": f"g{i}", "prompt": f"Ball {i} is", "answer": "red"} for i in range(60)]
    tasks = write_jsonl(tmp_path / "gen60.jsonl", rows)
    with open(tmp_path / "eval.log", "w") as err:
        done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "eval", str(world["base"]),
                               str(tasks), "--no-track", "--batch-size", "4",
                               "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=err,
                              text=True, timeout=300)
    assert done.returncode == 0, (tmp_path / "eval.log").read_text()[-2000:]
    lines = (tmp_path / "eval.log").read_text().splitlines()
    steps = [line for line in lines if line.startswith("task gen60: ") and "left" in line]
    assert len(steps) >= 9, lines
    assert re.match(r"task gen60: \d+/60 answers, [\d.]+/s, ~\d+ s left", steps[0])
    assert any(re.match(r"task gen60: 60 answers in [\d.]+ s", line) for line in lines)


def test_the_eval_table_says_each_tasks_prompt_style():
    """An lm-eval task (plain prompts unless --apply-chat-template) beside a jsonl task scored
    through the chat template: each task line says its own style, and the table warns that
    the two do not compare (the header once claimed the template for both)."""
    from mlxlab.cli.eval import task_table

    metric = {"acc": {"value": 0.5, "low": 0.4, "high": 0.6}}
    report = {"model": "m", "kind": "folder", "checkpoint": None, "run_id": None, "groups": {},
              "prompts": "mixed",
              "tasks": {"my_task": {"kind": "multiple_choice", "n": 30, "prompts": "plain",
                                    "metrics": metric},
                        "mc": {"kind": "multiple_choice", "n": 30, "prompts": "chat template",
                               "metrics": metric}}}
    text = task_table(report)
    assert text.splitlines()[0] == "model  m (folder)"
    assert "my_task (multiple_choice, 30 examples, plain prompts)" in text
    assert "mc (multiple_choice, 30 examples, chat template prompts)" in text
    assert "different prompt styles" in text


def test_a_task_yaml_given_as_data_names_tasks(tmp_path, capsys):
    """`mlxlab eval RUN task.yaml`: one line naming --tasks, not an error about a key of the
    run's data config the user never typed."""
    from mlxlab.cli.main import main

    (tmp_path / "my_task.yaml").write_text("task: my_task\n")
    with pytest.raises(SystemExit) as done:
        main(["eval", str(tmp_path / "run"), str(tmp_path / "my_task.yaml"), "--no-track"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"{tmp_path / 'my_task.yaml'} is an lm-eval task YAML: pass it as "
                            f"--tasks {tmp_path / 'my_task.yaml'}")
