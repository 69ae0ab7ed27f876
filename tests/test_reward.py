"""Reward models: model.head=score reads a scalar at a reply's last token, the
Bradley-Terry loss equals TRL's (trl 1.16 RewardTrainer.compute_loss, run on torch CPU) with its
gradients, on given rewards and end to end against transformers' LlamaForSequenceClassification
on the same weights; experiment=reward_chat through the one loop on a tiny random Llama; and the
bad inputs, one line each before anything is made."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import PYTHON, compose_cfg
from hf_helpers import save_tiny_model
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.objectives.preference.reward import bradley_terry
from one_process import each_in_one_process
from test_preference import generated_pairs, pairs_data, write_jsonl

torch = pytest.importorskip("torch")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reward")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    return {"folder": folder, "root": root,
            "train": write_jsonl(root / "train.jsonl", generated_pairs(160)),
            "val": write_jsonl(root / "val.jsonl", generated_pairs(32, seed=1))}


class _Accelerator:
    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(model, inputs: dict, coef: float | None) -> tuple[torch.Tensor, dict]:
    """TRL's RewardTrainer.compute_loss, unbound, on `model` (a torch callable returning
    `.logits` of (2B, 1)) and `inputs` (chosen rows then rejected rows, as TRL's collator
    stacks them): (the loss, its metrics)."""
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Accelerator(),
                              args=SimpleNamespace(center_rewards_coefficient=coef),
                              _total_train_tokens=0, _tp_size=1,
                              _metrics=defaultdict(lambda: defaultdict(list)))
    loss = trl_reward.RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("with_margin", "coef"), [(False, None), (True, None), (True, 0.01)])
def test_the_loss_and_its_gradient_equal_trls(with_margin, coef):
    rng = np.random.default_rng(4)
    b = 8
    chosen, rejected = (rng.normal(0, 2, b).astype(np.float32) for _ in range(2))
    margin = rng.uniform(0, 1.5, b).astype(np.float32) if with_margin else None
    logits = torch.tensor(np.concatenate([chosen, rejected])[:, None], requires_grad=True)
    inputs = {"input_ids": torch.zeros((2 * b, 3), dtype=torch.long),
              "attention_mask": torch.ones((2 * b, 3), dtype=torch.long)}
    if with_margin:
        inputs["margin"] = torch.tensor(margin)
    want, metrics = trl_loss(lambda **kw: SimpleNamespace(logits=logits), inputs, coef)
    want.backward()
    want_grad = logits.grad.numpy()[:, 0]

    def ours(c, r):
        return bradley_terry(c, r, None if margin is None else mx.array(margin), coef)

    got, aux, _ = ours(mx.array(chosen), mx.array(rejected))
    grads = mx.grad(lambda c, r: ours(c, r)[0], argnums=(0, 1))(mx.array(chosen),
                                                                  mx.array(rejected))
    assert abs(got.item() - want.item()) <= 1e-5
    np.testing.assert_allclose(np.concatenate([np.array(g) for g in grads]), want_grad,
                               rtol=1e-5, atol=1e-7)
    assert aux["accuracy"].item() == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert aux["margin"].item() == pytest.approx(metrics["margin"], abs=1e-5)
    assert aux["mean_reward"].item() == pytest.approx(metrics["mean_reward"], abs=1e-5)
    assert 0 < metrics["accuracy"] < 1


def test_the_head_reads_the_last_token_as_transformers_sequence_classifier_does(reward_model):
    """The tiny Llama with model.head=score (every weight trained) and the same weights loaded
    as transformers' LlamaForSequenceClassification: on a batch of pairs, each side cut after
    its reply's end-of-turn token for transformers (which reads the last token that is not
    padding), the rewards agree, and so do TRL's loss on them and its gradient for the head
    and a projection of the first layer (1e-5)."""
    from mlx.utils import tree_flatten
    from transformers import LlamaForSequenceClassification

    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.objectives.base import ObjectiveSetup
    from mlxlab.objectives.preference.reward import Reward, pair_rewards
    from mlxlab.runtime.cluster.distributed import World

    folder = reward_model["folder"]
    data = pairs_data(folder, reward_model["train"], val_file=str(reward_model["val"]))
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(folder), head="score",
                         lora={"rank": 0})
    batching = Batching(batch_size=6)
    objective = Reward()
    objective.setup(ObjectiveSetup(model=model, data=data, batching=batching, world=World()))
    batch = next(iter(data.val_batches(batching)))
    batch["margin"] = mx.array(np.linspace(0.0, 1.0, 6, dtype=np.float32))
    (loss, aux), grads = nn.value_and_grad(model, objective.loss)(model, batch)
    grads = dict(tree_flatten(grads))

    hf = LlamaForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                        torch_dtype=torch.float32)
    with torch.no_grad():
        hf.score.weight.copy_(torch.tensor(np.array(model.score.weight)))
    pad = data.vocab_size - 1  # an id no row holds: transformers' padding to skip
    rows = []
    for side in ("chosen", "rejected"):
        ids, labels = np.array(batch[f"{side}_input_ids"]), np.array(batch[f"{side}_labels"])
        mask = np.array(batch[f"{side}_loss_mask"])
        for r in range(len(ids)):
            last = int(np.nonzero(mask[r])[0].max()) + 1
            rows.append(np.concatenate([ids[r, :1], labels[r]])[: last + 1])
    assert not any((row == pad).any() for row in rows)
    hf.config.pad_token_id = pad
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row)
        attention[r, : len(row)] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention,
              "margin": torch.tensor(np.array(batch["margin"]))}
    want, metrics = trl_loss(hf, inputs, None)
    want.backward()
    with torch.no_grad():
        hf_rewards = hf(input_ids=input_ids, attention_mask=attention).logits[:, 0].numpy()
    ours = np.concatenate([np.array(r) for r in pair_rewards(model, batch)])
    np.testing.assert_allclose(ours, hf_rewards, atol=1e-4, rtol=1e-4)
    assert np.std(hf_rewards) > 1e-3  # rewards that differ between rows
    assert abs(loss.item() - want.item()) <= 1e-5
    assert aux["accuracy"].item() == pytest.approx(metrics["accuracy"], abs=1e-6)
    for ours_name, hf_param in (("score.weight", hf.score.weight),
                                ("lm.model.layers.0.self_attn.q_proj.weight",
                                 hf.model.layers[0].self_attn.q_proj.weight)):
        np.testing.assert_allclose(np.array(grads[ours_name]), hf_param.grad.numpy(),
                                   atol=1e-5, rtol=1e-4)


# --- experiment=reward_chat through the one loop ---------------------------------------------


def reward_args(model: dict, *extra: str) -> list[str]:
    return [f"model.pretrained={model['folder']}", f"data.train_file={model['train']}",
            f"data.val_file={model['val']}", "trainer.batch_size=8", "trainer.max_steps=12",
            "trainer.eval_every_steps=6", "trainer.log_every_steps=1",
            "trainer.schedule.warmup_steps=0", "callbacks.progress.enabled=false",
            "optimizer.learning_rate=1e-2", *extra]


@pytest.fixture(scope="module")
def reward_run(reward_model, tmp_path_factory) -> dict:
    """experiment=reward_chat through the one loop, in this process (the command line's start:
    the refusals' one-process run below): 12 steps of LoRA + head on 160 pairs."""
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.train import train

    root = tmp_path_factory.mktemp("reward_run")
    cfg = compose_cfg(root, ["experiment=reward_chat", *reward_args(reward_model)])
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return {"run": Path(cfg.paths.output_dir), "uri": cfg.tracking.uri}


def test_a_reward_run_learns_to_rank_the_held_out_pairs(reward_run):
    """The held-out pairwise accuracy and margin in MLflow at both evaluations, the accuracy at
    the end above chance (>= 0.9 of 32 pairs) and the margin up; the finished run rebuilds with
    its head (the checkpoint's score weight); its export is refused in one line, no folder
    written."""
    from mlflow.tracking import MlflowClient

    from mlxlab.export import export_run
    from mlxlab.export.hf import ExportError
    from mlxlab.runs.model import load_run_model

    client = MlflowClient(reward_run["uri"])
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run_.info.status == "FINISHED" and run_.data.tags["choice.objective"] == "reward"

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_.info.run_id, key),
                                        key=lambda m: m.step)]

    accuracy, margin = history("val/accuracy"), history("val/margin")
    assert len(accuracy) == 2 and len(history("train/accuracy")) == 12
    assert accuracy[-1] >= 0.9 and margin[-1] > margin[0] and margin[-1] > 0, (accuracy, margin)
    model, _ = load_run_model(reward_run["run"])
    assert model.head == "score" and model.score.weight.shape[0] == 1
    out = reward_run["run"].parent / "exported"
    with pytest.raises(ExportError, match=r"is a reward model \(model.head=score\)"):
        export_run(reward_run["run"], out)
    assert not out.exists()


