"""Tracking room: real sqlite MLflow stores in tmp dirs, a real Hydra multirun, a real server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import MLXLAB, wait_for_server
from mlxlab.cli import runs_list
from mlxlab.runtime import settings
from mlxlab.sweeps.store import sweep_children
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import NullTracker, Tracker, flatten_config
from mlxlab.tracking.mlflow import MlflowTracker, TrackingUnavailable, ensure_store, resolve_uri
from mlxlab.tracking.mlflow import calls as mlflow_calls
from mlxlab.tracking.plots import confusion_matrix_png, loss_curve_png, sweep_plot_png

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated store, made once: creating the schema costs seconds, copying it nothing."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    ensure_store(f"sqlite:///{db}", "template")
    return db


def fresh_store(template_db: Path, root: Path) -> str:
    """A store of its own at <root>/mlruns/mlflow.db; artifacts go to <root>/mlruns/artifacts."""
    (root / "mlruns").mkdir(parents=True)
    shutil.copy(template_db, root / "mlruns" / "mlflow.db")
    return f"sqlite:///{root}/mlruns/mlflow.db"


@pytest.fixture
def uri(template_db, tmp_path) -> str:
    return fresh_store(template_db, tmp_path)


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def steps_of(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- base


def test_flatten_config_dots_keys_and_stringifies_values():
    cfg = OmegaConf.create(
        {
            "trainer": {"learning_rate": 3e-4, "max_epochs": 3, "clip": None},
            "model": {"sizes": [64, 128], "lora": {"rank": 0}, "empty": {}},
            "callbacks": [{"name": "early_stop", "patience": 2}],
            "lr_copy": "${trainer.learning_rate}",
        }
    )
    flat = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    assert flat == {
        "trainer.learning_rate": "0.0003",
        "trainer.max_epochs": "3",
        "trainer.clip": "None",
        "model.sizes": "[64, 128]",
        "model.lora.rank": "0",
        "model.empty": "{}",
        "callbacks.0.name": "early_stop",
        "callbacks.0.patience": "2",
        "lr_copy": "0.0003",
    }
    assert flatten_config(cfg)["model.lora.rank"] == "0"  # a DictConfig works as well
    with pytest.raises(ValueError, match="mapping"):
        flatten_config([1, 2])


def test_null_tracker_has_no_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = NullTracker(uri="ignored")
    tracker.start({"a": {"b": 1}}, {"t": "v"})
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.log_dict({"a": 1}, "a.json")
    tracker.log_text("x", "x.txt")
    tracker.log_figure(None, "fig")
    tracker.set_tags({"k": "v"})
    tracker.flush()
    tracker.end("FAILED")
    assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []
    assert isinstance(tracker, Tracker)
    assert isinstance(MlflowTracker(uri=f"sqlite:///{tmp_path}/x.db"), Tracker)
    assert list(tmp_path.iterdir()) == []  # constructing the MLflow tracker writes nothing yet


def test_file_store_uri_is_rejected_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="sqlite:///"):
        MlflowTracker(uri=str(tmp_path / "mlruns"))
    with pytest.raises(ValueError, match="flush_every_steps"):
        MlflowTracker(uri=f"sqlite:///{tmp_path}/x.db", flush_every_steps=0)


@pytest.mark.parametrize(("setting", "message"), [
    ({"uri": "mlruns"}, "is a file store, which MLflow 3 no longer writes"),
    ({"connect_timeout": 0}, r"tracking\.connect_timeout must be > 0 seconds, got 0"),
    ({"request_timeout": "slow"}, r"tracking\.request_timeout must be a number, got 'slow'"),
    ({"flush_every_seconds": -1}, r"tracking\.flush_every_seconds must be > 0 seconds"),
    ({"flush_every_steps": 0}, r"tracking\.flush_every_steps must be >= 1"),
])
def test_a_bad_mlflow_setting_is_one_config_error(tmp_path, setting, message):
    """A typo in tracking.* is the user's to fix: a ConfigError (train.py prints one line)."""
    from mlxlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        MlflowTracker(**{"uri": f"sqlite:///{tmp_path}/x.db", **setting})


