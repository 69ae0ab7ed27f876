"""GRPO: the rewards, the prompt data, the rollouts and the objective on a tiny random Llama
(transformers-written, ChatML tokens): completions sampled with a KV cache equal the uncached
model's choices, the gradient reaches the LoRA adapters, and the objective's state carries a killed
run's next batches to the bit. The loop-level runs (experiment=grpo_*, a real MLflow store, SIGKILL
+ resume) are at the end."""

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
from mlxlab.objectives.rl import rewards as R
from mlxlab.objectives.rl.grpo import GRPO
from mlxlab.objectives.rollouts import Sampling, rollout_batch, sample_completions
from mlxlab.runtime.cluster import distributed


def char_variety(prompts, completions, **_):
    """A reward that differs between random completions: distinct characters / 10."""
    return [len(set(c)) / 10 for c in completions]


# --- rewards ----------------------------------------------------------------------------------


def test_builtin_rewards_score_what_they_say():
    prompts = ["p"] * 4
    completions = [" 7 ", "it is 1,234.", "12", "no number"]
    assert R.exact_answer(prompts, completions, answer=["7", "1234", "13", "x"]) == [1, 0, 0, 0]
    assert R.numeric_answer(prompts, completions, answer=[7, "1234", "12.0", "3"]) == [1, 1, 1, 0]
    fmt = R.regex_format(r"\d+")
    assert fmt(prompts, completions) == [1.0, 0.0, 1.0, 0.0]
    assert R.regex_format("NO", flags="i")(prompts, ["no"]) == [1.0]
    size = R.length(target=4)
    assert size(prompts, ["abcd", "abcdef", "abcdefgh", ""]) == [1.0, 0.5, 0.0, 1.0]
    assert R.length(target=2, unit="words")(prompts, ["a b c"]) == [0.5]


def test_rewards_are_built_from_targets_with_weights_and_summed_nan_aware():
    built = R.build_rewards([
        {"_target_": "mlxlab.objectives.rl.rewards.exact_answer"},
        {"_target_": "mlxlab.objectives.rl.rewards.regex_format", "pattern": "a+", "weight": 0.5},
        {"_target_": "test_grpo.char_variety", "weight": 2.0, "name": "variety"},
    ])
    assert [(r.name, r.weight) for r in built] == [("exact_answer", 1.0), ("regex_format", 0.5),
                                                    ("variety", 2.0)]
    table = R.score(built, ["p", "p"], ["aa", "b"], {"answer": ["aa", "c"]})
    np.testing.assert_allclose(table, [[1, 1, 0.1], [0, 0, 0.1]])
    np.testing.assert_allclose(R.total(table, built), [1.7, 0.2], rtol=1e-6)

    def abstains(prompts, completions, **_):
        return [None, 1.0]

    only = [R.Reward("a", abstains, 1.0)]
    table = R.score(only, ["p", "p"], ["x", "y"], {})
    assert np.isnan(table[0, 0]) and np.isnan(R.total(table, only)[0])


