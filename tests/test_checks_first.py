"""Bad input is found before anything exists: every setting a run can get wrong on its own
(the model folder, its type, quantize, LoRA's rank and targets, the objective against the data,
a `_target_` that does not import, a misspelled key) is one `mlxlab: error:` line and exit 2,
with no run folder, no MLflow store or run and no cache left behind. Real Hydra (its app, its
callbacks, its run folder), real config files, real mlx-lm classes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, compose_cfg, model_folder_stub
from mlxlab.config import asset_path, target_problem, validate
from mlxlab.errors import ConfigError

MLXLAB_TRAIN = str(Path(PYTHON).parent / "mlxlab-train")
# Runs mlxlab-train's Hydra app in this one process for each command line (argv lists in
# argv[1]), as `python -m mlxlab.train` does, and prints [exit code, stderr, what exists under
# the root afterwards] for each.
DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
from mlxlab.train import main
root = Path(sys.argv[2])
out = []
for args in json.loads(sys.argv[1]):
    sys.argv = ['mlxlab-train', *args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(supervised=False)
            code = 0
        except SystemExit as e:
            code = e.code
    left = sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.name != 'inputs'
                  and 'inputs' not in p.relative_to(root).parts)
    out.append([code, err.getvalue(), left])
print(json.dumps(out))
"""


def bad_settings(inputs: Path) -> list[tuple[list[str], str]]:
    """(command line, the start of its one line) for each bad setting the module's docstring lists:
    the model folder, its type, quantize, LoRA, the objective against the data, a `_target_`, a
    misspelled key."""
    stub = model_folder_stub(inputs)
    no_weights = inputs / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((stub / "config.json").read_text())
    unknown_type = inputs / "unknown-type"
    unknown_type.mkdir()
    (unknown_type / "config.json").write_text(json.dumps({
        **json.loads((stub / "config.json").read_text()), "model_type": "nosuchtype"}))
    (unknown_type / "model.safetensors").touch()
    chat = ["experiment=finetune_chat", f"model.pretrained={stub}"]
    teacher = inputs / "teacher"  # a tokenizer the checks read, nothing to load
    teacher.mkdir()
    (teacher / "tokenizer.json").write_text("{}")
    return [
        ([*chat, f"model.pretrained={no_weights}"],
         f"no model*.safetensors weights in {no_weights}"),
        ([*chat, f"model.pretrained={unknown_type}"],
         f"{unknown_type}: model_type='nosuchtype' is not an architecture mlx-lm"),
        ([*chat, "model.quantize=3"], "model.quantize=3: use 4, 8 or null"),
        ([*chat, "model.lora.rank=-1"], "model.lora.rank=-1 must be an integer >= 0"),
        ([*chat, "checkpoint.save_base=maybe"],
         "checkpoint.save_base='maybe' is not one of [true, false]"),
        ([*chat, "model.lora.targets=[qkv]"], "lora targets ['qkv'] match no Linear layer; "
         "available: ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj'"),
        ([*chat, "objective=dpo"], "objective Preference does not train on lm data; data=chat"),
        ([*chat, "objective=grpo"], "objective GRPO samples completions of prompts"),
        (["experiment=grpo_arithmetic", f"model.pretrained={stub}",
          "objective.rewards=[{_target_: my_rewards.brevity}]"],
         "objective.rewards[0]._target_=my_rewards.brevity: no module 'my_rewards'"),
        # a decoder given to the default model=bert: a folder, a GGUF file
        ([f"model.pretrained={stub}"], f"model.pretrained={stub} has model_type='llama' and "
         "model=bert loads BERT folders only; add model=hf_decoder"),
        ([f"model.pretrained={inputs / 'smol.gguf'}"], f"model.pretrained={inputs / 'smol.gguf'}"
         " is a decoder (GGUF holds decoders) and model=bert loads BERT folders only; add "
         "model=hf_decoder"),
        # a draft on prompts without the completion column it trains on at lmbda < 1
        (["experiment=draft_model", f"model.pretrained={stub}", "model.keep_layers=1",
          f"objective.teachers=[{teacher}]", f"data.train_file={asset_path('arithmetic/train.jsonl')}",
          "objective.completion_key=solution"],
         f"{asset_path('arithmetic/train.jsonl')}: no prompt row has a 'solution' string"),
        # a draft's rows are the fine-tune's own: no default file stands in for them
        (["experiment=draft_model", f"model.pretrained={stub}", "model.keep_layers=1",
          f"objective.teachers=[{teacher}]"], "data.train_file is not set: give the prompts' jsonl"),
        (["trainer.max_epoch=3"], "trainer.max_epoch is not a key of trainer: did you mean "
         "trainer.max_epochs?"),
        *objective_targets(stub),
    ]