def test_a_reward_run_scores_grpo_completions_as_it_scored_its_pairs(reward_model, reward_run,
                                                                    make_cfg):
    """LearnedReward (a GRPO reward) on the held-out pairs' prompts and replies gives the
    rewards the objective computed for them in training's batches (1e-5), chosen above rejected
    as the run learnt; a GRPO run trains with it beside a Python reward and logs its mean; a run
    that is not a reward model is refused in one line."""
    from mlflow.tracking import MlflowClient

    from mlxlab.objectives.preference.reward import pair_rewards
    from mlxlab.runs.learned_reward import LearnedReward
    from mlxlab.runs.model import load_run_model
    from mlxlab.train import train

    rows = [r for r in generated_pairs(32, seed=1) if isinstance(r["prompt"], str)]
    reward = LearnedReward(str(reward_run["run"]), batch_size=5)
    prompts = [r["prompt"] for r in rows]
    chosen = reward(prompts, [r["chosen"] for r in rows])
    rejected = reward(prompts, [r["rejected"] for r in rows])
    assert np.mean(np.array(chosen) > np.array(rejected)) >= 0.9

    model, _ = load_run_model(reward_run["run"])
    scored = write_jsonl(reward_run["run"].parent / "scored.jsonl", rows)
    data = pairs_data(reward_model["folder"], scored, val_file=str(scored))
    batch = next(iter(data.val_batches(Batching(batch_size=len(rows)))))
    order = np.array(batch["index"])
    want = [np.array(side) for side in pair_rewards(model, batch)]
    np.testing.assert_allclose(np.array(chosen)[order], want[0], atol=1e-5)
    np.testing.assert_allclose(np.array(rejected)[order], want[1], atol=1e-5)

    prompts_file = write_jsonl(reward_run["run"].parent / "prompts.jsonl",
                               [{"prompt": r["prompt"], "answer": "yes"} for r in rows])
    learned = (f"{{_target_: mlxlab.runs.learned_reward.LearnedReward, "
               f"run: '{reward_run['run']}', name: learned}}")
    cfg = make_cfg("experiment=grpo_arithmetic", f"model.pretrained={reward_model['folder']}",
                   f"data.train_file={prompts_file}", "data.val_file=null",
                   "data.val_fraction=0.25", "model.lora.rank=4", "objective.num_generations=4",
                   "objective.max_completion_length=4",
                   f"objective.rewards=[{learned},"
                   "{_target_: mlxlab.objectives.rl.rewards.exact_answer}]",
                   "trainer.batch_size=2", "trainer.max_steps=2", "trainer.eval_every_steps=2",
                   "trainer.log_every_steps=1", "callbacks.progress.enabled=false")
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run_,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    values = [m.value for m in client.get_metric_history(run_.info.run_id,
                                                         "train/rewards/learned/mean")]
    assert len(values) == 2 and all(np.isfinite(values))
    assert "val/rewards/learned/mean" in run_.data.metrics
    with pytest.raises(ConfigError, match="is not a reward model \\(its model.head is lm\\)"):
        LearnedReward(cfg.paths.output_dir)