@pytest.mark.parametrize(("spec", "message"), [
    ([], "objective.rewards is empty"),
    ([{"weight": 1}], "has no _target_"),
    ([{"_target_": "no.such.reward"}], "cannot be imported"),
    ([{"_target_": "mlxlab.objectives.rl.rewards.regex_format", "pattern": "("}],
     "is not a regular expression"),
    ([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"}] * 2, "two rewards are named"),
])
def test_a_bad_reward_spec_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        R.build_rewards(spec)


def test_a_reward_returning_the_wrong_count_is_named():
    bad = [R.Reward("short", lambda prompts, completions, **_: [1.0], 1.0)]
    with pytest.raises(ConfigError, match="reward 'short' returned 1 values for 2"):
        R.score(bad, ["p", "p"], ["a", "b"], {})


# --- prompts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny random Llama with ChatML's template; 60 arithmetic prompts (strings) and 12 chats."""
    root = tmp_path_factory.mktemp("grpo")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(10)]
    chats = [{"messages": [{"role": "user", "content": f"say {w}"}], "answer": w}
             for w in ["cat", "dog", "sun", "tree", "ball", "milk"] * 2]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return {"folder": folder, "root": root, "prompts": root / "prompts.jsonl",
            "chats": root / "chats.jsonl"}


def prompt_data(tiny: dict, file: str = "prompts", **kwargs) -> PromptRows:
    data = PromptRows(str(tiny[file]), tokenizer={"path": str(tiny["folder"] / "tokenizer.json")},
                      **kwargs)
    data.setup(None)
    return data


def test_string_prompts_and_chats_render_as_trl_hands_them_with_their_columns(tiny):
    from mlxlab.data.chat import encode_chat, load_chat_template

    data = prompt_data(tiny, val_fraction=0.1)
    assert (len(data.train), len(data.val)) == (54, 6)
    texts, ids, columns = data.prompts("train", [0, 1])
    assert all(isinstance(t, str) and t.endswith("=") for t in texts)
    assert columns["answer"] == [str(eval(t[:-1])) for t in texts]
    assert data.tokenizer.decode(ids[0].tolist()) == texts[0]
    chats = prompt_data(tiny, "chats", val_file=str(tiny["chats"]))
    texts, ids, columns = chats.prompts("train", [0])
    assert isinstance(texts[0], list) and texts[0][0]["role"] == "user"
    template = load_chat_template(tiny["folder"])
    want = encode_chat(chats.tokenizer, template, texts[0], add_generation_prompt=True)
    np.testing.assert_array_equal(ids[0], want.ids)
    assert want.text.endswith("<|im_start|>assistant\n")
    im_end = chats.tokenizer.token_to_id("<|im_end|>")
    assert im_end in chats.stop_ids()


def test_the_prompt_epoch_is_shuffled_and_resumes_where_it_stopped(tiny):
    data = prompt_data(tiny)
    batching = Batching(batch_size=8)
    first = [np.array(b["index"]).tolist() for b in data.train_batches(batching, 0)]
    assert sorted(sum(first, [])) == list(range(54)) and len(first) == 7
    again = prompt_data(tiny)
    it = again.train_batches(batching, 0)
    next(it), next(it)
    state = again.state_dict()
    resumed = prompt_data(tiny)
    resumed.load_state_dict(state)
    assert [np.array(b["index"]).tolist() for b in resumed.train_batches(batching, 0)] == first[2:]


def test_a_prompt_file_without_prompts_names_the_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 is not a JSON object with a 'prompt'"):
        PromptRows(str(bad), tokenizer={"path": str(tiny["folder"])}).setup(None)


# --- rollouts ----------------------------------------------------------------------------------


def lora_model(tiny: dict, data: PromptRows, rank: int = 4):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    mx.random.seed(0)
    return MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(tiny["folder"]),
                        lora={"rank": rank, "targets": ["query", "value"]} if rank else None)


def test_cached_sampling_picks_the_uncached_models_tokens_and_a_key_repeats_it(tiny):
    """Greedy completions with the KV cache (prompts of two lengths batched by length) are the
    argmax of the full forward pass at every position; a sampled run repeats with its key."""
    data = prompt_data(tiny)
    model = lora_model(tiny, data)
    _, ids, _ = data.prompts("train", range(6))
    greedy = Sampling(max_new_tokens=6, temperature=0.0)
    out = sample_completions(model, ids, 2, greedy, [-1], mx.random.key(0))
    model.eval()
    for i, prompt in enumerate(ids):
        seq = [int(t) for t in prompt]
        for _ in range(6):
            seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1])))
        assert out[2 * i].tolist() == out[2 * i + 1].tolist() == seq[len(prompt):]
    hot = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9)
    a = sample_completions(model, ids, 3, hot, [-1], mx.random.key(5))
    b = sample_completions(model, ids, 3, hot, [-1], mx.random.key(5))
    c = sample_completions(model, ids, 3, hot, [-1], mx.random.key(6))
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]


