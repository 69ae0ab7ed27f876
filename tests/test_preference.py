"""Preference tuning: data=preference renders pairs as data=chat renders chats, and
experiment=dpo_chat / orpo_chat train through the one loop on a tiny random Llama with a ChatML
template, logging the reward metrics to a real MLflow store; a SIGKILLed DPO run resumes
bitwise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import save_tiny_model
from mlxlab.data.batching import Batching
from mlxlab.data.chat import encode_chat, load_chat_template
from mlxlab.data.preference import KEYS, PreferencePairs
from mlxlab.errors import ConfigError

WORDS = ["cat", "dog", "sun", "tree", "ball", "milk", "red", "big", "hat", "cup"]


def generated_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs a model can learn to tell apart: the chosen reply repeats one pattern
    ("yes yes yes"), the rejected one is random words; prompts are random words too. Every
    fourth pair is conversational (TRL's form), the rest strings (mlx-lm-lora's)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, 4))
        chosen = " ".join(["yes"] * int(rng.integers(2, 5)))
        rejected = " ".join(rng.choice(WORDS, int(rng.integers(2, 5))))
        if i % 4 == 3:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_model(tmp_path_factory) -> dict:
    """A tiny random Llama with ChatML's tokens and template, 240 training and 40 held-out
    generated pairs."""
    root = tmp_path_factory.mktemp("preference")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    return {
        "folder": folder,
        "root": root,
        "train": write_jsonl(root / "train.jsonl", generated_pairs(240)),
        "val": write_jsonl(root / "val.jsonl", generated_pairs(40, seed=1)),
    }


def pairs_data(folder: Path, train: Path, **kwargs) -> PreferencePairs:
    data = PreferencePairs(str(train), tokenizer={"path": str(folder / "tokenizer.json")}, **kwargs)
    data.setup(None)
    return data


# --- data=preference --------------------------------------------------------------------------


def test_each_side_is_the_chat_renderers_chat_scored_on_its_reply(pref_model, tmp_path):
    """Every form of a row gives the ids encode_chat gives for prompt + reply (data=chat's one
    renderer), and the completion mask is the reply and its <|im_end|> alone."""
    system = {"role": "system", "content": "be kind"}
    user = {"role": "user", "content": "hi there"}
    yes, no = {"role": "assistant", "content": "yes yes"}, {"role": "assistant", "content": "no"}
    rows = [
        {"prompt": "hi there", "chosen": "yes yes", "rejected": "no", "system": "be kind"},
        {"prompt": [system, user], "chosen": [yes], "rejected": no},
        {"chosen": [system, user, yes], "rejected": [system, user, no]},
    ]  # implicit prompt
    folder = pref_model["folder"]
    data = pairs_data(
        folder, write_jsonl(tmp_path / "p.jsonl", rows), val_file=str(tmp_path / "p.jsonl")
    )
    template = load_chat_template(folder)
    for side, reply in (("chosen", yes), ("rejected", no)):
        expected = encode_chat(data.tokenizer, template, [system, user, reply])
        for i in range(3):
            ids, mask = data.val.ids[side][i], data.val.masks[side][i]
            assert np.array_equal(ids, expected.ids), (side, i)
            learnt = data.tokenizer.decode(
                [int(t) for t, m in zip(ids, mask) if m], skip_special_tokens=False
            )
            assert learnt == reply["content"] + "<|im_end|>"

    batch = next(iter(data.val_batches(Batching(batch_size=3))))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["index"].tolist() == [0, 1, 2]
    # labels are the inputs shifted by one; the mask sits on the positions predicting the reply
    ids = np.array(batch["chosen_input_ids"])
    assert np.array_equal(np.array(batch["chosen_labels"])[:, :-1], ids[:, 1:])


def test_long_pairs_are_cut_or_dropped_and_counted(pref_model, caplog):
    folder, train = pref_model["folder"], pref_model["train"]
    full = pairs_data(folder, train)
    longest = int(full.train.lengths().max())
    with caplog.at_level(logging.WARNING):
        cut = pairs_data(folder, train, max_length=longest - 3)
        dropped = pairs_data(folder, train, max_length=longest - 3, too_long="drop")
    lines = [r.getMessage() for r in caplog.records]
    assert any("were cut (data.too_long=truncate)" in line for line in lines)
    n_long = int(lines[0].split(": ")[1].split(" of ")[0])
    assert n_long > 0 and len(dropped.train) == len(full.train) - n_long
    assert len(cut.train) == len(full.train)
    assert max(len(ids) for ids in cut.train.ids["chosen"]) <= longest - 2


def test_a_bad_row_names_its_line_and_the_fix(pref_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*generated_pairs(2), {"prompt": "a", "chosen": "b"}])
    with pytest.raises(
        ConfigError,
        match=r"bad.jsonl:3: not a JSON object with 'chosen' and "
        r"'rejected'; fix the line",
    ):
        pairs_data(pref_model["folder"], bad)
    with pytest.raises(ConfigError, match="data.keys has unknown keys"):
        PreferencePairs(str(bad), keys={"answer": "x"})


# --- the reference model ---------------------------------------------------------------------


def loss_parts(folder: Path, data: PreferencePairs, reference: str, rank: int = 8) -> dict:
    """The first training batch's loss and metrics with `reference`, on the tiny Llama with
    LoRA (rank 8) or without (rank 0), its adapters given weights so policy != reference."""
    import mlx.core as mx

    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.objectives.preference.preference import Preference

    mx.random.seed(0)
    model = MLXLMDecoder(
        vocab_size=data.vocab_size,
        pretrained=str(folder),
        lora={"rank": rank, "targets": ["query", "value"]} if rank else None,
    )
    batching = Batching(batch_size=8)
    objective = Preference(reference=reference)
    objective_loss(objective, data, batching, model)
    loss_fn = objective.loss_on("val")  # (a cached reference keeps a table per split)
    # the policy moves away from the reference (as training does), after the reference is built
    model.update(
        tree_map_params(
            model,
            lambda name, p: (
                p + 0.05
                if name.endswith("lora_b") or (not rank and name.endswith("q_proj.weight"))
                else p
            ),
        )
    )
    batch = next(iter(data.val_batches(batching)))
    loss, aux = loss_fn(model, batch)
    return {"loss": loss.item(), **{k: v.item() for k, v in aux.items()}}


def objective_loss(objective, data, batching, model):
    """`objective`'s loss on `data`, set up as a fit sets it up (its reference from `model`)."""
    from mlxlab.objectives.base import ObjectiveSetup
    from mlxlab.runtime.cluster.distributed import World

    objective.setup(ObjectiveSetup(model=model, data=data, batching=batching, world=World()))
    return objective.loss


