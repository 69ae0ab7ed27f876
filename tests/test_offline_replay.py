"""Metrics a run kept offline (tracking/mlflow/offline.py's spool) reach its run once, whoever sends
them: a real sqlite MLflow store and real spool files, as a tracker whose server went away writes
them.

The runs against a real server that dies (a sweep's job ending offline, the same command
sending its file) are tests/test_tracking_server_faults.py's (slow)."""

from __future__ import annotations

import os

from mlflow import MlflowClient

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import MlflowTracker
from mlxlab.tracking.mlflow.offline import SPOOL_FILE, Spool, replay_ended_run, send_spool


def steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def started(uri: str, run_dir) -> MlflowTracker:
    tracker = MlflowTracker(uri=uri, experiment_name="offline", async_logging=False)
    tracker.start({"a": 1}, {T.RUN_DIR: str(run_dir)})
    return tracker


def test_a_spool_sent_twice_gives_each_value_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = started(uri, tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.flush()
    spool = Spool(tmp_path / "run" / SPOOL_FILE, uri, tracker.run_id)
    spool.write([("loss", 1.0 / s, 1_000 + s, s) for s in range(2, 6)])
    spool.write_status("FINISHED")
    client = MlflowClient(uri)
    assert send_spool(spool.path, client) == 4
    os.replace(f"{spool.path}.sent", spool.path)  # a send that died before its rename
    assert send_spool(spool.path, client) == 0
    assert steps(client, tracker.run_id) == [1, 2, 3, 4, 5]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_the_next_command_finishes_a_run_that_ended_offline(tmp_path):
    """A run whose process ended it while the server was away, then marked KILLED by a later
    check (its process is gone): the next command that opens it sends its file and gives it the
    status its process ended it with, without the killed tags."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = started(uri, tmp_path / "run")
    client = MlflowClient(uri)
    spool = Spool(tmp_path / "run" / SPOOL_FILE, uri, tracker.run_id)
    spool.write([("loss", 0.5, 2_000, 7)])
    spool.write_status("FINISHED")
    tracker._active = False  # its process is gone: nothing more from it
    client.set_tag(tracker.run_id, T.KILLED_REASON, "process 1 is gone")
    client.set_terminated(tracker.run_id, "KILLED")
    assert replay_ended_run(client, client.get_run(tracker.run_id)) == "FINISHED"
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and T.KILLED_REASON not in run.data.tags
    assert steps(client, tracker.run_id) == [7]
    assert replay_ended_run(client, run) is None  # sent: nothing left to do


def test_a_resumed_run_sends_its_earlier_file_up_to_its_checkpoint(tmp_path):
    """The interrupted process kept steps 3-8 offline and checkpointed at step 5: the resumed
    run sends 3-5 (the steps after 5 are trained and logged again), each once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = started(uri, tmp_path / "run")
    first.log_metrics({"loss": 1.0}, step=2)
    first.flush()
    Spool(tmp_path / "run" / SPOOL_FILE, uri, first.run_id).write(
        [("loss", 1.0 / s, 1_000 + s, s) for s in range(3, 9)])
    first._active = False  # killed

    resumed = MlflowTracker(uri=uri, experiment_name="offline", async_logging=False)
    resumed.start({"a": 1}, {T.RUN_DIR: str(tmp_path / "run")}, run_id=first.run_id)
    resumed.rewind(5)
    for step in (6, 7, 8):
        resumed.log_metrics({"loss": 0.1}, step=step)
    resumed.end()
    assert steps(MlflowClient(uri), first.run_id) == [2, 3, 4, 5, 6, 7, 8]
    assert (tmp_path / "run" / f"{SPOOL_FILE}.sent").is_file()