def objective_targets(stub: Path) -> list[tuple[list[str], str]]:
    """Every `_target_` a user writes under objective.* (rewards, tools, environment, teachers):
    a missing path, a misspelled key, a wrong type (they used to reach Hydra's multi-line
    "Error in call to target" and exit 1, or a setup error after the run folder existed)."""
    grpo = ["experiment=grpo_arithmetic", f"model.pretrained={stub}"]
    learned = "mlxlab.runs.learned_reward.LearnedReward"
    tool = "{_target_: mlxlab.objectives.rl.lookup_tools.lookup_code}"
    distill = ["experiment=distill_tinystories"]
    return [
        ([*grpo, f"objective.rewards=[{{_target_: {learned}, run: /nowhere/run}}]"],
         "objective.rewards: run=/nowhere/run does not exist: give the folder of a finished "
         "reward run"),
        ([*grpo, f"objective.rewards=[{{_target_: {learned}, rn: /nowhere/run}}]"],
         f"objective.rewards[0].rn is not an argument of {learned}: did you mean run?"),
        ([*grpo, "objective.rewards=[{_target_: mlxlab.objectives.rl.rewards.length, target: abc}]"],
         "objective.rewards[0].target='abc' must be an integer"),
        ([*grpo, "objective.rewards=[{_target_: mlxlab.objectives.rl.rewards.exact_answer, "
                 "wieght: 2}]"],
         "objective.rewards[0].wieght: mlxlab.objectives.rl.rewards.exact_answer is a reward "
         "function"),
        ([*grpo, f"objective.tools=[{tool}]"],
         "objective.tools need chat prompts"),
        ([*grpo, "objective.rewards=[{_target_: mlxlab.objectives.rewards.exact_answer}]"],
         "objective.rewards[0]._target_=mlxlab.objectives.rewards.exact_answer is "
         "mlxlab.objectives.rl.rewards.exact_answer now: write "
         "mlxlab.objectives.rl.rewards.exact_answer"),
        ([*grpo, "objective.tools=[{_target_: mlxlab.objectives.rl.lookup_tools.lookup_code, "
                 "nme: x}]"],
         "objective.tools[0].nme is not an argument of "
         "mlxlab.objectives.rl.lookup_tools.lookup_code: did you mean name?"),
        ([*grpo, f"objective.tools=[{tool}]", "objective.environment={_target_: "
          "mlxlab.objectives.rl.lookup_tools.QuestionLookup, foo: 1}"],
         "objective.environment.foo is not an argument of "
         "mlxlab.objectives.rl.lookup_tools.QuestionLookup"),
        ([*distill, "objective.teachers=[{run: /nowhere/teacher}]"],
         "objective.teachers[0].run=/nowhere/teacher does not exist"),
        ([*distill, "objective.teachers=[{rn: /nowhere/teacher}]"],
         "objective.teachers[0].rn is not a teacher's key: did you mean run?"),
        ([*distill, f"objective.teachers=[{{run: {stub}, weight: abc}}]"],
         "objective.teachers[0].weight must be a number, got 'abc'"),
    ]