def test_cli_bad_tracking_setting_is_one_line(tmp_path, cli_env):
    """End to end: the tracker's ConfigError, raised inside Hydra's instantiate, leaves
    mlxlab-train as one `mlxlab: error:` line and exit 2, with no run folder and no store."""
    out = subprocess.run([sys.executable, "-m", "mlxlab.train", "tracking.connect_timeout=0",
                          "trainer.max_steps=1"], cwd=tmp_path, env=cli_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("mlxlab: error:")]
    assert errors == ["mlxlab: error: tracking.connect_timeout must be > 0 seconds, got 0"]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()


# --------------------------------------------------------------------------- one run


def test_run_holds_params_metrics_tags_and_artifacts(uri, tmp_path):
    params = {
        "trainer": {"learning_rate": 3e-4, "max_epochs": 2},
        "model": {f"knob_{i:03d}": i for i in range(250)},  # > 2 log_batch chunks of 100
    }
    tracker = MlflowTracker(uri=uri, experiment_name="exp", run_name="r1", flush_every_steps=50)
    tracker.start(params, {"choice.model": "bert", "owner": "tests"})
    assert tracker.run_id is not None
    for step in range(120):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.001}, step=step)
    tracker.log_metrics({"val/loss": 0.5, "val/accuracy": 0.8}, step=119)
    tracker.set_tags({"stage": "done"})
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    tracker.log_artifact(tmp_path / "notes.txt")
    tracker.log_artifact(tmp_path / "ckpt", artifact_path="checkpoints/best")
    tracker.log_dict({"a": 1}, "config/resolved.json")
    tracker.log_text("some text", "notes/readme.txt")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tracker.log_figure(fig, "custom")
    plt.close(fig)
    tracker.end()
    assert tracker.errors == 0

    client = client_for(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert len(run.data.params) == 252
    assert run.data.params["trainer.learning_rate"] == "0.0003"
    assert run.data.params["model.knob_249"] == "249"
    assert run.data.tags["choice.model"] == "bert" and run.data.tags["stage"] == "done"
    assert steps_of(client, tracker.run_id, "train/loss") == [
        (s, pytest.approx(1.0 / (s + 1))) for s in range(120)
    ]
    assert run.data.metrics["val/accuracy"] == pytest.approx(0.8)

    # artifacts sit on disk under <mlruns>/artifacts/<experiment id>/<run id>/artifacts
    artifact_dir = tmp_path / "mlruns" / "artifacts" / run.info.experiment_id / run.info.run_id
    files = {
        p.relative_to(artifact_dir / "artifacts").as_posix()
        for p in artifact_dir.rglob("*")
        if p.is_file()
    }
    assert files == {
        "notes.txt",
        "checkpoints/best/model.safetensors",
        "config/resolved.json",
        "notes/readme.txt",
        "plots/custom.png",
    }
    assert (artifact_dir / "artifacts/plots/custom.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((artifact_dir / "artifacts/config/resolved.json").read_text()) == {"a": 1}


def test_log_metrics_never_waits_on_a_locked_store(uri, tmp_path):
    """Another writer holds the sqlite file locked: the step loop keeps going while the
    background flush waits for the lock, and no metric is lost."""
    tracker = MlflowTracker(uri=uri, flush_every_steps=10)
    tracker.start({"a": 1}, {})
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db", timeout=10)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait()
        db.rollback()
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    begin = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"train/loss": float(step)}, step=step)
    logging_time = time.perf_counter() - begin
    time.sleep(1.0)  # flushes fail and back off meanwhile
    release.set()
    holder.join()
    tracker.end()

    assert logging_time < 0.5, f"log_metrics blocked for {logging_time:.2f}s on a locked store"
    assert tracker.errors == 0
    assert [s for s, _ in steps_of(client_for(uri), tracker.run_id, "train/loss")] == list(
        range(200)
    )