def refused(args: list[str], tmp_path, cli_env, *command: str) -> str:
    """stderr of a run refused with exit 2, having made no run folder and no store."""
    out = subprocess.run([PYTHON, "-m", *(command or ("mlxlab.train",)), *args], cwd=tmp_path,
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-2000:]
    assert "mlxlab: error:" in out.stderr
    return out.stderr


NOT_REWARD_RUNS = [
    (["experiment=reward_chat", "model.head=lm"], "set model.head=score"),
    (["experiment=dpo_chat", "model.head=score"], "model.head=score is a reward model's scalar"),
    (["experiment=reward_chat", "model.head=value"], "model.head='value': use lm"),
    (["experiment=reward_chat", "optimized_metric=val/rewards/accuracy"],
     "optimized_metric='val/rewards/accuracy' is not computed"),
]


@pytest.fixture(scope="module")
def not_reward_runs(reward_model, tmp_path_factory) -> tuple[Path, list]:
    """`mlxlab-train` with each of NOT_REWARD_RUNS, in turn in one process rooted in one folder:
    (the folder, [(exit status, stderr, the folder's names after it)])."""
    import os

    root = tmp_path_factory.mktemp("not-reward")
    env = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argvs = [["mlxlab-train", *reward_args(reward_model), *extra,
              f"hydra.run.dir={root / 'refused'}"] for extra, _ in NOT_REWARD_RUNS]
    return root, each_in_one_process(argvs, env, cwd=root, after="one_process:names_here")