def tree_map_params(model, fn):
    from mlx.utils import tree_flatten, tree_unflatten

    return tree_unflatten([(n, fn(n, p)) for n, p in tree_flatten(model.parameters())])


def test_the_reference_is_the_base_model_with_adapters_off_a_copy_or_cached(pref_model, tmp_path):
    """DPO against the adapters switched off, against log-probs cached before training (read
    back from data.cache_dir by a second build), and, without LoRA, against a frozen copy: the
    reference's log-probs are the starting model's in each, so the reward of a pair is beta x
    the policy's change; and a changed policy moves the rewards off zero."""
    folder = pref_model["folder"]
    data = pairs_data(
        folder,
        pref_model["train"],
        val_file=str(pref_model["val"]),
        cache_dir=str(tmp_path / "cache"),
    )
    adapters = loss_parts(folder, data, "adapters")
    cached = loss_parts(folder, data, "cached")
    assert list((tmp_path / "cache" / "preference_reference").glob("*.npz"))
    again = loss_parts(folder, data, "cached")  # read from the file this time
    for key in adapters:
        assert cached[key] == pytest.approx(adapters[key], abs=2e-5), key
        assert again[key] == cached[key], key
    assert abs(adapters["rewards/margin"]) > 1e-3 and adapters["ntokens"] == 8
    copy = loss_parts(folder, data, "copy", rank=0)
    assert abs(copy["rewards/chosen"]) > 1e-3 and copy["logps/chosen"] != adapters["logps/chosen"]
    with pytest.raises(ConfigError, match="reference=adapters needs LoRA adapters"):
        loss_parts(folder, data, "adapters", rank=0)


# --- experiment=dpo_chat / orpo_chat: the one loop, a real MLflow store -----------------------

REWARDS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
)


def preference_args(model: dict, *extra: str) -> list[str]:
    return [
        f"model.pretrained={model['folder']}",
        f"data.train_file={model['train']}",
        f"data.val_file={model['val']}",
        "trainer.batch_size=8",
        "trainer.max_steps=40",
        "trainer.eval_every_steps=20",
        "trainer.log_every_steps=1",
        "trainer.schedule.warmup_steps=0",
        "callbacks.progress.enabled=false",
        *extra,
    ]


