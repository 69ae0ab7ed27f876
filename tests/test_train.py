"""The default experiment end to end: real Hydra composition, real MLX training, real MLflow store."""

from __future__ import annotations

import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import FAST, PYTHON
from mlxlab.checkpoint import CheckpointState
from mlxlab.data.tabular import TabularText
from mlxlab.objectives.supervised.supervised import Supervised
from mlxlab.train import train

BUILT: dict[str, int] = {}


class CountedSupervised(Supervised):
    """The default objective, counting how often a run builds it."""

    def __init__(self, *args, **kwargs) -> None:
        BUILT["objective"] = BUILT.get("objective", 0) + 1
        super().__init__(*args, **kwargs)


class CountedTabular(TabularText):
    """Titanic's data module, counting how often a run builds it."""

    def __init__(self, *args, **kwargs) -> None:
        BUILT["data"] = BUILT.get("data", 0) + 1
        super().__init__(*args, **kwargs)


def runs_of(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id])


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
    return found


def test_default_experiment_runs_and_is_tracked(make_cfg, tmp_path):
    cfg = make_cfg(*FAST)
    metrics = train(cfg)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert {"val/loss", "val/f1", "val/roc_auc"} <= set(metrics)

    client, runs = runs_of(cfg.tracking.uri, cfg.tracking.experiment_name)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert float(params["optimizer.learning_rate"]) == cfg.optimizer.learning_rate
    assert params["model.hidden_size"] == "32"
    assert params["data.label_column"] == "Survived"
    assert run.data.tags["choice.model"] == "bert"
    assert run.data.tags["choice.data"] == "titanic"
    assert "mlxlab.config_hash" in run.data.tags
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "val/accuracy")
    artifacts = artifact_paths(client, run.info.run_id)
    assert "plots/loss_curve.png" in artifacts
    assert "plots/confusion_matrix.png" in artifacts
    assert any(p.endswith("model.safetensors") for p in artifacts)
    assert any(p.endswith("state.json") for p in artifacts)
    # the store is the central one under the root, artifacts beside it
    assert (tmp_path / "mlruns" / "mlflow.db").exists()


def test_tracking_none_creates_no_store(make_cfg, tmp_path):
    metrics = train(make_cfg(*FAST, "tracking=none"))
    assert "val/accuracy" in metrics
    assert not (tmp_path / "mlruns").exists()


def test_missing_csv_is_a_clear_error(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "tracking=none", f"data.path={tmp_path}/nope.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv") as err:
        train(cfg)
    assert "data.path" in str(err.value)


def test_unknown_label_column_is_a_clear_error(make_cfg):
    cfg = make_cfg(*FAST, "tracking=none", "data.label_column=Survivd")
    with pytest.raises(ValueError, match="Survivd") as err:
        train(cfg)
    assert "Survived" in str(err.value)  # lists the available columns


@pytest.mark.slow  # the default run's budget: test_search_faults' grid groups its jobs too
def test_multirun_jobs_group_under_one_parent(tmp_path, cli_env):
    args = [PYTHON, "-m", "mlxlab.train", "--multirun", "optimizer.learning_rate=1e-3,3e-3", *FAST]
    out = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client, runs = runs_of(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "train")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(children) == 2 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {float(r.data.params["optimizer.learning_rate"]) for r in children} == {1e-3, 3e-3}
    assert all(r.info.status == "FINISHED" for r in runs)


TINY_LM = [
    "experiment=tinystories_nano", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
    "model.max_seq_len=32", "data.packing.seq_len=32", "data.tokenizer.max_vocab=256",
    "data.splits.max_examples=200", "trainer.batch_size=8", "trainer.max_steps=6",
    "trainer.eval_every_steps=3", "callbacks.progress.enabled=false", "tracking=none",
]


def test_streaming_without_validation_trains_and_checkpoints(make_cfg, tmp_path, caplog):
    """data.splits.val_examples=0: no evaluation, checkpoints where evaluations would be and at
    the end, no best/; said at the start."""
    cfg = make_cfg(*TINY_LM, "data.splits.val_examples=0", "trainer.max_steps=5")
    with caplog.at_level("INFO", logger="mlxlab.training"):
        assert train(cfg) == {}
    assert "no validation data (data.splits.val_examples=0" in caplog.text
    # every key the line names is one the config has (checkpoint.*, not a trainer.checkpoint.*)
    line = next(r.getMessage() for r in caplog.records if "no validation data" in r.getMessage())
    named = re.findall(r"\b(?:trainer|callbacks|checkpoint|data)\.[\w.]*\w", line)
    assert "checkpoint.save_every_steps" in named
    for key in named:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
    checkpoints = tmp_path / "outputs"
    found = sorted(p.parent.name for p in checkpoints.glob("**/checkpoints/*/COMMITTED"))
    assert found == ["step_00000003", "step_00000005"]