@pytest.mark.parametrize("case", range(len(NOT_REWARD_RUNS)),
                         ids=[f"extra{i}" for i in range(len(NOT_REWARD_RUNS))])
def test_a_run_that_is_not_a_reward_model_is_one_line(not_reward_runs, case):
    root, done = not_reward_runs
    code, err, names = done[case]
    assert code == 2, err[-2000:]
    assert "mlxlab: error:" in err
    assert NOT_REWARD_RUNS[case][1] in err, err[-2000:]
    assert "refused" not in names and "mlruns" not in names, names


@pytest.mark.parametrize(("row", "match"), [
    ({"prompt": "a", "chosen": "b", "rejected": ""}, "'rejected' is empty: a pair needs both"),
    ({"prompt": "a", "chosen": None, "rejected": "c"}, "'chosen' is empty: a pair needs both"),
    ({"prompt": "a", "chosen": "b"}, "not a JSON object with 'chosen' and 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"},
     "'margin' must be a number, not 'big'"),
])
def test_a_pair_without_both_sides_or_with_a_bad_margin_is_one_line(reward_model, tmp_path, row,
                                                                    match):
    others = [{**p, "margin": 1.0} if "margin" in row else p for p in generated_pairs(2)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*others, row])
    with pytest.raises(ConfigError, match=rf"bad.jsonl:3: {match}"):
        pairs_data(reward_model["folder"], bad)
    some = [{**p, "margin": 1.0} for p in generated_pairs(2)] + generated_pairs(1)
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: no 'margin', which line 1 has"):
        pairs_data(reward_model["folder"], write_jsonl(tmp_path / "bad.jsonl", some))


def test_mlxlab_eval_scores_rows_and_pairs_with_a_reward_run(reward_model, reward_run, cli_env):
    """`mlxlab eval REWARD_RUN pairs.jsonl`: the held-out pairs' accuracy, as the run's best
    evaluation measured it; on prompt/completion rows, each row's reward, the chosen replies
    scored above the rejected ones as often."""
    import json

    from mlflow.tracking import MlflowClient

    def mlxlab_eval(path) -> dict:
        out = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "eval", str(reward_run["run"]),
                              str(path), "--json"], env=cli_env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def eval_here(path) -> dict:  # the same verb, its main in this process
        import contextlib
        import io

        from mlxlab.cli.main import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["eval", str(reward_run["run"]), str(path), "--json"]) == 0
        return json.loads(out.getvalue().strip().splitlines()[-1])

    pairs = mlxlab_eval(reward_model["val"])
    client = MlflowClient(reward_run["uri"])
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert pairs["pairs"] == 32
    assert pairs["accuracy"] == pytest.approx(run_.data.metrics["best/val/accuracy"], abs=1e-6)
    assert pairs["accuracy_95"][0] < pairs["accuracy"] <= pairs["accuracy_95"][1]
    rows = generated_pairs(32, seed=1)
    rated = write_jsonl(reward_run["run"].parent / "rated.jsonl",
                        [{"prompt": r["prompt"], "completion": r[side]}
                         for r in rows for side in ("chosen", "rejected")])
    scores = eval_here(rated)["scores"]
    assert len(scores) == 64
    assert np.mean(np.array(scores[0::2]) > np.array(scores[1::2])) == pairs["accuracy"]


def test_a_verb_that_needs_a_language_model_refuses_a_reward_run_in_one_line(reward_run,
                                                                            tmp_path, cli_env):
    """`mlxlab eval REWARD_RUN generation_tasks.jsonl`, `mlxlab generate REWARD_RUN` and
    `mlxlab predict REWARD_RUN prompts.csv`: one line naming the run as a reward model, exit 2,
    nothing written to the store or --out (eval used to "generate" empty strings with the score
    head and log exact_match 0.0)."""
    tasks = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)}
                                                 for i in range(6)])
    store = tmp_path / "store"
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nhello\n")
    verbs = [["eval", str(reward_run["run"]), str(tasks), "--uri", f"sqlite:///{store}.db"],
             ["generate", str(reward_run["run"]), "--prompt", "hello"],
             ["predict", str(reward_run["run"]), str(prompts), "--out", str(tmp_path / "out.csv")]]
    # the three in turn in one process (one process start, not three)
    done = each_in_one_process([["mlxlab", *verb] for verb in verbs], cli_env)
    for verb, (code, stderr, _) in zip(verbs, done, strict=True):
        assert code == 2, stderr[-2000:]
        (line,) = stderr.strip().splitlines()
        assert line.startswith(f"mlxlab {verb[0]}: error: {reward_run['run']} is a reward "
                               "model (model.head=score)"), line
    assert not Path(f"{store}.db").exists() and not (tmp_path / "out.csv").exists()