def test_locked_store_errors_are_retried_with_bounded_backoff(monkeypatch):
    sleeps = []
    monkeypatch.setattr(mlflow_calls.time, "sleep", sleeps.append)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return "written"

    assert mlflow_calls.retrying(locked_twice) == "written"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[0] < sleeps[1]

    def always_locked():
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    calls.clear()
    sleeps.clear()
    with pytest.raises(sqlite3.OperationalError):
        mlflow_calls.retrying(always_locked)
    assert len(calls) == mlflow_calls.RETRY_ATTEMPTS and max(sleeps) <= 3.0

    def broken():
        calls.append(1)
        raise ValueError("not transient")

    calls.clear()
    with pytest.raises(ValueError):
        mlflow_calls.retrying(broken)
    assert len(calls) == 1  # only lock contention is retried


def test_synchronous_logging_flushes_every_n_steps(uri):
    tracker = MlflowTracker(uri=uri, flush_every_steps=5, async_logging=False)
    tracker.start({}, {})
    client = client_for(uri)
    for step in range(7):
        tracker.log_metrics({"m": step}, step=step)
    assert len(client.get_metric_history(tracker.run_id, "m")) == 5  # 2 still buffered
    tracker.end()
    assert len(client.get_metric_history(tracker.run_id, "m")) == 7


def test_logging_failures_warn_once_and_never_raise(uri, tmp_path, caplog):
    tracker = MlflowTracker(uri=uri)
    tracker.start({"a": 1}, {})
    client_for(uri).delete_run(tracker.run_id)  # every later write is refused by the store
    with caplog.at_level(logging.WARNING, logger="mlxlab.tracking"):
        tracker.log_metrics({"train/loss": 1.0, "bad": "not a number"}, step=0)
        tracker.flush()
        tracker.set_tags({"k": "v"})
        tracker.log_artifact(tmp_path / "does_not_exist.bin")
        tracker.end("FAILED")
    assert tracker.errors >= 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "training goes on" in warnings[0].getMessage()

    # a store that cannot even be created: the run is not trained untracked: start
    # raises one line naming the fix; the rest are no-ops
    broken = MlflowTracker(uri="sqlite:////proc/no/such/dir/mlflow.db")
    with pytest.raises(TrackingUnavailable, match="could not start the run.*tracking=none"):
        broken.start({"a": 1}, {})
    broken.log_metrics({"x": 1.0}, step=0)
    broken.end()
    assert broken.run_id is None
    with pytest.raises(ValueError, match="FINISHED"):
        broken.end("DONE")


def test_child_run_tags_its_sweep_parent_and_joins_the_jobs_run_list(uri, tmp_path):
    """A multirun job's tracker is given the sweep's parent run and its job folder (fanout's
    build_tracker reads them from the sweep folder): the run is the parent's child, and its id
    is in the job folder's run list, where the sweep callback finds which run the job made."""
    from mlxlab.sweeps.folder import job_runs

    experiment_id = ensure_store(uri, "exp")
    client = client_for(uri)
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    job = tmp_path / "multirun" / "0"
    child = MlflowTracker(uri=uri, experiment_name="exp", parent_run_id=parent,
                          sweep_job_dir=str(job))
    child.start({"lr": 0.1}, {})
    child.end()
    resumed = MlflowTracker(uri=uri, experiment_name="exp", parent_run_id=parent,
                            sweep_job_dir=str(job))
    resumed.start({"lr": 0.1}, {}, run_id=child.run_id)
    resumed.end()
    tags = client.get_run(child.run_id).data.tags
    assert tags[T.PARENT_RUN] == parent and tags[T.SWEEP_ID] == parent
    assert [r.info.run_id for r in sweep_children(client, parent)] == [child.run_id]
    assert job_runs(job) == [child.run_id, child.run_id]
    alone = MlflowTracker(uri=uri, experiment_name="exp")  # not a sweep's job: no parent
    alone.start({"lr": 0.1}, {})
    alone.end()
    assert T.PARENT_RUN not in client.get_run(alone.run_id).data.tags
    assert job_runs(job) == [child.run_id, child.run_id]


