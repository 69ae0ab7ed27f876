"""state.json as one versioned dataclass: round trip, refusal of newer versions, and a resume
from a checkpoint of an older version refused in one line."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from mlxlab.checkpoint import (
    STATE_VERSION,
    CheckpointError,
    CheckpointState,
    MonitoredMetric,
)
from mlxlab.errors import ConfigError

# The keys the trainer wrote into state.json before the state had a version (the oldest
# checkpoints: refused for resume, still loaded for export and predictions).
UNVERSIONED_KEYS = (
    "step", "epoch", "data", "rng", "callbacks", "run_id", "history", "best_metrics",
    "best_metric", "config", "model_init", "tokenizer_hash", "val_fingerprint", "log_window",
    "encoding",
)


def test_state_round_trips_with_its_version_and_unknown_keys():
    state = CheckpointState(
        step=7, epoch=1, rng=[1, 2], history={"val/loss": [[3, 0.5]]}, best_metric=0.5,
        checkpoint_metric=MonitoredMetric("val/loss", "min", 0.5), extra={"user": {"a": 1}},
    )
    raw = json.loads(json.dumps(state.to_json()))
    assert raw["version"] == STATE_VERSION and raw["user"] == {"a": 1}
    assert raw["checkpoint_metric"] == {"name": "val/loss", "mode": "min", "value": 0.5}
    assert CheckpointState.from_json(raw) == state


def test_unversioned_state_is_migrated():
    old = {"step": 4, "epoch": 0, "history": None, "run_id": "abc"}
    state = CheckpointState.from_json(old)
    assert state.version == 1 and state.history == {} and state.run_id == "abc"
    # no fingerprint recorded: a resume must not report the validation set as changed
    assert not state.validation_changed("0123abcd")
    assert CheckpointState.from_json({**old, "val_fingerprint": None}).validation_changed("x")


@pytest.mark.parametrize(
    ("raw", "match"),
    [({"step": 1, "version": STATE_VERSION + 1}, "newer than this mlxlab reads.*upgrade"),
     ({"epoch": 1}, "no integer step"),
     ([1, 2], "not an object")],
)
def test_unreadable_states_are_refused_clearly(raw, match):
    with pytest.raises(CheckpointError, match=match):
        CheckpointState.from_json(raw)


def recommit(checkpoint) -> None:
    """checksums.json for the files as they are now (the on-disk format, spelled out)."""
    sums = {}
    for f in sorted(checkpoint.iterdir()):
        if f.name not in ("checksums.json", "COMMITTED"):
            sums[f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
                            "bytes": f.stat().st_size}
    (checkpoint / "checksums.json").write_text(json.dumps(sums))


@pytest.mark.parametrize("version", [None, 2])
def test_a_checkpoint_of_an_older_version_is_refused_for_resume_in_one_line(make_cfg, tmp_path,
                                                                            version):
    """A resume takes today's state version only (an older one's config holds keys this mlxlab
    reads no more); the older checkpoint still loads for export and predictions."""
    from pathlib import Path

    from conftest import FAST
    from mlxlab.runs import load_run_model
    from mlxlab.train import train

    first = make_cfg(*FAST, "tracking=none")
    train(first)
    source = Path(first.paths.output_dir)
    for state_file in sorted(source.glob("checkpoints/*/state.json")):
        current = json.loads(state_file.read_text())
        old = ({key: current[key] for key in UNVERSIONED_KEYS} if version is None
               else {**current, "version": version})
        state_file.write_text(json.dumps(old))
        recommit(state_file.parent)
    second = make_cfg(*FAST, "tracking=none", f"resume={source}")
    second.paths.output_dir = str(tmp_path / "outputs" / "second")
    with pytest.raises(CheckpointError) as refused:
        train(second)
    line = str(refused.value)
    assert "\n" not in line and line.startswith("resume: ") and (
        f"was written by an older mlxlab (state version {version or 1}, this one resumes "
        f"{STATE_VERSION}): start a new run" in line)
    assert not list((tmp_path / "outputs" / "second").glob("checkpoints/step_*"))
    model, _ = load_run_model(source)  # its weights still load
    assert model is not None


def test_a_checkpoint_whose_config_does_not_build_today_is_refused_in_one_line(make_cfg,
                                                                               tmp_path):
    """A checkpoint written by an older mlxlab (its trainer node a partial of
    `mlxlab.training.trainer.Trainer`, with _target_ nodes for schedule and distributed): a
    resume from it is one ConfigError naming the key, the source and what to do."""
    from pathlib import Path

    from conftest import FAST
    from mlxlab.train import train

    first = make_cfg(*FAST, "tracking=none")
    train(first)
    source = Path(first.paths.output_dir)
    rewritten = 0
    for state_file in sorted(source.glob("checkpoints/*/state.json")):
        state = json.loads(state_file.read_text())
        trainer = state["config"]["trainer"]
        if trainer.get("_target_") != "mlxlab.training.trainer.Trainer":  # best/: a hard link
            trainer.update({"_target_": "mlxlab.training.trainer.Trainer", "_partial_": True})
            trainer["schedule"]["_target_"] = "mlxlab.training.optim.LRSchedule"
            trainer["distributed"]["_target_"] = "mlxlab.training.trainer.DistributedConfig"
            state_file.write_text(json.dumps(state))
            rewritten += 1
        recommit(state_file.parent)
    assert rewritten
    second = make_cfg(*FAST, "tracking=none", f"resume={source}", "trainer.max_steps=6",
                      "trainer.eval_every_steps=6")
    second.paths.output_dir = str(tmp_path / "outputs" / "second")
    with pytest.raises(ConfigError, match=rf"^resume={re.escape(str(source))}: trainer\.\S+ is not "
                       r"an argument of mlxlab\.training\.trainer\.Trainer.*older mlxlab.*start a "
                       r"new run\)$"):
        train(second)
    assert not list(Path(second.paths.output_dir).glob("checkpoints/step_*"))


def test_a_checkpoint_naming_objectives_where_they_stood_resumes_with_their_paths_today(
        make_cfg, tmp_path):
    """A checkpoint whose config names an objective's module at objectives/'s top (a run saved
    before the objectives were grouped by family: `mlxlab.objectives.supervised.Supervised`)
    resumes, and the resumed run's config names the module where it is now."""
    from pathlib import Path

    from conftest import FAST
    from mlxlab.train import train

    first = make_cfg(*FAST, "tracking=none")
    train(first)
    source = Path(first.paths.output_dir)
    for state_file in sorted(source.glob("checkpoints/*/state.json")):
        state = json.loads(state_file.read_text())
        assert state["config"]["objective"]["_target_"] in (
            "mlxlab.objectives.supervised.supervised.Supervised",
            "mlxlab.objectives.supervised.Supervised")  # best/: a hard link, rewritten already
        state["config"]["objective"]["_target_"] = "mlxlab.objectives.supervised.Supervised"
        state_file.write_text(json.dumps(state))
        recommit(state_file.parent)
    second = make_cfg(*FAST, "tracking=none", f"resume={source}", "trainer.max_steps=6",
                      "trainer.eval_every_steps=6")
    second.paths.output_dir = str(tmp_path / "outputs" / "second")
    train(second)
    resumed = json.loads((Path(second.paths.output_dir) / "checkpoints" / "step_00000006"
                          / "state.json").read_text())
    assert resumed["step"] == 6
    assert resumed["config"]["objective"]["_target_"] == (
        "mlxlab.objectives.supervised.supervised.Supervised")


