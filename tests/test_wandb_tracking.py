"""tracking=wandb, alone and beside MLflow and csv, in wandb's offline mode (no account, no
network): the run's config, metrics with their steps, summary and files, read back from what
wandb wrote; a resumed run continues the same wandb run; a missing package is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from conftest import FAST, PYTHON, compose_cfg
from mlxlab.checkpoint import CheckpointState
from mlxlab.config import ConfigError, instantiate
from mlxlab.train import train
from test_csv_tracking import RESUMABLE

pytest.importorskip("wandb")
from wandb_helpers import offline_runs  # noqa: E402 (reads wandb's protobufs)


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory):
    """Offline, and every folder wandb writes to (settings, cache, staging) in a temp folder; the
    wandb service this module starts is stopped after it."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(home / name.lower()))
        mp.delenv("WANDB_DIR", raising=False)
        mp.delenv("WANDB_API_KEY", raising=False)
        yield
        import wandb

        wandb.teardown()


def test_wandb_beside_mlflow_holds_the_config_metrics_and_summary(make_cfg):
    """tracking=[mlflow,wandb]: MLflow stays the primary (its run id is the checkpoint's); the
    wandb run holds the resolved config, every metric at the steps MLflow has with the same
    values, the best metrics in its summary, the group choices as tags, the plots as files."""
    cfg = make_cfg(*FAST, "tracking=[mlflow,wandb]")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    (run,) = offline_runs(run_dir)  # tracking.wandb.dir=null, no $WANDB_DIR: the run folder

    client = MlflowClient(cfg.tracking.uri)
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    state = CheckpointState.read(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    assert state.run_id == mlflow_run.info.run_id  # MLflow is the primary tracker
    for key in mlflow_run.data.metrics:
        history = client.get_metric_history(mlflow_run.info.run_id, key)
        assert sorted(run.history[key]) == sorted((m.step, m.value) for m in history), key
    assert [s for s, _ in run.history["train/loss"]] == [1, 2, 3, 4]

    assert run.config["trainer"]["max_steps"] == 4 and run.config["model"]["hidden_size"] == 32
    assert run.config["mlxlab_tags"]["mlxlab.config_hash"] == mlflow_run.data.tags[
        "mlxlab.config_hash"]
    assert run.config["mlxlab_tags"]["status"] == "FINISHED" and run.exit_code == 0
    assert {"model=bert", "data=titanic", "trainer=simple"} <= set(run.tags)
    assert run.summary["best/val/accuracy"] == metrics["val/accuracy"]
    assert run.summary["val/loss"] == run.history["val/loss"][-1][1]
    assert "plots/loss_curve.png" in run.files
    assert (run.folder / "files" / "plots" / "loss_curve.png").is_file()
    assert any(f.startswith("checkpoint/") and f.endswith(".safetensors") for f in run.files)


def test_wandb_joins_in_any_order_after_mlflow_and_csv(make_cfg):
    for order in ("[wandb,csv,mlflow]", "[csv,wandb]", "[mlflow,wandb]"):
        cfg = make_cfg(*FAST, f"tracking={order}", *(["tracking.background=false"]
                                                      if "mlflow" in order else []))
        tracker = instantiate(cfg.tracking, run_name="named")
        kinds = [type(t).__name__ for t in tracker.trackers]
        expected = ["MlflowTracker", "CsvTracker", "WandbTracker"]
        assert kinds == [k for k in expected if k.lower().removesuffix("tracker") in order]
        assert tracker.trackers[-1].run_name == "named" and tracker.run_id is None


@pytest.mark.slow  # W&B beside MLflow: the test above
def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """tracking=wandb alone: a run stopped at step 10 (its last checkpoint: step 8) and resumed
    into a new folder logs steps 9.. to the killed run's wandb id (resume="allow"), with the
    values an uninterrupted run logs; $WANDB_DIR puts every run's files in one folder."""
    out, shared = tmp_path / "outputs", tmp_path / "wandb_dir"
    monkeypatch.setenv("WANDB_DIR", str(shared))

    def run(folder: Path, *extra: str) -> None:
        cfg = compose_cfg(tmp_path, [*RESUMABLE, "tracking=wandb", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        train(cfg)

    run(out / "reference")
    killed = out / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(killed, "+callbacks.stop={_target_: test_csv_tracking.InterruptAt, step: 10}")
    resumed = out / "resumed"
    run(resumed, f"resume={killed}")

    runs = offline_runs(shared)
    reference = next(r for r in runs if r.config["mlxlab_tags"]["mlxlab.run_dir"] == str(
        out / "reference"))
    killed_id = next(r.id for r in runs if r.config["mlxlab_tags"]["mlxlab.run_dir"] == str(killed))
    first, second = offline_runs(shared, killed_id)
    assert first.id == second.id != reference.id  # one wandb run, written by two processes
    assert second.config["mlxlab_tags"]["mlxlab.run_dir"] == str(resumed)
    assert first.exit_code == 1 and second.exit_code == 0
    assert first.config["mlxlab_tags"]["status"] == "KILLED"
    assert [s for s, _ in first.history["train/loss"]] == list(range(1, 10))
    assert [s for s, _ in second.history["train/loss"]] == list(range(9, 13))
    expected = dict(reference.history["train/loss"])
    assert dict(second.history["train/loss"]) == {s: expected[s] for s in range(9, 13)}
    assert json.loads((resumed / "wandb-run.json").read_text())["id"] == first.id


def test_missing_wandb_package_is_one_line_naming_the_extra(tmp_path):
    """Without the package, `mlxlab-train tracking=wandb` stops before training with one line."""
    code = ("import sys; sys.modules['wandb'] = None  # what an uninstalled package gives\n"
            "from mlxlab.train import main; main(supervised=False)")  # in this process
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path)}
    done = subprocess.run([PYTHON, "-c", code, *FAST, "tracking=wandb"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("mlxlab: error: tracking=wandb needs the wandb package: pip install -e "
                    "'.[wandb]' (or pip install wandb)")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.safetensors"))


def test_mlxlab_does_not_import_wandb_until_a_wandb_tracker_is_built():
    code = ("import sys\n"
            "import mlxlab.train, mlxlab.training.trainer, mlxlab.tracking.fanout\n"
            "import mlxlab.tracking.wandb_tracker, mlxlab.cli.main\n"
            "assert 'wandb' not in sys.modules, 'wandb imported'\n"
            "from mlxlab.tracking.fanout import build_tracker\n"
            "build_tracker(wandb={})\n"
            "assert 'wandb' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_unknown_wandb_mode_is_one_line():
    from mlxlab.tracking.fanout import build_tracker

    with pytest.raises(ConfigError, match=r"tracking.wandb.mode='ofline' is not one of"):
        build_tracker(wandb={"mode": "ofline"})
