"""tracking.background: the MLflow tracker in a child process (tracking/mlflow/background.py). Real
sqlite stores, real child processes: everything lands as in-process, the training process
never imports mlflow, the child's warnings and errors reach the parent, and a parent killed
mid-run leaves what it flushed and a RUNNING run, as an in-process tracker does (the resumed run
rewinds from its checkpoint; no late writes from the child race it)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlxlab.tracking import tags as T
from mlxlab.tracking.fanout import FanoutTracker, build_tracker
from mlxlab.tracking.mlflow import ensure_store
from mlxlab.tracking.mlflow.background import TrackerProcess
from mlxlab.tracking.source import command_line, entry_point, source_tags


@pytest.fixture
def uri(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    ensure_store(uri, "exp")
    return uri


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def warn_in_child(message: str) -> None:
    logging.getLogger("mlxlab.tracking.test").warning(message)


def fail_in_child() -> None:
    raise ValueError("broken in the child")


def busy_in_child(seconds: float) -> None:
    time.sleep(seconds)  # a child still importing mlflow, or writing a slow store


def test_a_background_run_holds_what_an_in_process_run_holds(uri, tmp_path):
    tracker = build_tracker(uri=uri, experiment_name="exp", run_name="bg", background=True,
                            flush_every_steps=7)
    assert isinstance(tracker, TrackerProcess) and tracker.uri == uri
    tracker.start({"trainer": {"lr": 0.1}}, {"owner": "tests"})
    started = tracker.run_id  # read at once (distill_rounds does): waits for the start
    assert started is not None
    for step in range(30):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.flush()  # waits: everything so far is in the store when it returns
    client = client_for(uri)
    assert tracker.run_id == started
    assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 30
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt", "docs")
    tracker.set_tags({"stage": "done"})
    tracker.end()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "bg"
    assert run.data.params["trainer.lr"] == "0.1" and run.data.tags["stage"] == "done"
    assert run.data.tags["owner"] == "tests"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "docs")] == ["docs/notes.txt"]
    assert tracker.errors == 0
    tracker.end()  # a second end is a no-op


def test_a_background_runs_source_is_the_training_process_entry_point(uri):
    """The child creates the MLflow run; its Source (mlflow.source.name) is what the training
    process names (its entry point), not the child's own file, background.py."""
    tracker = build_tracker(uri=uri, experiment_name="exp", run_name="src", background=True)
    tracker.start({}, source_tags(["/venv/bin/mlxlab-train", "seed=3", "+tags.note=a b"]))
    tracker.end()
    tags = client_for(uri).get_run(tracker.run_id).data.tags
    assert tags[T.SOURCE_NAME] == "mlxlab-train"
    assert tags[T.COMMAND] == "mlxlab-train seed=3 '+tags.note=a b'"


def test_the_source_is_the_entry_point_as_typed():
    import mlxlab.train

    assert entry_point("/venv/bin/mlxlab-train") == "mlxlab-train"
    assert entry_point("mlxlab train") == "mlxlab train"  # cli/train.py's argv[0]
    assert entry_point(mlxlab.train.__file__) == "python -m mlxlab.train"
    assert entry_point("/elsewhere/script.py") == "script.py"
    assert command_line(["mlxlab train", "seed=1"]) == "mlxlab train seed=1"


def test_a_flush_barrier_returns_at_once_and_its_wait_at_the_stored_metrics(uri):
    """What a checkpoint save does: flush_barrier() sends the flush without waiting; its wait,
    called from another thread (the checkpoint writer's), returns once every metric logged
    before it is in the store, while this thread goes on logging."""
    import threading

    tracker = build_tracker(uri=uri, experiment_name="exp", run_name="barrier", background=True,
                            flush_every_steps=1000)
    tracker.start({}, {})
    run_id = tracker.run_id
    for step in range(20):
        tracker.log_metrics({"train/loss": float(step)}, step)
    stored = tracker.flush_barrier()
    seen: list[int] = []
    writer = threading.Thread(target=lambda: (stored(), seen.append(len(
        client_for(uri).get_metric_history(run_id, "train/loss")))))
    writer.start()
    for step in range(20, 40):  # the training thread, meanwhile
        tracker.log_metrics({"train/loss": float(step)}, step)
    writer.join(60)
    assert seen and seen[0] >= 20
    tracker.end()
    assert len(client_for(uri).get_metric_history(run_id, "train/loss")) == 40


def test_the_training_thread_never_waits_while_a_barrier_waits_on_a_busy_child(uri):
    """A checkpoint writer's barrier waits for the child's reply holding the reply lock; the
    training thread's sends (log_metrics, set_tags, a run_id already known) must not queue
    behind it (else every logged step would wait for the slow child)."""
    import threading

    tracker = build_tracker(uri=uri, experiment_name="exp", run_name="busy", background=True)
    tracker.start({}, {})
    run_id = tracker.run_id
    tracker.submit(busy_in_child, 3.0)
    stored = tracker.flush_barrier()
    writer = threading.Thread(target=stored)
    writer.start()
    time.sleep(0.3)  # the writer is in its wait, holding the lock
    started = time.perf_counter()
    for step in range(10):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.set_tags({"stage": "busy"})
    assert tracker.run_id == run_id
    took = time.perf_counter() - started
    assert took < 1.0, f"the training thread waited {took:.2f} s for the busy child"
    assert writer.is_alive(), "the child answered before the sends were timed"
    writer.join(60)
    tracker.end()
    assert len(client_for(uri).get_metric_history(run_id, "train/loss")) == 10


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("users", [None, pytest.param("false", marks=pytest.mark.slow)])
def test_the_tracking_process_sends_no_mlflow_telemetry_unless_the_user_asks(uri, monkeypatch,
                                                                             users):
    """MLflow 3 posts usage telemetry over the network; a training run makes no network call
    the user did not ask for. A user's own MLFLOW_DISABLE_TELEMETRY wins."""
    if users is None:
        monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", users)
    tracker = build_tracker(uri=uri, experiment_name="exp", background=True)
    # the child answered (it runs its own program): its environ is readable, not mid-exec
    tracker.start({}, {})
    tracker.flush()
    environ = Path(f"/proc/{tracker._process.pid}/environ").read_bytes().split(b"\0")
    tracker.end()
    assert f"MLFLOW_DISABLE_TELEMETRY={users or 'true'}".encode() in environ