def test_a_run_naming_its_model_where_it_stood_loads_with_the_path_today(make_cfg):
    """A checkpoint whose config names its model's module at models/'s top (a run saved before
    the models were grouped by kind: `mlxlab.models.bert.BertClassifier`) loads for export,
    evaluation and serving (load_run_model) as the class where it stands now, with the same
    weights; the path today is what a fresh run records."""
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from conftest import FAST
    from mlxlab.models.encoders.bert import BertClassifier
    from mlxlab.runs import load_run_model
    from mlxlab.train import train

    cfg = make_cfg(*FAST, "tracking=none")
    train(cfg)
    source = Path(cfg.paths.output_dir)
    before, _ = load_run_model(source)
    for state_file in sorted(source.glob("checkpoints/*/state.json")):
        state = json.loads(state_file.read_text())
        assert state["config"]["model"]["_target_"] in (
            "mlxlab.models.encoders.bert.BertClassifier",
            "mlxlab.models.bert.BertClassifier")  # best/: a hard link, rewritten already
        state["config"]["model"]["_target_"] = "mlxlab.models.bert.BertClassifier"
        state_file.write_text(json.dumps(state))
        recommit(state_file.parent)
    model, state = load_run_model(source)
    assert state.config["model"]["_target_"] == "mlxlab.models.bert.BertClassifier"
    assert type(model) is BertClassifier
    ours, theirs = dict(tree_flatten(model.parameters())), dict(tree_flatten(before.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def test_every_moved_module_imports_where_it_is_now_and_nested_targets_follow():
    """MOVED_MODULES names modules that exist, and a GRPO node's rewards, tools and environment
    (targets nested in lists and nodes) are renamed with the objective's own; a target already
    named by its path today, or outside objectives/, is left as it is."""
    import importlib

    from mlxlab.config.retired import MOVED_MODULES, with_moved_targets

    for old, now in MOVED_MODULES.items():
        assert importlib.import_module(now).__name__.rpartition(".")[2] == old.rpartition(".")[2]
    saved = {"objective": {
        "_target_": "mlxlab.objectives.grpo.GRPO",
        "rewards": [{"_target_": "mlxlab.objectives.rewards.exact_answer", "weight": 1.0},
                    {"_target_": "mlxlab.runs.learned_reward.LearnedReward", "run": "r"}],
        "tools": [{"_target_": "mlxlab.objectives.lookup_tools.lookup_code"}],
        "environment": {"_target_": "mlxlab.objectives.lookup_tools.QuestionLookup"},
        "tool_format": "qwen"}, "seed": 1}
    assert with_moved_targets(saved) == {"objective": {
        "_target_": "mlxlab.objectives.rl.grpo.GRPO",
        "rewards": [{"_target_": "mlxlab.objectives.rl.rewards.exact_answer", "weight": 1.0},
                    {"_target_": "mlxlab.runs.learned_reward.LearnedReward", "run": "r"}],
        "tools": [{"_target_": "mlxlab.objectives.rl.lookup_tools.lookup_code"}],
        "environment": {"_target_": "mlxlab.objectives.rl.lookup_tools.QuestionLookup"},
        "tool_format": "qwen"}, "seed": 1}
    assert with_moved_targets(with_moved_targets(saved)) == with_moved_targets(saved)