def test_dialogue_trains_as_one_document(make_cfg, tmp_path):
    """sample_by=document trains across a play's speeches; the one document is split by text
    for validation (the default 200 held-out documents would leave nothing to train on)."""
    play = tmp_path / "play.txt"
    play.write_text("\n\n".join(f"{who}: line {i} of the play, spoken with feeling."
                                for i, who in enumerate(["ROMEO", "JULIET"] * 40)) + "\n")
    cfg = make_cfg(*TINY_LM, f"data.source.data_files={play}", "data.source.sample_by=document",
                   "data.splits.max_examples=null")
    metrics = train(cfg)
    assert metrics["val/loss"] > 0 and metrics["best_step"] == 6


USER_CALLBACK = '''
import json
from pathlib import Path

from mlxlab.training.callbacks import Callback


class StepLog(Callback):
    """A user's own callback: the steps it saw, every `every`, written at the end."""

    def __init__(self, path, every=1):
        self.path, self.every, self.seen = Path(path), every, []

    def setup(self, context, model, data):
        self.optimizer = type(context.optimizer).__name__

    def on_step(self, step, logs):
        if step % self.every == 0:
            self.seen.append(step)

    def on_train_end(self):
        self.path.write_text(json.dumps({"steps": self.seen, "optimizer": self.optimizer}))
'''


def test_user_callback_and_optimizer_from_the_command_line(tmp_path, cli_env):
    """`+callbacks.x={_target_: ...}` adds a callback of the user's own module to a real run,
    beside the default ones; optimizer=lion picks another mlx optimizer."""
    import json

    (tmp_path / "mycallbacks.py").write_text(USER_CALLBACK)
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}:{cli_env.get('PYTHONPATH', '')}"}
    seen = tmp_path / "seen.json"
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *FAST, "tracking=none", "optimizer=lion",
         f"+callbacks.steps={{_target_:mycallbacks.StepLog,path:'{seen}',every:2}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(seen.read_text()) == {"steps": [2, 4], "optimizer": "Lion"}
    assert "step 4/4" in out.stdout + out.stderr  # the default eval_log callback still ran


def test_no_callbacks_still_checkpoints(make_cfg, tmp_path):
    no_callback_keys = [o for o in FAST if not o.startswith("callbacks.")]
    cfg = make_cfg(*no_callback_keys, "tracking=none", "callbacks=none", "optimizer=sgd")
    train(cfg)
    run_dir = tmp_path / "outputs" / "run"
    assert (run_dir / "checkpoints" / "best").is_dir()
    assert any(p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir())


def test_a_bug_surfaces_with_its_traceback(tmp_path, cli_env):
    """Only bad input (mlxlab.errors.UserError) becomes one `mlxlab: error:` line; an exception
    from a bug, here a KeyError in a callback, keeps its traceback and Python's exit status."""
    (tmp_path / "buggy.py").write_text(
        "from mlxlab.training.callbacks import Callback\n\n\n"
        "class Buggy(Callback):\n"
        "    def on_step(self, step, logs):\n"
        "        return {}['no such key']\n")
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}:{cli_env.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *FAST, "tracking=none", "+callbacks.bug={_target_:buggy.Buggy}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" in out.stderr and "KeyError: 'no such key'" in out.stderr
    assert "mlxlab: error:" not in out.stderr


def test_a_run_builds_what_validation_built_once_and_a_resume_leaves_its_config(make_cfg,
                                                                                 tmp_path):
    """validate(cfg) builds the objective and the data to check them; train() trains with those
    (not built again). A resume makes a new config from the checkpoint's: the composed one the
    caller holds still says what it was composed as (here: model.num_layers=2, while the run
    trains the checkpoint's 1 layer)."""
    counted = ["objective._target_=test_train.CountedSupervised",
               "data._target_=test_train.CountedTabular", "tracking=none"]
    first = make_cfg(*FAST, *counted)
    first.paths.output_dir = str(tmp_path / "first")
    BUILT.clear()
    train(first)
    assert BUILT == {"objective": 1, "data": 1}

    fast = [o for o in FAST if not o.startswith(("model.num_layers", "trainer.max_steps"))]
    again = make_cfg(*fast, *counted, "trainer.max_steps=6", f"resume={first.paths.output_dir}")
    again.paths.output_dir = str(tmp_path / "again")
    BUILT.clear()
    train(again)
    # validated twice (as composed, as resumed) and built once; the data again because the
    # resume points it at the first run's tokenizer
    assert BUILT == {"objective": 1, "data": 2}
    assert again.model.num_layers == 2 and not again.data.tokenizer.get("path")
    newest = max((tmp_path / "again" / "checkpoints").glob("step_*"))
    state = CheckpointState.read(newest)
    assert state.step == 6 and state.config["model"]["num_layers"] == 1