# --- a learned reward in GRPO: registry names, other tokenizers, memory, bad runs ------------


def grpo_args(policy, prompts, rewards: str, *extra: str) -> list[str]:
    """mlxlab-train arguments of a short GRPO run of `policy` on `prompts` with `rewards`."""
    return ["experiment=grpo_arithmetic", f"model.pretrained={policy}",
            f"data.train_file={prompts}", "data.val_file=null", "data.val_fraction=0.25",
            "model.lora.rank=4", "objective.num_generations=4",
            "objective.max_completion_length=4", f"objective.rewards=[{rewards}]",
            "trainer.batch_size=2", "trainer.max_steps=1", "trainer.eval_every_steps=1",
            "callbacks.progress.enabled=false", *extra]


def prompt_rows(root) -> object:
    rows = [r for r in generated_pairs(32, seed=1) if isinstance(r["prompt"], str)]
    return write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"], "answer": "yes"}
                                                for r in rows])


def test_a_registered_reward_run_is_the_run_it_was_logged_from(reward_run, tmp_path):
    """objective.rewards takes a registered version (`models:/NAME@ALIAS`, `models:/NAME/N`,
    as `mlxlab register` names it) for the reward run it was registered from: the same folder,
    the same scores; a name the store does not hold is one line."""
    from mlxlab.objectives.rl.rewards import ModelReward
    from mlxlab.runs.learned_reward import LearnedReward
    from mlxlab.serving.registry import register_run

    uri = reward_run["uri"]
    version = register_run(reward_run["run"], name="tiny-reward", alias="champion", uri=uri)
    rows = generated_pairs(8, seed=2)
    prompts, replies = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    direct = LearnedReward(str(reward_run["run"]))(prompts, replies)
    for name in ("models:/tiny-reward@champion", f"models:/tiny-reward/{version.version}"):
        reward = LearnedReward(name, uri=uri)
        assert isinstance(reward, ModelReward)  # GRPO loads it before measuring memory
        assert reward.folder.resolve() == reward_run["run"].resolve()
        np.testing.assert_allclose(reward(prompts, replies), direct, atol=1e-6)
    with pytest.raises(ConfigError, match=r"models:/no-such@champion: no such registered model "
                                          r"version in sqlite:"):
        LearnedReward("models:/no-such@champion", uri=uri)
    with pytest.raises(ConfigError, match=r"no MLflow store at .*nowhere.db"):
        LearnedReward("models:/tiny-reward@champion", uri=f"sqlite:///{tmp_path}/nowhere.db")


@pytest.mark.slow  # a GRPO run; the default run's GRPO with a learned reward: the test above
def test_a_policy_with_another_tokenizer_gets_the_rewards_of_its_completions_text(
        reward_run, tmp_path, cli_env):
    """The policy (a Qwen2-style vocabulary) and the reward model (a Llama-style one) tokenize
    differently: the reward reads the policy's completions as text, in its own tokenizer and
    template, so each reward a GRPO run logged for a sampled completion is the reward run's score
    of that prompt and completion text (1e-5)."""
    import json
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from tokenizers import Tokenizer

    from mlxlab.runs.learned_reward import LearnedReward
    from run_helpers import run

    policy = save_tiny_model("qwen2", tmp_path / "tiny-qwen", chat="chatml")
    theirs = Tokenizer.from_file(str(policy / "tokenizer.json"))
    ours = Tokenizer.from_file(str(reward_run["run"] / "tokenizer.json"))
    text = "Is the sky blue? yes"
    assert theirs.encode(text).ids != ours.encode(text).ids
    learned = (f"{{_target_: mlxlab.runs.learned_reward.LearnedReward, "
               f"run: '{reward_run['run']}', name: learned}}")
    run(grpo_args(policy, prompt_rows(tmp_path), learned, "objective.log_completions=8"),
        tmp_path / "run", cli_env)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run_,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    folder = client.download_artifacts(run_.info.run_id, "grpo_samples", str(tmp_path / "got"))
    (samples,) = list(Path(folder).glob("step_*.jsonl"))
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) >= 4 and any(r["completion"] for r in rows)
    scored = LearnedReward(str(reward_run["run"]))([r["prompt"] for r in rows],
                                                   [r["completion"] for r in rows])
    np.testing.assert_allclose([r["learned"] for r in rows], scored, atol=1e-5)


