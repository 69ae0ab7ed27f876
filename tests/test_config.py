"""Every config-group option composes; bad input fails early with one clear line."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import PYTHON, compose_cfg, cross_encoder_stub, model_folder_stub
from mlxlab.config import ConfigError, config_dir, to_container, validate

CONF = Path(config_dir())
GROUPS = ["model", "data", "objective", "trainer", "preset", "optimizer", "callbacks", "checkpoint",
          "tracking", "experiment", "hparams_search", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    for group in ["model", "data", "objective", "trainer", "preset", "optimizer", "callbacks",
                  "tracking", "experiment"]:
        assert any(g == group for g, _ in OPTIONS), f"conf/{group}/ is empty"


# the embedder's options, and the rows each loss reads (the shipped pairs carry no score)
EMBEDDING = ("sentence_embedder", "sentence_pairs", "embed_retrieval", "mnrl", "cached_mnrl",
             "matryoshka", "cosent", "margin_mse", "distill_kl_div")
SCORED_ROWS = {"cosent": {"s1": "a cat", "s2": "a dog", "score": 0.5},
               "margin_mse": {"q": "cat", "p": "a cat", "n": "a dog", "label": 1.5},
               "distill_kl_div": {"q": "cat", "p": "a cat", "n": "a dog", "label": [2.0, 1.0]}}


def embedding_case(root: Path, group: str, option: str) -> list[str]:
    from embedder_fixtures import write_tiny_folder

    extra = ["experiment=embed_retrieval", f"{group}={option}",
             f"model.pretrained={write_tiny_folder(root / 'st')}"]
    if option in SCORED_ROWS:
        rows = root / "rows.jsonl"
        rows.write_text("".join(json.dumps(SCORED_ROWS[option]) + "\n" for _ in range(10)))
        extra.append(f"data.train_file={rows}")
    return extra


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(tmp_path, group, option):
    # language-model data reports val/loss and val/perplexity, not the default val/accuracy
    lm_data = ("streaming", "completions", "chat", "preference")  # preference: val/loss too
    extra = ["optimized_metric=val/loss", "optimized_mode=min"] if option in lm_data else []
    if option == "csv":  # the generic CSV option has no file or label column of its own
        extra = ["data.path=my.csv", "data.label_column=target"]
    if option == "preference" or option in ("dpo", "orpo"):  # pairs train with a pair objective
        extra = ["experiment=dpo_chat", f"{group}={option}"]
    if option in ("unpaired", "kto"):  # rated completions train with objective=kto (and back)
        extra = ["experiment=kto_chat", f"{group}={option}"]
    if option == "reward":  # a reward model: pairs and a scalar head
        extra = ["experiment=reward_chat"]
    if option in ("prompts", "grpo"):  # prompts are completed by objective=grpo (and back)
        extra = ["experiment=grpo_arithmetic", f"{group}={option}"]
    if option in ("gkd", "gkd_arithmetic"):  # a teacher, with the tokenizer.json it is read by
        (tmp_path / "teacher").mkdir()
        (tmp_path / "teacher" / "tokenizer.json").write_text("{}")
        extra = ["experiment=gkd_arithmetic", f"objective.teachers=[{tmp_path / 'teacher'}]"]
    if option in ("hf_decoder", "finetune_completions", "finetune_text", "finetune_chat",
                  "dpo_chat", "orpo_chat", "dpo_optuna", "preference", "dpo", "orpo", "prompts",
                  "grpo", "grpo_arithmetic", "grpo_copy", "grpo_optuna", "gkd", "gkd_arithmetic",
                  "agent_tools", "unpaired", "kto", "kto_chat", "reward", "reward_chat",
                  "draft_model"):
        extra.append(f"model.pretrained={model_folder_stub(tmp_path)}")  # the user's (???)
    if option == "draft_model":  # the stub's 2 blocks: a draft keeps 1, for its teacher
        (tmp_path / "teacher").mkdir(exist_ok=True)
        (tmp_path / "teacher" / "tokenizer.json").write_text("{}")
        extra += ["model.keep_layers=1", f"objective.teachers=[{tmp_path / 'teacher'}]",
                  "data.train_file=${asset:arithmetic/train.jsonl}", "objective.completion_key=answer"]
    if option in ("cross_encoder", "rerank_pairs", "rerank_lists", "rerank"):  # a reranker's folder
        extra = ["experiment=rerank", f"{group}={option}",
                 f"model.pretrained={cross_encoder_stub(tmp_path)}"]
        if option == "rerank_lists":
            extra.append("objective.loss=ListNetLoss")
    if option in ("vision_language", "vision_chat", "finetune_vision"):  # a VLM and its images
        from vision_models import tiny_vlm

        extra = ["experiment=finetune_vision", f"{group}={option}", "optimized_metric=val/loss",
                 f"model.pretrained={tiny_vlm('smolvlm', tmp_path / 'vlm')}"]
    if option in EMBEDDING:  # a sentence-transformers folder, rows with the loss's columns
        extra = embedding_case(tmp_path, group, option)
    if option in ("whisper", "speech", "speech_to_text", "finetune_speech"):  # Whisper, audio
        from speech_fixtures import utterance_set, write_jsonl
        from whisper_fixtures import whisper_folder

        rows = write_jsonl(tmp_path / "train.jsonl", utterance_set(tmp_path))
        extra = ["experiment=finetune_speech", f"{group}={option}", f"data.train_file={rows}",
                 f"model.pretrained={whisper_folder(tmp_path / 'whisper')}"]
    cfg = compose_cfg(tmp_path, [f"{group}={option}", *extra])
    container = to_container(cfg)  # every interpolation outside Hydra's own node resolves
    for g in ("model", "data", "trainer", "tracking"):
        assert "_target_" in container[g], f"{group}={option}: {g} lost its _target_"
    validate(cfg)


@pytest.mark.parametrize(("preset", "patience", "memory_every"),
                         [("quick", 0, 50), ("standard", 5, 0), ("production", 10, 100)])
def test_run_length_presets_tune_trainer_and_callbacks(tmp_path, preset, patience, memory_every):
    # run-length presets are a group of their own (global package): they compose with either
    # trainer, callbacks compose before them, overrides after
    for trainer in ("simple", "optimized"):
        cfg = compose_cfg(tmp_path, [f"preset={preset}", f"trainer={trainer}"])
        choices = cfg.hydra.runtime.choices
        assert (choices.preset, choices.trainer) == (preset, trainer)
        assert cfg.callbacks.early_stopping.patience == patience
        assert cfg.callbacks.memory.every == memory_every
        assert cfg.trainer.batching.dynamic == (trainer == "optimized")
    cfg = compose_cfg(tmp_path, [f"preset={preset}", "callbacks.early_stopping.patience=7"])
    assert cfg.callbacks.early_stopping.patience == 7


@pytest.mark.parametrize(("experiment", "objective", "loss"),
                         [("dpo_chat", "dpo", "sigmoid"), ("orpo_chat", "orpo", "orpo"),
                          ("distill_titanic", "distill", "kl")])
def test_an_experiments_objective_keeps_a_run_length_preset(tmp_path, experiment, objective, loss):
    """The axes compose: `experiment=dpo_chat preset=quick` is a 20-step DPO run (a run-length
    preset never drops the experiment's objective); the preset's length wins over the
    experiment's."""
    pretrained = ([f"model.pretrained={model_folder_stub(tmp_path)}"]
                  if experiment.endswith("_chat") else [])
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}", "preset=quick", *pretrained])
    assert cfg.hydra.runtime.choices.objective == objective and cfg.objective.loss == loss
    assert (cfg.trainer.max_steps, cfg.trainer.eval_every_steps) == (20, 10)
    assert cfg.trainer._target_.endswith("TrainerSettings") and "distill" not in cfg.trainer
    validate(cfg)