def test_the_rollout_batch_masks_the_completion_tokens_only():
    prompts = [np.array([5, 6, 7]), np.array([8])]
    completions = [np.array([1, 2]), np.array([3]), np.array([4, 4, 9]), np.array([9])]
    batch = rollout_batch(prompts, completions, 2, width=5, pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"][0], [5, 6, 7, 1, 2])
    np.testing.assert_array_equal(batch["labels"][0], [6, 7, 1, 2, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(batch["labels"][2], [4, 4, 9, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][2], [1, 1, 1, 0, 0])
    assert batch["loss_mask"].sum() == 2 + 1 + 3 + 1


# --- the objective ----------------------------------------------------------------------------

VARIETY = [{"_target_": "test_grpo.char_variety"}]


def objective(tiny, data, model, **kwargs) -> GRPO:
    settings = {"num_generations": 4, "max_completion_length": 6, **kwargs}
    grpo = GRPO(settings.pop("rewards", VARIETY), **settings)
    grpo.setup(ObjectiveSetup(model=model, data=data, batching=Batching(batch_size=2),
                              world=distributed.World()))
    return grpo


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_the_gradient_reaches_the_adapters(tiny, loss_type):
    """A generated batch's loss (mu = 2, beta > 0: old and reference log-probs in the batch)
    has a non-zero gradient on every adapter matrix B (A's is 0 while B is, as LoRA starts), and
    the rollouts' metrics are TRL's names."""
    data = prompt_data(tiny)
    model = lora_model(tiny, data)
    grpo = objective(tiny, data, model, loss_type=loss_type, num_iterations=2, beta=0.04)
    batch = next(iter(grpo.train_batches(data, Batching(batch_size=2), 0, model)))
    assert {"old_logps", "ref_logps", "advantages", "loss_mask"} <= set(batch)
    assert np.abs(np.array(batch["advantages"])).sum() > 0
    (loss, aux), grads = nn.value_and_grad(model, grpo.loss)(model, batch)
    adapters = {n: float(mx.abs(g).sum()) for n, g in tree_flatten(grads) if "lora_b" in n}
    assert adapters and all(v > 0 for v in adapters.values()), adapters
    assert {"kl", "entropy", "clip_ratio/region_mean", "ntokens"} <= set(aux)
    logs = grpo.logs()
    for key in ("reward", "reward_std", "rewards/char_variety/mean", "frac_reward_zero_std",
                "completions/mean_length"):
        assert key in logs, key
    assert grpo.logs() == {}  # reset: the next logged line averages the next generations


def test_beta_without_adapters_and_bad_settings_are_one_config_error(tiny):
    data = prompt_data(tiny)
    with pytest.raises(ConfigError, match="set model.lora.rank > 0, or objective.beta=0"):
        objective(tiny, data, lora_model(tiny, data, rank=0), beta=0.1)
    with pytest.raises(ConfigError, match="objective.loss_type='ppo'"):
        GRPO(VARIETY, loss_type="ppo")
    with pytest.raises(ConfigError, match="objective.num_generations must be >= 2"):
        GRPO(VARIETY, num_generations=1)


def test_the_state_carries_the_next_batches_to_the_bit(tiny):
    """A run stopped mid-buffer (mu = 3, after 4 batches) and an objective restored from its
    state.json (JSON, as checkpoints keep it) yield the same next batches as the run that went
    on: the buffered passes first, then new generations from the same key."""
    data = prompt_data(tiny)
    batching = Batching(batch_size=2)

    def run(grpo, model, data, n):
        return [{k: np.array(v) for k, v in b.items()}
                for _, b in zip(range(n), grpo.train_batches(data, batching, 0, model))]

    model = lora_model(tiny, data)
    through = run(objective(tiny, data, model, num_iterations=3, beta=0.04), model, data, 9)
    data_a = prompt_data(tiny)
    stopped = objective(tiny, data_a, model, num_iterations=3, beta=0.04)
    assert all((a[k] == b[k]).all() for a, b in zip(run(stopped, model, data_a, 4), through)
               for k in a)
    state, data_state = json.loads(json.dumps(stopped.state_dict())), data_a.state_dict()
    data_b = prompt_data(tiny)
    data_b.load_state_dict(data_state)
    resumed = objective(tiny, data_b, model, num_iterations=3, beta=0.04)
    resumed.load_state_dict(state)
    rest = run(resumed, model, data_b, 5)
    for a, b in zip(rest, through[4:]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


# --- experiment=grpo_arithmetic: the one loop, a real MLflow store ------------------------------

TRL_METRICS = ("reward", "reward_std", "rewards/exact_answer/mean", "rewards/variety/mean",
               "frac_reward_zero_std", "kl", "clip_ratio/region_mean", "completions/mean_length",
               "entropy")


def grpo_args(tiny: dict, *extra: str) -> list[str]:
    """experiment=grpo_arithmetic on the tiny Llama: 2 prompts x 4 completions of 4 tokens a
    step, mu = 2, beta > 0, two rewards (the exact answer and a varied one, so that the
    advantages are not all 0 on a random model)."""
    return [
        "experiment=grpo_arithmetic",
        f"model.pretrained={tiny['folder']}",
        f"data.train_file={tiny['prompts']}",
        "data.val_file=null",
        "model.lora.rank=4",
        "objective.num_generations=4",
        "objective.num_iterations=2",
        "objective.beta=0.04",
        "objective.max_completion_length=4",
        "objective.log_completions=3",
        "objective.rewards=[{_target_: mlxlab.objectives.rl.rewards.exact_answer},"
        "{_target_: test_grpo.char_variety, name: variety, weight: 0.5}]",
        "optimizer.learning_rate=3e-3",
        "trainer.batch_size=2",
        "trainer.max_steps=8",
        "trainer.eval_every_steps=4",
        "trainer.log_every_steps=1",
        "callbacks.progress.enabled=false",
        *extra,
    ]


def sums_task(path: Path) -> Path:
    """An evaluation task of five sums "a+1=" with their answers, written to `path`."""
    path.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n"
                            for a in range(5)))
    return path


def finished_run(cfg):
    """Train `cfg` (tracked in its MLflow store) and return (the client, the run, a function of
    a metric's key to its logged values); the run must have FINISHED."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])[0]
    assert run.info.status == "FINISHED"

    def history(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    return client, run, history


def test_mu_passes_summed_by_grad_accum_are_refused_before_a_step(tiny, make_cfg):
    """num_iterations = 2 with grad_accum = 2 would sum a generation's two passes into one
    step at unchanged weights (the update of num_iterations = 1): one line, no step trained;
    accumulating single passes (mu = 1) over generations stays allowed."""
    from mlxlab.train import train

    with pytest.raises(ConfigError, match=r"objective.num_iterations=2 takes 2 optimizer steps "
                       r"per generation, and trainer.grad_accum=2 would sum"):
        train(make_cfg(*grpo_args(tiny, "trainer.grad_accum=2")))
    assert GRPO(VARIETY, num_iterations=1).plan(4) == 1
    assert GRPO(VARIETY, num_iterations=3).plan(1) == 3  # batches per batch of prompts


@pytest.mark.slow  # ~1 min on 2 loaded cores (train + export)
def test_a_grpo_run_logs_trls_metrics_and_samples_to_mlflow(tiny, make_cfg, tmp_path):
    """8 steps through mlxlab-train's train(): every TRL metric at every step in MLflow
    (train/...), val/reward and an evaluation task at both evaluations, the sample completions
    of each evaluation as an artifact; the run exports as a transformers folder."""
    from mlxlab.export import export_run

    task = sums_task(tmp_path / "sums.jsonl")
    cfg = make_cfg(*grpo_args(tiny, f"eval.tasks=[{task}]", "eval.max_new_tokens=3"))
    client, run, history = finished_run(cfg)
    for key in TRL_METRICS:
        # the rollouts' metrics come once per generation (every mu = 2 steps), the loss's each step
        assert len(history(f"train/{key}")) in (4, 8), key
    assert len(history("val/reward")) == 2
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "grpo_samples")]
    assert samples == ["grpo_samples/step_00000004.jsonl", "grpo_samples/step_00000008.jsonl"]
    local = client.download_artifacts(run.info.run_id, samples[-1])
    rows = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "completion", "reward", "exact_answer"} <= set(rows[0])
    assert len(history("eval/sums/exact_match")) == 2
    report = export_run(run.data.tags["mlxlab.run_dir"], tmp_path / "exported", "hf")
    assert (tmp_path / "exported" / "config.json").is_file() and report["format"] == "hf"


@pytest.mark.slow  # three runs in subprocesses
def test_a_sigkilled_grpo_run_resumes_bitwise(tiny, tmp_path, cli_env):
    """experiment=grpo_arithmetic (mu = 2, beta > 0) SIGKILLed after its checkpoint at step 5,
    between the two passes over a generation, and resumed: the weights, the whole MLflow history
    (rewards, KL, clip ratios) and state.json equal an uninterrupted run's."""
    from test_resume import assert_resumes_bitwise

    args = grpo_args(tiny, "trainer.max_steps=10", "trainer.eval_every_steps=5",
                     "trainer.log_every_steps=2", "checkpoint.save_every_steps=5",
                     "checkpoint.save_every_minutes=null")
    cli_env["PYTHONPATH"] = f"{Path(__file__).parent}:{cli_env.get('PYTHONPATH', '')}"
    assert_resumes_bitwise(args, tmp_path, cli_env, "grpo")


@pytest.mark.slow  # ~8 min on 2 loaded cores: an SFT, a base evaluation, three GRPO runs
def test_grpo_beats_its_base_over_three_seeds(tmp_path):
    """benchmarks/quality/bench_gkd_learning.py --grpo end to end (docs/benchmarks.md, "GRPO: learning,
    proven"): the base starts between 10 % and 70 % on the 200 held-out prompts, and
    `mlxlab runs compare <base run> <grpo sweep>` finds the three seeds better, the paired
    interval over the examples above zero."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality" / "bench_gkd_learning.py"), "--grpo",
                           "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert 0.10 <= results["base_exact_match"] <= 0.70
    compare = json.loads(results["compare"])
    (exact,) = [p for p in compare["paired"] if p["metric"] == "exact_match"]
    assert exact["n"] == 200 and exact["seeds_b"] == 3 and exact["low"] > 0, exact
    assert len(compare["per_seed"]) == 3


@pytest.mark.slow  # two short trials in one process
def test_optuna_searches_beta_the_learning_rate_and_g(tiny, tmp_path):
    """hparams_search=grpo_optuna: two real trials over objective.beta, the learning rate and
    objective.num_generations, each child run scored by val/reward, the parent holding the best."""
    from mlxlab.sweeps.store import sweep_children
    from test_sweeps import client_for, mlxlab_train, sweep_parents

    args = [a for a in grpo_args(tiny, "trainer.max_steps=4", "trainer.eval_every_steps=2")
            if not a.startswith(("experiment=", "objective.rewards=", "objective.beta=",
                                 "objective.num_generations=", "optimizer.learning_rate="))]
    mlxlab_train(tmp_path, "--multirun", "hparams_search=grpo_optuna",
                 "hydra.sweeper.n_trials=2", "hydra/launcher=basic",
                 "hydra.sweeper.sampler.seed=0", *args)
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "grpo_arithmetic")
    children = sweep_children(client, parent.info.run_id)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for key in ("objective.beta", "optimizer.learning_rate", "objective.num_generations"):
        assert len({r.data.params[key] for r in children}) == 2, key
    scores = [r.data.metrics["best/val/reward"] for r in children]
    assert client.get_run(parent.info.run_id).data.metrics["optuna/best_value"] == max(scores)


def test_the_memory_probe_is_a_rollout_batch_at_its_largest(tiny):
    """GRPO's probe batch: the first prompts, each num_generations times, every completion
    max_completion_length long (the run's width), with the advantages and the old and
    reference log-probs the loss reads (mu > 1, beta > 0); nothing sampled, no key drawn."""
    data = prompt_data(tiny)
    model = lora_model(tiny, data)
    grpo = objective(tiny, data, model, num_iterations=2, beta=0.04)
    key = np.array(grpo.sampler.key)
    batch = grpo.probe_batch(data, Batching(batch_size=2))
    rows, width = 2 * 4, grpo.sampler.width
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (rows, width)
    assert batch["advantages"].shape == (rows,)
    assert batch["old_logps"].shape == batch["ref_logps"].shape == (rows, width)
    assert batch["loss_mask"].sum(axis=1).tolist() == [6.0] * rows  # every completion its longest
    np.testing.assert_array_equal(np.array(grpo.sampler.key), key)
    loss, aux = grpo.loss(model, batch)
    assert np.isfinite(loss.item()) and aux["ntokens"].item() == rows * 6
    assert grpo.probe_loss() is None  # the data's batches are prompts: no loss of its own


@pytest.mark.parametrize("objective", ["supervised", "distill"])
def test_prompts_alone_under_an_objective_that_trains_on_rows_is_one_line(tmp_path, objective):
    """data=prompts has no completions: supervised (or distillation) training on it was a KeyError
    in the first step; now config.validate names the two and the fix."""
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.config import validate

    cfg = compose_cfg(tmp_path, ["experiment=finetune_completions", "data=prompts",
                                 f"objective={objective}", "model.pretrained=/nowhere"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match="holds prompts without completions, and objective "):
        validate(cfg)


def test_gradient_norms_of_a_probe_under_grpo_are_one_line(tiny, make_cfg):
    """GRPO trains on rollouts it makes: a probe batch of prompts has no loss to differentiate,
    so callbacks.analysis.grad_norms=true is refused (it failed at every analysis before)."""
    from mlxlab.train import train

    args = [a for a in grpo_args(tiny) if a != "data.val_file=null"]
    with pytest.raises(ConfigError, match="set callbacks.analysis.grad_norms=false"):
        train(make_cfg(*args, f"data.val_file={tiny['prompts']}", "callbacks=analysis"))