def test_resume_appends_to_the_same_run(uri, caplog):
    first = MlflowTracker(uri=uri)
    first.start({"lr": 0.1, "epochs": 1}, {})
    for step in range(10):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.end("KILLED")

    second = MlflowTracker(uri=uri)
    with caplog.at_level(logging.WARNING, logger="mlxlab.tracking"):
        second.start(
            {"lr": 0.1, "epochs": 2, "new_knob": "x"}, {"resumed": "1"}, run_id=first.run_id
        )
    for step in range(10, 20):
        second.log_metrics({"train/loss": float(step)}, step=step)
    second.end()

    client = client_for(uri)
    run = client.get_run(first.run_id)
    assert second.run_id == first.run_id and second.errors == 0
    assert run.info.status == "FINISHED"
    assert [s for s, _ in steps_of(client, run.info.run_id, "train/loss")] == list(range(20))
    assert run.data.params == {"lr": "0.1", "epochs": "1", "new_knob": "x"}  # params write-once
    assert "epochs" in caplog.text

    stranger = MlflowTracker(uri=uri)  # unknown run id: a fresh run
    stranger.start({}, {}, run_id="0123456789abcdef0123456789abcdef")
    stranger.end()
    assert stranger.run_id not in (None, first.run_id)


def _ensure_store_in_process(uri, barrier, results):
    barrier.wait()  # all four hit the fresh database at once
    try:
        results.put(ensure_store(uri, "race"))
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")


def test_concurrent_ensure_store_leaves_a_healthy_db(tmp_path):
    """Unlocked, 3 of 4 processes fail here ("table experiments already exists")."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_ensure_store_in_process, args=(uri, barrier, results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert len(set(outcomes)) == 1 and outcomes[0].isdigit(), outcomes

    db = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM experiments WHERE name='race'").fetchone() == (1,)
    db.close()
    from mlflow.store.db.utils import _get_latest_schema_revision

    heads = (
        sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
        .execute("SELECT version_num FROM alembic_version")
        .fetchall()
    )
    assert heads == [(_get_latest_schema_revision(),)]
    tracker = MlflowTracker(uri=uri, experiment_name="race")
    tracker.start({"a": 1}, {})
    tracker.end()
    assert tracker.errors == 0 and tracker.experiment_id == outcomes[0]


def test_default_uri_comes_from_env_then_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLXLAB_ROOT", raising=False)
    project = tmp_path / "project"
    (project / "sub" / "dir").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    monkeypatch.chdir(project / "sub" / "dir")  # from anywhere inside the project: its store
    assert resolve_uri(None) == f"sqlite:///{project}/mlruns/mlflow.db"
    monkeypatch.setenv("MLXLAB_ROOT", str(tmp_path / "elsewhere"))
    settings.reload()  # mlxlab reads its variables once (runtime/settings.py)
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/elsewhere/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/env.db"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
    loss = loss_curve_png(
        {"train/loss": [(0, 2.0), (1, 1.0)], "val/loss": [(1, float("nan"))]},
        tmp_path / "a" / "loss.png",
    )
    rows = [
        {"val/accuracy": 0.7, "trainer.learning_rate": "0.0001", "model": "bert"},
        {"val/accuracy": 0.8, "trainer.learning_rate": "0.01", "model": "cnn_hybrid"},
        {"val/accuracy": None, "trainer.learning_rate": "0.1", "model": "bert"},
    ]
    sweep = sweep_plot_png(
        rows, "val/accuracy", ["trainer.learning_rate", "model"], tmp_path / "sweep.png"
    )
    matrix = confusion_matrix_png([[50, 3], [7, 40]], tmp_path / "cm.png", ["died", "survived"])
    for png in (loss, sweep, matrix):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


# --------------------------------------------------------------------------- Hydra + CLI

APP = """
import hydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mlxlab.sweeps.folder import current_job, tracker_arguments


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    # as train.py: the job's parent run and folder are handed to the tracker
    tracker = instantiate(cfg.tracking, **tracker_arguments(current_job(), cfg.tracking))
    tracker.start(OmegaConf.to_container(cfg, resolve=True), {"app": "demo"})
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    accuracy = cfg.lr * cfg.width
    tracker.log_metrics({"val/accuracy": accuracy}, 3)
    # a worse last evaluation: sweeps rank by the best value, which train.py returns
    tracker.log_metrics({"val/accuracy": accuracy / 10, "best/val/accuracy": accuracy}, 4)
    if cfg.get("fail_width") == cfg.width:  # a failed trial: recorded, the sweep goes on
        tracker.end("FAILED")
        return float("nan")
    tracker.end()
    return accuracy