# ORPO's loss and NLL term against numpy: tests/test_preference_losses.py; its 40-step run -m slow
@pytest.mark.parametrize(("experiment", "lr"), [
    ("dpo_chat", "3e-3"), pytest.param("orpo_chat", "3e-3", marks=pytest.mark.slow)])
def test_preference_experiments_train_and_log_the_rewards(pref_model, make_cfg, experiment, lr):
    """40 steps of LoRA on 240 generated pairs: every reward metric at every step in MLflow
    (train/ and, at the evaluations, val/), DPO's mean margin over its last 10 logged steps
    above its first 10's, and the held-out pairs' accuracy up; ORPO adds its NLL term."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    cfg = make_cfg(
        f"experiment={experiment}", f"optimizer.learning_rate={lr}", *preference_args(pref_model)
    )
    metrics = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id]
    )[0]
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["choice.objective"] == experiment.split("_")[0]
    )

    def history(key: str) -> list[float]:
        rows = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        return [v for _, v in rows]

    for key in REWARDS:
        assert len(history(f"train/{key}")) == 40, key
        assert len(history(f"val/{key}")) == 2, key
    margin, accuracy = history("train/rewards/margin"), history("val/rewards/accuracy")
    assert np.mean(margin[-10:]) > np.mean(margin[:10]), margin
    assert accuracy[-1] >= 0.9 and metrics["val/rewards/accuracy"] == max(accuracy)
    if experiment == "orpo_chat":
        nll = history("train/nll_loss")
        assert len(nll) == 40 and np.mean(nll[-10:]) < np.mean(nll[:10])


@pytest.mark.slow
def test_a_sigkilled_dpo_run_resumes_bitwise(pref_model, tmp_path, cli_env):
    """experiment=dpo_chat with the reference cached in data.cache_dir, SIGKILLed after its
    checkpoint at step 9 and resumed: the weights, the whole MLflow history (rewards included)
    and state.json's equal an uninterrupted run's; the resumed run reads the reference log-probs
    the killed run computed."""
    from run_helpers import committed_steps, kill_when, run, start
    from test_resume import assert_same_history, assert_same_weights, run_id_of

    args = [
        "experiment=dpo_chat",
        "optimizer.learning_rate=3e-3",
        *preference_args(
            pref_model,
            "trainer.max_steps=16",
            "trainer.eval_every_steps=8",
            "trainer.log_every_steps=2",
            "objective.reference=cached",
            "checkpoint.save_every_steps=3",
            "checkpoint.save_every_minutes=null",
        ),
    ]
    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 9 for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < 16
    resumed = tmp_path / "resumed"
    out = run([*args, f"resume={killed}"], resumed, cli_env)
    assert "reference log-probs of 240 + 40 pairs read from" in out.stdout + out.stderr
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    assert_same_weights(reference, resumed, "dpo")
    assert run_id_of(resumed) == run_id_of(killed)
    assert_same_history(f"sqlite:///{tmp_path}/mlruns/mlflow.db", reference, resumed, "dpo")


# --- data parallelism: a rank left without rows of a pair batch --------------------------------


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "orpo", "simpo"])
def test_a_rank_without_rows_of_a_pair_batch_weighs_nothing(pref_model, loss):
    """A global batch of one pair on two ranks: rank 1 trains on the pair, rank 0 on the row
    World.shard_rows masks (both sides' loss masks 0). Rank 0's step counts 0 pairs, and its
    loss and gradient are finite (ORPO's log(1 - P) at a mean log-prob of 0 included), so the
    sum over ranks is rank 1's alone."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.objectives.preference.preference import Preference
    from mlxlab.runtime.cluster.distributed import World

    data = pairs_data(pref_model["folder"], pref_model["train"])
    model = MLXLMDecoder(
        vocab_size=data.vocab_size,
        pretrained=str(pref_model["folder"]),
        lora={"rank": 4, "targets": ["query", "value"]},
    )
    batching = Batching(batch_size=1)
    loss_fn = objective_loss(Preference(loss=loss), data, batching, model)
    batch = next(iter(data.val_batches(batching)))
    step = nn.value_and_grad(model, loss_fn)
    counted = []
    for rank in (0, 1):
        rows = World(rank=rank, size=2).shard_rows(batch)
        assert not rows["chosen_loss_mask"].any().item() if rank == 0 else True
        (value, aux), grads = step(model, rows)
        n = aux["ntokens"].item()
        assert np.isfinite(value.item()) and all(
            np.isfinite(np.array(g)).all() for _, g in tree_flatten(grads)
        ), rank
        # the gradient itself, not weighted by n: the masked row must contribute nothing
        counted.append((n, max(float(mx.abs(g).max()) for _, g in tree_flatten(grads))))
    assert counted[0] == (0.0, 0.0) and counted[1][0] == 1.0 and counted[1][1] > 0, counted


def test_dpo_chat_with_the_quick_preset_is_a_20_step_dpo_run(pref_model, make_cfg):
    """The axes compose, as a new user expects: `experiment=dpo_chat preset=quick` keeps the
    experiment's objective and data (the run-length preset sets lengths only) for the preset's
    20 steps, evaluated at 10 and 20, and passes the checks a run makes before it starts; that
    objective on that data trains and logs its rewards in
    test_preference_experiments_train_and_log_the_rewards."""
    from mlxlab.config import validate

    args = [a for a in preference_args(pref_model) if not a.startswith(("trainer.max_steps",
                                                                       "trainer.eval_every"))]
    cfg = make_cfg("experiment=dpo_chat", "preset=quick", *args)
    validate(cfg)
    alone = make_cfg("experiment=dpo_chat", *args)
    assert (cfg.objective, cfg.data, cfg.model) == (alone.objective, alone.data, alone.model)
    assert cfg.objective._target_.endswith(".Preference") and cfg.objective.loss == "sigmoid"
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every_steps) == (20, 10)


@pytest.mark.slow  # a DPO run; the analysis callback's own tests run in the default run
def test_the_analysis_callback_scores_a_dpo_probe_with_the_dpo_loss(pref_model, make_cfg):
    """callbacks=analysis on preference data: the probe's gradient norms come from the run's
    own (DPO) loss and its attention and sample from the chosen side; before, every analysis
    failed with a warning (task cross-entropy on a batch without input_ids) and logged nothing."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    cfg = make_cfg("experiment=dpo_chat", *preference_args(
        pref_model, "trainer.max_steps=6", "trainer.eval_every_steps=6", "callbacks=analysis",
        "callbacks.analysis.every_steps=3", "callbacks.analysis.sample_tokens=4"))
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    grads = [k for k in run.data.metrics if k.startswith("analysis/grad_norm/")]
    assert grads, sorted(run.data.metrics)
    # step 6's analysis is skipped when step 3's still runs (a busy machine): never a stall
    steps = [m.step for m in client.get_metric_history(run.info.run_id, grads[0])]
    assert steps[:1] == [3] and set(steps) <= {3, 6}
    assert len(steps) + run.data.metrics.get("analysis/skipped", 0) == 2
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == [f"samples/step_{step:06d}.txt" for step in steps]


# --- the other losses and a full fine-tune, through the one loop -------------------------------


@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        # the losses themselves: test_a_rank_without_rows_of_a_pair_batch_weighs_nothing
        pytest.param("ipo", (), marks=pytest.mark.slow),
        pytest.param("simpo", (), marks=pytest.mark.slow),
        ("sigmoid", ("model.lora.rank=0", "objective.reference=copy")),
    ],
    ids=["ipo", "simpo", "dpo_full_copy"],
)
def test_ipo_simpo_and_a_full_dpo_with_a_frozen_copy_train(pref_model, make_cfg, loss, extra):
    """objective=dpo objective.loss=ipo|simpo, and DPO without LoRA against a frozen
    copy of the starting model: 8 steps through the one loop, the reward metrics in MLflow at
    each step, the margin up from the first logged step to the last."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    cfg = make_cfg(
        "experiment=dpo_chat",
        f"objective.loss={loss}",
        "optimizer.learning_rate=3e-3" if loss != "sigmoid" else "optimizer.learning_rate=1e-3",
        *preference_args(pref_model, "trainer.max_steps=8", "trainer.eval_every_steps=8"),
        *extra,
    )
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id]
    )[0]
    assert run.info.status == "FINISHED" and run.data.params["objective.loss"] == loss

    def history(key: str) -> list[float]:
        return [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]

    for key in REWARDS:
        assert len(history(f"train/{key}")) == 8 and len(history(f"val/{key}")) == 1, key
    margin = history("train/rewards/margin")
    assert np.mean(margin[-3:]) > np.mean(margin[:3]), margin