def test_each_bad_setting_is_one_line_and_leaves_no_run_folder_store_or_cache(tmp_path,
                                                                               cli_env):
    """Each of them used to leave a run folder (`.hydra/`, a log, the tokenizer), an MLflow
    store, and quantize=3 / rank=-1 were found only after the data was tokenized."""
    root = tmp_path / "root"
    root.mkdir()
    inputs = root / "inputs"
    cases = bad_settings(inputs)
    lines = [[*args, "tracking.background=false"] for args, _ in cases]
    done = subprocess.run([PYTHON, "-c", DRIVER, json.dumps(lines), str(root)],
                          env={**cli_env, "MLXLAB_ROOT": str(root),
                               "MLXLAB_CACHE_DIR": str(root / "user-cache")},
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (args, expected), (code, err, left) in zip(cases, json.loads(done.stdout)):
        assert code == 2, (args, err)
        assert err.strip().splitlines()[-1].startswith(f"mlxlab: error: {expected}"), (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert left == [], (args, left)  # no outputs/, mlruns/, .cache/ or user cache


def test_through_the_supervised_command_nothing_is_left_either(tmp_path, cli_env):
    """The command a user types (mlxlab-train under its supervising parent), with the default
    background tracker: the same line, exit 2, an empty root."""
    stub = model_folder_stub(tmp_path / "inputs")
    root = tmp_path / "root"
    root.mkdir()
    done = subprocess.run([MLXLAB_TRAIN, "experiment=finetune_chat", f"model.pretrained={stub}",
                           "model.quantize=3"], env={**cli_env, "MLXLAB_ROOT": str(root)},
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == ["mlxlab: error: model.quantize=3: use 4, 8 or "
                                                "null"]
    assert list(root.iterdir()) == []


# --- the lines themselves ----------------------------------------------------------------------


@pytest.mark.parametrize(("override", "line"), [
    ("trainer.schedule.warmup_step=3", "trainer.schedule.warmup_step is not a key of "
     "trainer.schedule: did you mean trainer.schedule.warmup_steps? (a new key is added with "
     "+trainer.schedule.warmup_step=...)"),
    ("seeed=3", "seeed is not a key of the config: did you mean seed?"),
    ("model.zzz=1", "model.zzz is not a key of model: it has ["),
])
def test_a_misspelled_key_names_the_nearest_one(tmp_path, override, line):
    """Hydra's error holds the node the key is missing from: its nearest key, or its keys."""
    from hydra.errors import ConfigCompositionException

    from mlxlab.launch.composing import unknown_key_line

    with pytest.raises(ConfigCompositionException) as raised:
        compose_cfg(tmp_path, [override])
    assert unknown_key_line(raised.value).startswith(line)


def test_hydra_reports_the_jobs_own_errors_again_once_composed(monkeypatch):
    """HYDRA_FULL_ERROR is set only while Hydra composes: the user's own value comes back."""
    import os

    from mlxlab.launch.composing import composed, composing

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with composing():
        assert os.environ["HYDRA_FULL_ERROR"] == "1"
        composed()  # the job starts
        assert os.environ["HYDRA_FULL_ERROR"] == "0"
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(ConfigError, match="did you mean"), composing():
        from hydra.errors import ConfigCompositionException
        from omegaconf import OmegaConf
        from omegaconf.errors import ConfigAttributeError

        node = OmegaConf.create({"max_epochs": 1})
        cause = ConfigAttributeError("Key 'max_epoch' is not in struct")
        cause.full_key, cause.parent_node = "trainer.max_epoch", node
        raise ConfigCompositionException("Could not override") from cause
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_a_target_that_cannot_be_imported_says_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency\n")
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **_):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert target_problem("my_rewards.brevity") is None
    assert target_problem("my_rewards.length") == "module 'my_rewards' has no 'length'"
    assert target_problem("nope.brevity") == "no module 'nope'"
    assert target_problem("mlxlab.objectives.rewardz.f") == "module 'mlxlab.objectives' has no " \
                                                             "'rewardz'"
    assert target_problem("broken_rewards.f") == "no module 'no_such_dependency'"
    assert target_problem("mlxlab.objectives.rl.grpo.GRPO") is None
    sys.modules.pop("my_rewards", None)


def test_a_callbacks_target_is_named_with_its_key(tmp_path):
    cfg = compose_cfg(tmp_path, ["+callbacks.mine={_target_: my_callbacks.Mine}"])
    with pytest.raises(ConfigError, match=re.escape(
            "callbacks.mine._target_=my_callbacks.Mine is not importable")):
        validate(cfg)


def test_an_objective_data_mismatch_names_the_kind_keys_and_what_fits(tmp_path):
    stub = model_folder_stub(tmp_path)
    cfg = compose_cfg(tmp_path, ["experiment=finetune_chat", f"model.pretrained={stub}",
                                 "objective=dpo"])
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    line = str(raised.value)
    assert line.startswith("objective Preference does not train on lm data; data=chat is text "
                           "or chats to learn (language-model data) (its rows have ['messages'])"
                           ": the objectives that train on it: objective=distill|supervised, as "
                           "in experiment="), line
    experiments = line.rsplit("experiment=", 1)[1].split("|")
    assert "finetune_chat" in experiments and "dpo_chat" not in experiments
    cfg = compose_cfg(tmp_path, ["experiment=dpo_chat", f"model.pretrained={stub}",
                                 "objective=supervised"])
    with pytest.raises(ConfigError, match=re.escape(
            "data=preference is preference pairs (its rows have ['chosen', 'prompt', "
            "'rejected']): the objectives that train on it: objective=dpo|orpo|reward, as in "
            "experiment=dpo_chat|orpo_chat|reward_chat")):
        validate(cfg)


def test_a_second_process_on_a_run_folder_in_use_is_one_line_and_touches_nothing(tmp_path,
                                                                                  cli_env):
    """Two processes given one hydra.run.dir both trained in it, each writing its checkpoints
    over the other's (both exit 0): the second now stops with one line, exit 2, and leaves the
    folder (the first's, held here as a training process holds it) as it was."""
    from conftest import FAST
    from mlxlab.runtime.files.locks import folder_lock

    run_dir = tmp_path / "outputs" / "train" / "in-use"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the first process's config\n")
    (run_dir / "train.log").write_text("the first process's log\n")
    with folder_lock(run_dir, "busy"):
        done = subprocess.run([PYTHON, "-m", "mlxlab.train", *FAST, "tracking=none",
                               f"hydra.run.dir={run_dir}"], env=cli_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"mlxlab: error: another process is training in {run_dir}: wait for it to end, or give "
        "this run a folder of its own (hydra.run.dir=)"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]
    assert [p.name for p in (run_dir / ".hydra").iterdir()] == ["config.yaml"]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the first process's config\n"
    assert (run_dir / "train.log").read_text() == "the first process's log\n"
    assert not (run_dir / "checkpoints").exists()