if __name__ == "__main__":
    main()
"""

APP_CONFIG = """
defaults:
  - _self_
  - tracking: mlflow
task_name: demo
optimized_metric: val/accuracy
lr: 0.1
width: 2
paths:
  mlflow_uri: sqlite:///{root}/mlruns/mlflow.db
hydra:
  searchpath: [file://{conf}]
  run: {{dir: {root}/outputs/run}}
  sweep: {{dir: {root}/multirun/sweep, subdir: "${{hydra:job.num}}"}}
  callbacks:
    mlflow_sweep:
      _target_: mlxlab.sweeps.callback.MlflowSweepCallback
"""


def write_app(root: Path) -> Path:
    """A tiny Hydra app using the project's conf/tracking group and the sweep callback."""
    (root / "conf").mkdir(parents=True)
    (root / "conf" / "config.yaml").write_text(APP_CONFIG.format(root=root, conf=ROOT / "conf"))
    (root / "app.py").write_text(APP)
    return root / "app.py"


def run_app(app: Path, *overrides: str, env: dict | None = None) -> None:
    env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(app), *overrides],
        cwd=app.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def check_sweep(uri: str, n_children: int, best: float, best_params: dict, failed: int = 0) -> str:
    client = client_for(uri)
    experiment = client.get_experiment_by_name("demo")
    parents = client.search_runs([experiment.experiment_id], "tags.`mlxlab.role` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    children = sweep_children(client, parent.info.run_id)
    assert len(children) == n_children
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED"] * failed + ["FINISHED"] * (n_children - failed)
    assert parent.data.tags["mlxlab.num_failed"] == str(failed)
    assert parent.info.status == ("FAILED" if failed else "FINISHED")  # FINISHED: every job is
    # one seed's maximum is the top run, never "best" (one seed settles nothing)
    assert parent.data.metrics["top_run/val/accuracy"] == pytest.approx(best)
    assert "best/val/accuracy" not in parent.data.metrics
    # tags, not params: a continuation may move the top run
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("top_run.")} == best_params
    assert not any(k.startswith(("best.", "top_run.", "group.")) for k in parent.data.params)
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "plots")]
    assert artifacts == ["plots/bands_val_accuracy.png", "plots/replicates_val_accuracy.png",
                         "plots/sweep_val_accuracy.png"]
    return parent.info.run_id