# --- the search, replicates and runs compare on a preference metric ----------------------------


@pytest.mark.slow
def test_optuna_over_beta_and_lr_then_replicates_compared_on_reward_accuracy(pref_model, tmp_path):
    """hparams_search=dpo_optuna: 3 real trials over objective.beta and the learning
    rate, each child run scored by val/rewards/accuracy, the parent holding the best; then
    `-m replicates=2 objective.beta=0.05,0.5` and `mlxlab runs compare latest` on
    val/rewards/accuracy (the sweep's own metric): two groups of two seeds, a verdict."""
    from conftest import PYTHON
    from mlxlab.sweeps.store import sweep_children
    from test_sweeps import client_for, mlxlab_train, run, sweep_parents

    short = [
        a
        for a in preference_args(pref_model, "trainer.max_steps=8", "trainer.eval_every_steps=4")
        if not a.startswith("trainer.log_every_steps")
    ] + ["trainer.log_every_steps=4", "checkpoint.save_every_minutes=null"]
    mlxlab_train(
        tmp_path,
        "--multirun",
        "hparams_search=dpo_optuna",
        "hydra.sweeper.n_trials=3",
        # trials in this process: with the joblib launcher every search here (titanic_optuna
        # too) stopped at "PicklingError: Could not pickle the task" on 2026-11-25
        "hydra/launcher=basic",
        "hydra.sweeper.sampler.seed=0",
        "optimizer.learning_rate=tag(log,interval(1e-3,1e-2))",
        *short,
    )
    client = client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (parent,) = sweep_parents(client, "dpo_chat")
    children = sweep_children(client, parent.info.run_id)
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    scores = [r.data.metrics["best/val/rewards/accuracy"] for r in children]
    betas = {r.data.params["objective.beta"] for r in children}
    assert len(betas) == 3 and all(0.01 <= float(b) <= 1.0 for b in betas)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["optuna/best_value"] == pytest.approx(max(scores))
    assert "optuna.best.objective.beta" in parent.data.tags  # tags: a resumed search may move it

    mlxlab_train(
        tmp_path,
        "--multirun",
        "experiment=dpo_chat",
        "replicates=2",
        "objective.beta=0.05,0.5",
        "optimizer.learning_rate=3e-3",
        *short,
    )
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    compare = [PYTHON, "-m", "mlxlab.cli.main", "runs", "compare", "latest", "--uri", uri]
    out = run([*compare, "--json"], cwd=tmp_path)  # stdout, then the log lines of stderr
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{") :])
    text = json.dumps(report)
    assert "val/rewards/accuracy" in text and "objective.beta" in text, text[:2000]
    print(run(compare, cwd=tmp_path))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"loss": "ipo", "label_smoothing": 0.1}, r"label_smoothing=0.1 has no meaning for loss=ipo"),
        ({"loss": "orpo", "reference": "cached"}, r"loss=orpo uses no reference model"),
        ({"loss": "simpo", "reference": "copy"}, r"loss=simpo uses no reference model"),
        ({"loss": "sigmoid", "gamma": 1.0}, r"gamma=1.0 is SimPO's target margin and has no "
         r"meaning for loss=sigmoid"),
    ],
)
def test_a_setting_the_loss_would_ignore_is_one_config_error(setting, message):
    from mlxlab.errors import ConfigError
    from mlxlab.objectives.preference.preference import Preference

    with pytest.raises(ConfigError, match=message):
        Preference(**setting)
    Preference(loss=setting["loss"])  # the same loss with the defaults is fine