def test_beside_csv_the_mlflow_tracker_alone_moves_to_the_child(uri, tmp_path):
    tracker = build_tracker(csv={"dir": str(tmp_path / "csv")}, uri=uri, experiment_name="exp",
                            background=True)
    assert isinstance(tracker, FanoutTracker)
    assert isinstance(tracker.trackers[0], TrackerProcess)
    tracker.start({"a": 1}, {})
    tracker.log_metrics({"val/accuracy": 0.5}, 1)
    tracker.end()
    assert tracker.run_id is not None
    assert client_for(uri).get_run(tracker.run_id).data.metrics["val/accuracy"] == 0.5
    assert "val/accuracy" in (tmp_path / "csv" / "metrics.csv").read_text()


def test_child_warnings_are_logged_here_and_its_errors_raised_here(uri, caplog):
    tracker = build_tracker(uri=uri, experiment_name="exp", background=True)
    tracker.start({}, {})
    with caplog.at_level(logging.WARNING):
        tracker.submit(warn_in_child, "a warning from the child")
        tracker.flush()
    assert any(r.getMessage() == "a warning from the child" and r.name == "mlxlab.tracking.test"
               for r in caplog.records)
    with pytest.raises(ValueError, match="broken in the child"):  # at the latest, at a wait
        tracker.submit(fail_in_child)
        tracker.flush()
    tracker.end()
    assert client_for(uri).get_run(tracker.run_id).info.status == "FINISHED"


PARENT = """
import os, sys, time
from mlxlab.tracking.fanout import build_tracker
tracker = build_tracker(uri=sys.argv[1], experiment_name="exp", background=True)
tracker.start({{"a": 1}}, {{}})
for step in range(5):
    tracker.log_metrics({{"train/loss": float(step)}}, step)
tracker.flush()
print(tracker.run_id, tracker._process.pid, flush=True)
assert "mlflow" not in sys.modules, "the training process imported mlflow"
{tail}
"""


def run_parent(uri: str, tmp_path: Path, tail: str) -> subprocess.Popen:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT.format(tail=tail)))
    return subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_training_process_never_imports_mlflow(uri, tmp_path):
    proc = run_parent(uri, tmp_path, 'tracker.end()\nassert "mlflow" not in sys.modules')
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = client_for(uri).get_run(out.split()[0])
    assert run.info.status == "FINISHED"


def test_a_killed_parent_leaves_what_it_flushed_and_its_child_exits(uri, tmp_path):
    proc = run_parent(uri, tmp_path, 'tracker.log_metrics({"late": 1.0}, 9)\ntime.sleep(120)')
    line = proc.stdout.readline().split()
    assert line, proc.stderr.read()
    run_id, child = line[0], int(line[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the tracking process outlived its parent"
    run = client_for(uri).get_run(run_id)
    assert run.info.status == "RUNNING"  # as in-process: settled by resume or tracking/mlflow/stale.py
    assert len(client_for(uri).get_metric_history(run_id, "train/loss")) == 5
    assert "late" not in run.data.metrics


def test_settings_fail_here_before_any_child_starts(tmp_path):
    with pytest.raises(ValueError, match="connect_timeout"):
        build_tracker(uri=f"sqlite:///{tmp_path}/m.db", background=True, connect_timeout=0)


def test_mlxlab_train_starts_the_tracking_process_before_composing(uri, tmp_path):
    """mlxlab-train starts the MLflow child first thing (its imports overlap Hydra's), unless the
    command line tracks otherwise or this is not the tracking rank; the tracker adopts it, and
    one never adopted exits with its parent."""
    from mlxlab.tracking.mlflow import background
    from mlxlab.tracking.mlflow.background import tracks_in_a_child

    assert tracks_in_a_child([]) and tracks_in_a_child(["tracking=[mlflow,csv]", "seed=3"])
    for argv in (["tracking=none"], ["tracking=csv"], ["tracking.background=false"],
                 ["--multirun", "seed=1,2"], ["--cfg", "job"]):
        assert not tracks_in_a_child(argv), argv
    background.prestart()
    warm = background._WARM[0][0].pid
    tracker = build_tracker(uri=uri, experiment_name="exp", run_name="warm", background=True)
    assert tracker._process.pid == warm and not background._WARM
    tracker.start({}, {})
    assert tracker.run_id is not None
    tracker.end()

    code = ("import time; from mlxlab.tracking.mlflow import background; background.prestart(); "
            "print(background._WARM[0][0].pid, flush=True); time.sleep(1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "an unused prestarted tracking process outlived its parent"