@pytest.mark.slow
def test_multirun_groups_jobs_under_a_parent_run(template_db, tmp_path, capsys):
    app = write_app(tmp_path)
    uri = fresh_store(template_db, tmp_path)  # the callback adds the "demo" experiment to it
    run_app(app, "--multirun", "lr=0.1,0.2", "width=2,3", "+fail_width=3")
    parent_id = check_sweep(uri, 4, 0.4, {"top_run.lr": "0.2", "top_run.width": "2"}, failed=2)
    assert (tmp_path / "multirun/sweep/.mlflow_parent_run_id").read_text() == parent_id
    # each job's folder lists the run its tracker started: how the callback found it
    listed = [(tmp_path / f"multirun/sweep/{n}/.mlflow_run_ids").read_text().split()
              for n in range(4)]
    children = sweep_children(client_for(uri), parent_id)
    assert [len(ids) for ids in listed] == [1, 1, 1, 1]
    assert sorted(i for ids in listed for i in ids) == sorted(r.info.run_id for r in children)

    assert runs_list.main(["--uri", uri, "--sweep", "latest"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert parent_id in table[0]
    header = next(line for line in table if line.strip().startswith("rank"))
    assert header.split() == ["rank", "run_id", "group", "status", "best", "val/accuracy", "lr",
                              "width"]
    ranked = [line.split()[3:] for line in table[table.index(header) + 2 :]]
    assert ranked == [  # finished runs best first (by best/val/accuracy), then the failed ones
        ["FINISHED", "0.4000", "0.2", "2"],
        ["FINISHED", "0.2000", "0.1", "2"],
        ["FAILED", "0.6000", "0.2", "3"],
        ["FAILED", "0.3000", "0.1", "3"],
    ]


def test_runs_list_prints_runs(uri, tmp_path, capsys):
    tracker = MlflowTracker(uri=uri, experiment_name="listed", run_name="visible")
    tracker.start({"a": 1}, {})
    tracker.log_metrics({"val/accuracy": 0.8125, "val/loss": 0.42}, step=5)
    tracker.end()
    proc = subprocess.run(
        [MLXLAB, "runs", "list", "--uri", uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "experiment 'listed'" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if tracker.run_id in line)
    assert "visible" in row and "FINISHED" in row and "0.8125" in row and "0.4200" in row

    assert runs_list.main(["--uri", f"sqlite:///{tmp_path}/none/mlflow.db"]) == 0
    assert "no MLflow store" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()  # listing never creates a store


def test_callback_creates_store_only_for_mlflow_tracking(template_db, tmp_path):
    from hydra import compose, initialize_config_dir

    from mlxlab.sweeps.callback import MlflowSweepCallback

    write_app(tmp_path)
    with initialize_config_dir(str(tmp_path / "conf"), version_base="1.3"):
        none_cfg = compose("config", ["tracking=none"], return_hydra_config=True)
        mlflow_cfg = compose("config", return_hydra_config=True)
    callback = MlflowSweepCallback()
    callback.on_run_start(none_cfg)
    callback.on_multirun_start(none_cfg)
    callback.on_multirun_end(none_cfg)
    assert not (tmp_path / "mlruns").exists()
    # the swept keys (for run names) are written for any tracking; a parent run only for MLflow
    assert (tmp_path / "multirun/sweep/.mlxlab_swept_keys.json").is_file()
    assert not (tmp_path / "multirun/sweep/.mlflow_parent_run_id").exists()

    fresh_store(template_db, tmp_path)
    callback.on_run_start(mlflow_cfg)  # a background tracker makes the store in its own process
    assert not client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_experiment_by_name("demo")
    with initialize_config_dir(str(tmp_path / "conf"), version_base="1.3"):
        in_process = compose("config", ["tracking.background=false"], return_hydra_config=True)
    callback.on_run_start(in_process)  # in-process: the callback adds the experiment, up front
    assert client_for(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_experiment_by_name("demo")


@pytest.mark.slow
def test_parallel_joblib_multirun_groups_all_jobs(tmp_path):
    app = write_app(tmp_path)
    run_app(
        app,
        "--multirun",
        "lr=0.1,0.2",
        "width=2,3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    check_sweep(
        f"sqlite:///{tmp_path}/mlruns/mlflow.db", 4, 0.6, {"top_run.lr": "0.2", "top_run.width": "3"}
    )


# --------------------------------------------------------------------------- tracking server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tracking_server_round_trip(tmp_path):
    port = free_port()
    server_uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "MLRUNS_DIR": str(tmp_path / "srv"),
           "PYTHON": sys.executable}
    log_file = (tmp_path / "server.log").open("w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [str(ROOT / "scripts/mlflow_server.sh")],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_server(server, server_uri, tmp_path / "server.log", 120)

        tracker = MlflowTracker(uri=server_uri, experiment_name="served")
        tracker.start({"model": {"hidden": 64}}, {"via": "server"})
        for step in range(30):
            tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        (tmp_path / "note.txt").write_text("served")
        tracker.log_artifact(tmp_path / "note.txt")
        tracker.end()
        assert tracker.errors == 0

        client = client_for(server_uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"model.hidden": "64"}
        assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 30
        assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["note.txt"]
        assert list((tmp_path / "srv/artifacts").rglob("note.txt"))  # the server stored it

        app = write_app(tmp_path / "app")  # a 2-job multirun through the server
        run_app(app, "--multirun", "lr=0.1,0.3", env={"MLFLOW_TRACKING_URI": server_uri})
        check_sweep(server_uri, 2, 0.6, {"top_run.lr": "0.3"})
        assert not (tmp_path / "app/mlruns").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log_file.close()