# --- a saturating monitor, settings the run would ignore, pairs that cannot teach ------------


def test_a_saturated_monitor_keeps_the_later_lower_loss_checkpoint_and_says_so(
        pref_model, make_cfg, caplog):
    """DPO's val/rewards/accuracy reaches 1.0 on 8 easy held-out pairs and stays there while
    the validation loss keeps falling: the best checkpoint is not the first evaluation at 1.0
    (ties went to the earliest step) but the one with the lowest val/loss; the log and the
    run's tag mlxlab.best_checkpoint say that a tie was broken and how."""
    import logging

    from mlflow.tracking import MlflowClient

    from mlxlab.checkpoint import CheckpointState
    from mlxlab.train import train

    val = write_jsonl(pref_model["root"] / "val8.jsonl", generated_pairs(8, seed=3))
    cfg = make_cfg("experiment=dpo_chat", "optimizer.learning_rate=3e-3",
                   *preference_args(pref_model, "trainer.eval_every_steps=8",
                                    "trainer.max_steps=24"),
                   f"data.val_file={val}")
    with caplog.at_level(logging.INFO, logger="mlxlab"):
        metrics = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])[0]
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
               for k in ("val/rewards/accuracy", "val/loss")}
    saturated = [s for s, v in sorted(history["val/rewards/accuracy"].items()) if v == 1.0]
    assert len(saturated) >= 2, history  # the monitor ties at 1.0
    lowest = min(saturated, key=lambda s: (history["val/loss"][s], -s))
    assert metrics["best_step"] == lowest != saturated[0], history
    best = CheckpointState.read(Path(cfg.paths.output_dir) / "checkpoints" / "best")
    assert best.step == lowest
    tag = run.data.tags["mlxlab.best_checkpoint"]
    assert tag.startswith(f"step {lowest}: val/rewards/accuracy 1 ties step ") and \
        "the lower val/loss" in tag, tag
    assert any("ties step" in r.getMessage() and "val/loss" in r.getMessage()
               for r in caplog.records)
    last = [r.getMessage() for r in caplog.records if "| best val/rewards/accuracy" in
            r.getMessage()][-1]  # the evaluation line names the same best step
    assert last.endswith(f"| best val/rewards/accuracy 1.0000 (step {lowest})"), last