@pytest.mark.parametrize(("old", "new"), [
    ("trainer.preference.beta=0.2", "write objective.beta=0.2"),
    ("trainer.distill.teachers=[{run: a}]", "write objective.teachers=[{run: a}]"),
    ("trainer.label_smoothing=0.1", "write objective.label_smoothing=0.1"),
])
def test_a_renamed_key_names_the_new_one(old, new):
    from mlxlab.launch.argv import check_group_choices

    key = old.split("=")[0]
    now = new.removeprefix("write ").split("=")[0]
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{key} is renamed to {now}: {new}')}$"):
        check_group_choices(["experiment=dpo_chat", old])


@pytest.mark.parametrize(("experiment", "allowed"), [("orpo_chat", True), ("dpo_chat", False)])
def test_an_optimized_metric_only_another_loss_logs_is_refused(tmp_path, experiment, allowed):
    """ORPO logs val/nll_loss, DPO (the same objective class) does not: under DPO that metric is
    refused before the run, since it would never be logged and no best checkpoint kept."""
    cfg = compose_cfg(tmp_path, [f"experiment={experiment}",
                                 f"model.pretrained={model_folder_stub(tmp_path)}",
                                 "optimized_metric=val/nll_loss", "optimized_mode=min"])
    if allowed:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(
            "optimized_metric='val/nll_loss' is not computed for preference data by objective "
            "Preference(loss=sigmoid): choose one of ['val/loss', 'val/rewards/accuracy'")):
        validate(cfg)