@pytest.mark.slow  # the default run's 10-minute budget; run with -m slow
def test_a_reward_run_that_is_not_one_is_refused_before_a_grpo_run_makes_anything(
        reward_model, reward_run, tmp_path, cli_env):
    """objective.rewards naming a run that is not a reward model (a language model's run), or a
    registered name the store does not hold, is one line and exit 2 before the GRPO run makes
    its folder or its store."""
    from run_helpers import run

    prompts = prompt_rows(tmp_path)
    lm_run = tmp_path / "lm_run"
    lm_env = {**cli_env, "MLXLAB_ROOT": str(tmp_path / "lm_root")}
    run(grpo_args(reward_model["folder"], prompts,
                  "{_target_: mlxlab.objectives.rl.rewards.exact_answer}", "tracking=none"),
        lm_run, lm_env)
    for rewards, line in (
            (f"{{_target_: mlxlab.runs.learned_reward.LearnedReward, run: '{lm_run}'}}",
             f"{lm_run} is not a reward model (its model.head is lm)"),
            ("{_target_: mlxlab.runs.learned_reward.LearnedReward, "
             f"run: 'models:/no-such@champion', uri: '{reward_run['uri']}'}}",
             "models:/no-such@champion: no such registered model version")):
        err = refused(grpo_args(reward_model["folder"], prompts, rewards,
                                f"hydra.run.dir={tmp_path / 'refused'}"), tmp_path, cli_env)
        assert line in err and len(err.strip().splitlines()) == 1, err[-2000:]
        assert not (tmp_path / "refused").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow  # three runs
def test_micro_batch_auto_counts_a_learned_rewards_memory(reward_model, reward_run, tmp_path,
                                                         cli_env):
    """trainer.micro_batch=auto with a learned reward: its model is loaded before the step is
    measured (its weights in every measured peak) and its scoring batch is taken off the budget;
    at a budget between the reward-free run's 4- and 8-row peaks, the run with the reward picks
    fewer rows, the same effective batch."""
    from mlx.utils import tree_flatten

    from mlxlab.runs.learned_reward import LearnedReward
    from mlxlab.runs.model import load_run_model
    from run_helpers import run

    prompts = prompt_rows(tmp_path)
    learned = ("{_target_: mlxlab.runs.learned_reward.LearnedReward, "
               f"run: '{reward_run['run']}', batch_size: 64}}")
    rule = "{_target_: mlxlab.objectives.rl.rewards.exact_answer}"

    def plan(name: str, rewards: str, *extra: str) -> dict:
        run(grpo_args(reward_model["folder"], prompts, rewards, "trainer.batch_size=8",
                      "trainer.micro_batch=auto", "tracking=none", *extra),
            tmp_path / name, cli_env)
        _, state = load_run_model(tmp_path / name, "last")
        return state.config["batch_plan"]

    def peaks(p: dict) -> dict[int, float]:
        return {int(t.split(":")[0]): float(t.split(":")[1].removesuffix("GB")) * 1e9
                for t in p["tried"].split(", ") if t.endswith("GB")}

    free = peaks(plan("free", rule))
    assert sorted(free) == [1, 2, 4, 8], free
    weights = sum(v.nbytes for _, v in
                  tree_flatten(load_run_model(reward_run["run"])[0].parameters()))
    scoring = LearnedReward(str(reward_run["run"]), batch_size=64).scoring_memory(32, 16)
    assert weights > 0 and scoring > 0
    # a budget the 4-row step fits without the reward, by less than the reward takes
    limit = free[4] + min(weights + scoring, free[8] - free[4]) / 2
    assert free[1] + weights + scoring < limit, (free, weights, scoring)
    budget = f"trainer.memory_limit={limit / 1e6:.6f}MB"
    without = plan("without", rule, budget)
    with_reward = plan("with", learned, budget)
    assert without["micro_batch"] == 4 and without["beside_step_gb"] == 0, without
    assert with_reward["micro_batch"] < without["micro_batch"], with_reward
    assert with_reward["micro_batch"] * with_reward["grad_accum"] == 8
    assert with_reward["beside_step_gb"] > 0, with_reward
    measured = peaks(with_reward)  # (recorded to 1 MB: the tiny reward's weights may not show)
    assert all(measured[m] >= free[m] for m in measured), (measured, free)