IGNORED_SETTINGS = [
    (["trainer.label_smoothing=0.3"],  # a renamed key: its name now
     "trainer.label_smoothing is renamed to objective.label_smoothing: write "
     "objective.label_smoothing=0.3"),
    (["objective=orpo", "objective.label_smoothing=0.3"],
     "objective.label_smoothing=0.3 has no meaning for loss=orpo"),
    (["objective.gamma=1.0"], "objective.gamma=1.0 is SimPO's target margin and has no "
     "meaning for loss=sigmoid"),
    (["objective=grpo", "objective.label_smoothing=0.1"], "objective.label_smoothing is "
     "not a setting of objective=grpo (a setting of objective=distill|dpo|orpo|speech_to_text|supervised)"),
    (["optimized_metric=val/nll_loss"],
     "optimized_metric='val/nll_loss' is not computed for preference data by objective "
     "Preference(loss=sigmoid): choose one of ['val/loss', 'val/rewards/accuracy'"),
    (["trainer.beta=0.3"], "trainer.beta is not a key of trainer: did you mean "
     "objective.beta=0.3?"),
    (["data.keys.rejected=chosen"], "240 of 240 pairs have the same chosen and rejected "
     "reply"),
]


@pytest.fixture(scope="module")
def ignored_settings_refused(pref_model, tmp_path_factory) -> list:
    """`mlxlab-train experiment=dpo_chat ...` with each setting of IGNORED_SETTINGS, in turn in
    one process rooted in one folder: (exit status, stderr, the folder's names after it)."""
    import os

    from one_process import each_in_one_process

    root = tmp_path_factory.mktemp("ignored-settings")
    env = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    argvs = [["mlxlab-train", "experiment=dpo_chat", "tracking=none",
              *preference_args(pref_model), *extra] for extra, _ in IGNORED_SETTINGS]
    return each_in_one_process(argvs, env, cwd=root, after="one_process:names_here")


@pytest.mark.parametrize("case", range(len(IGNORED_SETTINGS)),
                         ids=[f"extra{i}" for i in range(len(IGNORED_SETTINGS))])
def test_a_setting_the_run_would_ignore_is_one_line_exit_2_and_nothing_created(
        ignored_settings_refused, case):
    """Each setting would be ignored or could not teach if trained on (identical metrics; a
    metric never logged, so no best checkpoint; Hydra's multi-line "not in struct" with exit 1;
    pairs with zero gradient, accuracy 0): one line, exit 2, before a run folder exists."""
    message = IGNORED_SETTINGS[case][1]
    code, stderr, names = ignored_settings_refused[case]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert code == 2, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("mlxlab: error: "), stderr[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert "outputs" not in names, names


def test_a_few_pairs_with_equal_replies_are_a_warning_naming_the_first(tmp_path, caplog):
    from mlxlab.data.preference import read_pairs

    rows = generated_pairs(10)
    rows[6] = {**rows[6], "rejected": rows[6]["chosen"]}
    with caplog.at_level(logging.WARNING):
        read = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows), dict(KEYS))
    assert len(read.rows) == 10
    assert "1 of 10 pairs have the same chosen and rejected reply (line 7 the first)" in caplog.text