@pytest.mark.parametrize(("argv", "message"), [
    (["trainer.beta=0.3"], "trainer.beta is not a key of trainer: did you mean objective.beta=0.3? "
     "(a setting of objective=dpo|gkd|grpo|kto|orpo)"),
    (["experiment=grpo_arithmetic", "objective.gamma=1.0"], "objective.gamma is not a setting of "
     "objective=grpo (a setting of objective=dpo|orpo)"),
    (["objective.beta=0.2"], "objective.beta is not a setting of objective=supervised"),
    (["experiment=dpo_chat", "objective=supervised", "objective.loss=ipo"],
     "objective.loss is not a setting of objective=supervised"),
])
def test_a_key_the_run_has_not_names_the_key_meant(argv, message):
    """One line naming the key meant, where Hydra's multi-line "Key 'beta' is not in struct"
    (exit 1) gives no hint."""
    from mlxlab.launch.argv import check_misplaced_keys

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        check_misplaced_keys(argv)
    check_misplaced_keys(["experiment=dpo_chat", "objective.beta=0.2", "trainer.max_steps=3"])
    check_misplaced_keys(["objective=grpo", "+objective.extra=1"])  # added on purpose: its class says


def test_cli_a_trainer_choice_that_is_no_option_is_one_line(tmp_path, cli_env):
    out = run_cli(["trainer=quick", "tracking=none"], tmp_path, cli_env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "mlxlab: error: trainer=quick is not an option: choose one of ['optimized', 'simple'] "
        "(the files in conf/trainer/)"]


def test_defaults_are_the_start_here_experiment(tmp_path):
    cfg = compose_cfg(tmp_path)
    choices = cfg.hydra.runtime.choices
    assert (choices.model, choices.data, choices.trainer, choices.tracking) == (
        "bert", "titanic", "simple", "mlflow")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_rows_are_padded_to_the_backends_multiple_unless_one_is_given(tmp_path):
    """bucket_multiple null: 128 on a CUDA GPU (MLX fuses attention's backward only at lengths
    in multiples of 128), 16 on the CPU and Metal; a number given is used as it is."""
    from mlxlab.config import instantiate
    from mlxlab.runtime.compute import device
    from mlxlab.training.settings import bucket_multiple_for

    assert [bucket_multiple_for(b) for b in ("cuda", "cpu", "metal")] == [128, 16, 16]
    default = instantiate(compose_cfg(tmp_path).trainer).data_batching()
    assert default.bucket_multiple == bucket_multiple_for(device.backend())
    given = compose_cfg(tmp_path, ["trainer.batching.bucket_multiple=64"])
    assert instantiate(given.trainer).data_batching().bucket_multiple == 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.learning_rate=abc", "optimizer.learning_rate must be a number"),
        ("trainer.batch_size=0", "trainer.batch_size must be >= 1"),
        ("trainer.batching.max_batch_size=0", "trainer.batching.max_batch_size must be >= 1"),
        ("trainer.batching.bucket_multiple=0", "trainer.batching.bucket_multiple must be >= 1"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs must be an integer"),
        ("data.val_fraction=1.5", "data.val_fraction must be between 0 and 1"),
        ("data=streaming", "optimized_metric='val/accuracy' is not computed for lm data"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
        ("trainer.schedule.name=linear", "trainer.schedule.name='linear' is not one of"),
        ("optimizer._target_=mlx.optimizers.NoSuch", "optimizer._target_=mlx.optimizers.NoSuch is "
         "not importable: choose optimizer=adafactor|adam|adamw|lion|sgd"),
        ("optimizer._partial_=false", "needs _partial_: true"),
        ("callbacks=none", None),
        ("+callbacks.mine.every=3", r"callbacks.mine has no _target_: give the class, e.g. "
         r"'\+callbacks.mine=\{_target_: my_pkg.MyCallback\}'"),
        ("optimizer.bias_correction=maybe", "optimizer.bias_correction='maybe' is not one of"),
        ("optimizer.betas=[0.9,1.5]", r"optimizer.betas must be two numbers in \[0, 1\)"),
        ("optimizer.eps=-1", "optimizer.eps must be >= 0"),
        ("trainer.distributed.timeout_s=0", "trainer.distributed.timeout_s must be above 0"),
        ("trainer.distributed.timeout_s=-5", "trainer.distributed.timeout_s must be above 0"),
    ],
)
def test_bad_values_fail_validation(tmp_path, override, message):
    cfg = compose_cfg(tmp_path, [override])
    if message is None:  # a valid choice, listed beside the invalid ones it resembles
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_unknown_decoder_mlp_is_one_clear_error_where_the_model_is_built(tmp_path):
    """The owner (models/layers/blocks.py) checks its choices; train.py's main unwraps Hydra's
    InstantiationException to this one line."""
    from hydra.errors import InstantiationException

    from mlxlab.config import instantiate

    cfg = compose_cfg(tmp_path, ["experiment=tinystories_nano", "model.mlp=tanh"])
    with pytest.raises(InstantiationException) as raised:
        instantiate(cfg.model, vocab_size=64)
    assert isinstance(raised.value.__cause__, ConfigError)
    assert str(raised.value.__cause__) == ("unknown mlp='tanh'; use one of ['swiglu', 'geglu', "
                                           "'gelu', 'relu', 'silu']")
    cfg = compose_cfg(tmp_path, ["experiment=tinystories_nano", "model.mlp=geglu"])
    validate(cfg)
    instantiate(cfg.model, vocab_size=64)


