"""Nothing RUNNING for ever: a run whose process died is marked KILLED by the next command that
opens the store, with when, why and whether a checkpoint continues it. Real processes, real SIGKILL,
a real sqlite MLflow store."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import MLXLAB
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.stale import mark_dead_runs, process_start
from run_helpers import TITANIC, committed_steps, kill_when, run, start


def _running_run(client: MlflowClient, tags: dict[str, str]) -> str:
    experiment = client.get_experiment_by_name("exp") or client.get_experiment(
        client.create_experiment("exp")
    )
    return client.create_run(experiment.experiment_id, tags=tags).info.run_id


def test_a_reused_pid_and_a_silent_host_are_dead_a_live_process_is_not(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        host, pid = socket.gethostname(), str(sleeper.pid)
        stamp = process_start(sleeper.pid)
        assert stamp is not None
        method, _, when = stamp.rpartition(":")
        live = _running_run(client, {T.HOST: host, T.PID: pid, T.PROCESS_START: stamp})
        reused = _running_run(
            client,
            {
                T.HOST: host,
                T.PID: pid,  # the pid, another start
                T.PROCESS_START: f"{method}:{int(when) - 5000}",
            },
        )
        now = time.time()
        beating = _running_run(
            client,
            {T.HOST: "elsewhere", T.PID: "1", T.HEARTBEAT: f"{now:.0f}", T.HEARTBEAT_EVERY: "30"},
        )
        silent = _running_run(
            client,
            {
                T.HOST: "elsewhere",
                T.PID: "1",
                T.HEARTBEAT: f"{now - 121:.0f}",
                T.HEARTBEAT_EVERY: "30",
            },
        )
        unknown = _running_run(client, {T.HOST: "elsewhere", T.PID: "1"})  # nothing to judge by
        assert sorted(mark_dead_runs(uri)) == sorted([reused, silent])
    finally:
        sleeper.kill()
        sleeper.wait()
    for run_id in (live, beating, unknown):
        assert client.get_run(run_id).info.status == "RUNNING"
    tags = client.get_run(reused).data.tags
    assert "is another process now" in tags[T.KILLED_REASON] and tags[T.RESUMABLE] == "false"
    assert "no heartbeat from elsewhere for 12" in client.get_run(silent).data.tags[T.KILLED_REASON]
    assert mark_dead_runs(uri) == [live]  # its process is gone now


def test_a_killed_runs_end_is_its_last_sign_of_life_not_when_it_was_found(tmp_path):
    """A run whose process died an hour ago, found dead now: it ends at its last metric or
    heartbeat, whichever is later, so its duration is the hour it ran before, not until now."""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    now = time.time()
    started = int((now - 7200) * 1000)
    experiment = client.get_experiment_by_name("exp") or client.get_experiment(
        client.create_experiment("exp"))
    beat = now - 3600 - 60  # a heartbeat a minute before its last metric
    run_id = client.create_run(
        experiment.experiment_id, start_time=started,
        tags={T.HOST: "elsewhere", T.PID: "1", T.HEARTBEAT: f"{beat:.0f}",
              T.HEARTBEAT_EVERY: "30"}).info.run_id
    last_metric = int((now - 3600) * 1000)
    client.log_batch(run_id, metrics=[Metric("train/loss", 1.0, started + 1000, 1),
                                      Metric("train/loss", 0.5, last_metric, 2)])
    assert mark_dead_runs(uri) == [run_id]
    info = client.get_run(run_id).info
    assert info.status == "KILLED"
    assert info.end_time == last_metric  # before: the time it was marked, an hour later


def test_the_tracker_beats_while_the_run_lives(tmp_path):
    from mlxlab.tracking.mlflow import MlflowTracker

    tracker = MlflowTracker(
        uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment_name="exp",
        heartbeat_every_seconds=0.3,
        async_logging=False,
    )
    tracker.start({}, {})
    client = MlflowClient(tracker.uri)
    first = float(client.get_run(tracker.run_id).data.tags[T.HEARTBEAT])
    assert client.get_run(tracker.run_id).data.tags[T.HEARTBEAT_EVERY] == "0.3"
    time.sleep(2.2)
    assert float(client.get_run(tracker.run_id).data.tags[T.HEARTBEAT]) > first
    tracker.end()
    assert tracker._heartbeat is None


@pytest.mark.parametrize("key", ["heartbeat_every_seconds"])
def test_a_heartbeat_interval_must_be_positive(tmp_path, key):
    from mlxlab.tracking.mlflow import MlflowTracker

    with pytest.raises(ValueError, match=rf"tracking\.{key} must be > 0 seconds"):
        MlflowTracker(uri=f"sqlite:///{tmp_path}/m.db", **{key: 0})


@pytest.mark.slow
def test_a_sigkilled_run_is_killed_resumable_and_a_resume_finishes_it(tmp_path, cli_env):
    """SIGKILL after the first committed checkpoint: `mlxlab runs show` marks it KILLED with a
    checkpoint to continue; `resume=` takes the same MLflow run from KILLED to FINISHED."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = [*TITANIC, "trainer.max_epochs=1", "task_name=dead"]
    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: bool(committed_steps(killed)))
    client = MlflowClient(uri)
    (before,) = client.search_runs([client.get_experiment_by_name("dead").experiment_id])
    assert before.info.status == "RUNNING"
    shown = subprocess.run(
        [MLXLAB, "runs", "show", before.info.run_id, "--uri", uri],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    marked = client.get_run(before.info.run_id)
    assert marked.info.status == "KILLED" and "KILLED" in shown.stdout
    assert marked.data.tags[T.RESUMABLE] == "true"
    assert f"process {marked.data.tags[T.PID]} on " in marked.data.tags[T.KILLED_REASON]
    assert marked.data.tags[T.PROCESS_START].startswith(("proc:", "psutil:"))

    run([*args, f"resume={killed}"], tmp_path / "resumed", cli_env)
    after = client.get_run(before.info.run_id)
    assert after.info.status == "FINISHED"
    assert int(after.data.tags[T.PID]) != int(before.data.tags[T.PID])  # the resuming process
    assert os.path.isdir(killed / "checkpoints")


def test_a_run_of_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path):
    """Containers sharing a hostname (host networking) do not see each other's pids: a run
    tagged with another pid namespace is not judged by a pid this process cannot see (that
    would mark a live run KILLED), but by its heartbeat, as a run of another host."""
    from mlxlab.tracking.mlflow.stale import pid_namespace

    if pid_namespace() is None:
        pytest.skip("no /proc/self/ns/pid here")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    host, now = socket.gethostname(), time.time()
    gone_pid = str(2**22 + 12345)  # above pid_max's default ceiling: no such process here
    other = {T.HOST: host, T.PID: gone_pid, T.PID_NAMESPACE: "pid:[1]", T.HEARTBEAT_EVERY: "30"}
    beating = _running_run(client, {**other, T.HEARTBEAT: f"{now:.0f}"})
    silent = _running_run(client, {**other, T.HEARTBEAT: f"{now - 121:.0f}"})
    ours = _running_run(client, {T.HOST: host, T.PID: gone_pid, T.PID_NAMESPACE: pid_namespace()})
    assert sorted(mark_dead_runs(uri)) == sorted([silent, ours])
    assert client.get_run(beating).info.status == "RUNNING"
    assert "no heartbeat" in client.get_run(silent).data.tags[T.KILLED_REASON]
    assert "is gone" in client.get_run(ours).data.tags[T.KILLED_REASON]