def run_cli(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mlxlab.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_job_config_from_any_directory(tmp_path, cli_env):
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    out = run_cli(["--cfg", "job", "optimizer.learning_rate=3e-4", "model.num_layers=2"], elsewhere, cli_env)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.optimizer.learning_rate == 3e-4 and job.model.num_layers == 2


def test_cli_help_lists_groups(tmp_path, cli_env):
    out = run_cli(["--help"], tmp_path, cli_env)
    assert out.returncode == 0, out.stderr
    groups = out.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    for group in ("model", "data", "trainer", "tracking", "experiment"):
        # the group's line names every option in conf/<group>/ (the footer's examples don't count)
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert listed.get(group, "").split(", ") == options, (group, listed.get(group))


@pytest.mark.parametrize("group", ["model", "optimizer", "callbacks"])
def test_cli_unknown_group_option_is_one_line(tmp_path, cli_env, group):
    out = run_cli([f"{group}=nosuch", "tracking=none"], tmp_path, cli_env)
    assert out.returncode == 2
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert out.stderr.strip().splitlines() == [
        f"mlxlab: error: {group}=nosuch is not an option: choose one of {options} "
        f"(the files in conf/{group}/)"]
    assert not (tmp_path / "outputs").exists()


def test_cli_non_numeric_learning_rate_is_one_line(tmp_path, cli_env):
    out = run_cli(["optimizer.learning_rate=fast", "tracking=none"], tmp_path, cli_env)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlxlab: error:")]
    assert errors == ["mlxlab: error: optimizer.learning_rate must be a number, got 'fast': "
                      "fix the override, e.g. optimizer.learning_rate=3e-4"]
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "outputs").exists()  # no folder holding only .hydra/ and a log


@pytest.mark.parametrize(("overrides", "message"), [
    (["+trainer.batching.dynamc=true"],
     r"trainer\.batching\.dynamc is not a setting of trainer\.batching: it takes \['dynamic'"),
    (["data=streaming", "optimized_metric=val/loss", "+data.packing.sq_len=3"],
     r"data\.packing\.sq_len is not a setting of data\.packing: it takes \['seq_len'"),
    (["+data.nmeric=text"], r"data\.nmeric is not a setting of data=csv: it takes \['path'"),
    (["data.curriculum={strat: 0.1}"],
     r"data\.curriculum\.strat is not a setting of data\.curriculum: it takes \['score'"),
])
def test_every_node_names_an_unknown_key_the_same_way(tmp_path, overrides, message):
    """One helper (validation.record) builds each config node into its record: the trainer's
    groups, the streamed data's groups, the CSV settings and the curriculum."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(tmp_path, overrides))


def test_record_builds_a_mapping_and_keeps_anything_else():
    from mlxlab.config.records import record
    from mlxlab.data.streaming import Packing

    built = record(Packing, {"_target_": "ignored", "seq_len": 8}, "data.packing")
    assert (built.seq_len, built.stride) == (8, 8)
    assert record(Packing, built, "data.packing") is built
    assert record(Packing, None, "data.packing") is None  # the caller says what None means


@pytest.mark.parametrize(("override", "line"), [
    ("trainer.compile=maybe", "trainer.compile must be true or false, got 'maybe'"),
    ("trainer.batching.dynamic=sometimes",
     "trainer.batching.dynamic must be true or false, got 'sometimes'"),
])
def test_a_switch_set_to_a_word_is_refused_not_read_as_true(tmp_path, override, line):
    """A `bool` setting given a word is one line: 'maybe' is truthy and would run as true."""
    cfg = compose_cfg(tmp_path, [override])
    with pytest.raises(ConfigError, match=re.escape(line)):
        validate(cfg)
