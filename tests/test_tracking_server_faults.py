"""A tracking server that goes away or races a first start: real `mlflow server`s
(scripts/mlflow_server.sh) on 127.0.0.1 started and SIGKILLed by the tests, real grids of
`mlxlab-train -m` on Titanic, real sqlite stores.

- a grid whose server dies while a job trains: the job goes on offline and ends; the sweep
  says it did not finish (exit 1); the same command, the server back, sends what the job kept
  (once) and finishes the sweep, the job's history equal to an uninterrupted one's;
- the server script started at the same moment as a first sweep on the same sqlite file: the
  sweep waits for the schema the server is making and is tracked;
- a store the server left half-made (killed while migrating it): a run is tracked in a store
  made anew, never trained untracked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import FAST, PYTHON, REPO, wait_for_server
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.offline import SPOOL_FILE
from test_new_user import free_port
from test_sweep_faults import env_for, grid_args

pytestmark = pytest.mark.slow

# two jobs; the second trains 200 steps, long enough for the server to die under it
LONG = {"replicates": "1", "trainer__max_epochs": "50", "trainer__max_steps": "200",
        "trainer__eval_every_steps": "20", "callbacks__checkpoint__save_every_steps": "50"}
COMPARED = ("train/loss", "val/loss", "val/accuracy", "best/val/loss")


def start_server(mlruns: Path, port: int, workers: int = 1) -> subprocess.Popen:
    """scripts/mlflow_server.sh on `mlruns` (its sqlite file, mlruns/mlflow.db), not waited for."""
    mlruns.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PORT": str(port), "WORKERS": str(workers), "MLRUNS_DIR": str(mlruns),
           "PYTHON": PYTHON}
    log = open(mlruns.parent / f"server-{port}-{time.time()}.log", "w")  # noqa: SIM115
    return subprocess.Popen([str(REPO / "scripts/mlflow_server.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(server: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)
    server.wait(timeout=60)


def served(mlruns: Path, port: int) -> tuple[subprocess.Popen, str]:
    server, uri = start_server(mlruns, port), f"http://127.0.0.1:{port}"
    wait_for_server(server, uri, next(mlruns.parent.glob(f"server-{port}-*.log")), 240)
    return server, uri


def grid(root: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "mlxlab.train", *grid_args(**LONG), *extra]


def job_history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in COMPARED}


def pooled_run(client: MlflowClient, parent_id: str):
    """The sweep's job with model.pooler=True (the second, the one the outage hits)."""
    (run,) = [r for r in client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.`{T.PARENT_RUN}` = '{parent_id}'") if r.data.params["model.pooler"] == "True"]
    return run


def the_parent(client: MlflowClient):
    experiment = client.get_experiment_by_name("train")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{T.ROLE}` = 'sweep'")
    return parent


def test_a_sweep_sends_what_its_job_kept_while_the_server_was_away(tmp_path):
    """The server SIGKILLed while job 1 trains, the job ending while it is down: the sweep exits 1
    saying so (not 0 with its parent FAILED); the same command with the server back sends the job's
    offline file once and finishes the sweep: the job's history equals an uninterrupted sweep's,
    step by step, no value twice."""
    whole = tmp_path / "whole"
    whole.mkdir()
    done = subprocess.run(grid(whole), cwd=whole, env=env_for(whole), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = MlflowClient(f"sqlite:///{whole}/mlruns/mlflow.db")
    expected = job_history(reference, pooled_run(reference, the_parent(reference).info.run_id)
                           .info.run_id)

    root, port = tmp_path / "away", free_port()
    root.mkdir()
    server, uri = served(root / "srv", port)
    cmd = grid(root, f"tracking.uri={uri}", "tracking.flush_every_steps=1",
               "tracking.connect_timeout=1", "tracking.request_timeout=10")
    try:
        sweep = subprocess.Popen(cmd, cwd=root, env=env_for(root), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        client, deadline = MlflowClient(uri), time.monotonic() + 600
        while True:  # job 1's run holds training values: the server goes away under it
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read()
            ids = list(root.glob("multirun/train/*/1/.mlflow_run_ids"))
            if ids and ids[0].read_text().split():
                run_id = ids[0].read_text().split()[-1]
                if "train/loss" in client.get_run(run_id).data.metrics:
                    break
            time.sleep(0.1)
        stop(server)
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 1, out[-4000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("mlxlab: error: sweep ") and "the same command continues it" in last
        (spool,) = root.glob(f"multirun/train/*/1/{SPOOL_FILE}")  # what the job kept offline

        server, uri = served(root / "srv", port)
        again = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        assert not spool.exists() and Path(f"{spool}.sent").is_file()
        client = MlflowClient(uri)
        parent = the_parent(client)
        assert parent.info.status == "FINISHED" and parent.data.tags[T.NUM_FINISHED] == "2"
        job = pooled_run(client, parent.info.run_id)
        assert job.info.run_id == run_id and job.info.status == "FINISHED"
        assert not {T.KILLED_AT, T.KILLED_REASON, T.RESUMABLE} & set(job.data.tags)  # no kill marks
        history = job_history(client, run_id)
        assert history == expected  # every step once, the uninterrupted values
        assert [s for s, _ in history["train/loss"]] == list(range(1, 201))
        # sending it again changes nothing (a send that died before its rename)
        from mlxlab.tracking.mlflow.offline import send_spool

        os.replace(f"{spool}.sent", spool)
        assert send_spool(spool, client) == 0
        assert job_history(client, run_id) == expected
    finally:
        stop(server)


def test_a_first_sweep_started_with_the_server_script_is_tracked(tmp_path):
    """scripts/mlflow_server.sh (2 workers) and a first sweep started together on a fresh root: the
    sweep finds the server migrating the store it writes, waits for its schema (not "table ...
    already exists", exit 2) and is tracked; the server then serves its runs."""
    port = free_port()
    server = start_server(tmp_path / "mlruns", port, workers=2)
    try:
        db, deadline = tmp_path / "mlruns" / "mlflow.db", time.monotonic() + 240
        while not (db.is_file() and db.stat().st_size):  # the server is making the store
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc = subprocess.run(grid(tmp_path, "trainer.max_steps=12"), cwd=tmp_path,
                              env=env_for(tmp_path), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        client = MlflowClient(f"sqlite:///{db}")
        parent = the_parent(client)
        assert parent.info.status == "FINISHED" and parent.data.tags[T.NUM_FINISHED] == "2"
        uri = f"http://127.0.0.1:{port}"
        wait_for_server(server, uri, next(tmp_path.glob(f"server-{port}-*.log")), 240)
        assert the_parent(MlflowClient(uri)).info.run_id == parent.info.run_id
    finally:
        stop(server)


def test_a_store_the_server_left_half_made_is_made_anew_and_the_run_tracked(tmp_path, cli_env):
    """The server killed while it migrates a fresh store leaves it half-made; a run then is tracked
    in a store made anew (the half-made one kept aside), not trained untracked with one WARNING
    (`mlflow run: -`)."""
    server = start_server(tmp_path / "mlruns", free_port())
    db, deadline = tmp_path / "mlruns" / "mlflow.db", time.monotonic() + 240
    seen: list[str] = []
    try:
        while len(seen) < 3:  # mid-way: its migrations have moved the revision twice
            assert server.poll() is None and time.monotonic() < deadline, seen
            with contextlib.suppress(sqlite3.Error, OSError):
                if db.is_file() and db.stat().st_size:
                    with contextlib.closing(sqlite3.connect(db, timeout=1)) as conn:
                        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                        if row and row[0] not in seen:
                            seen.append(row[0])
            time.sleep(0.01)
    finally:
        stop(server)
    proc = subprocess.run([PYTHON, "-m", "mlxlab.train", *FAST], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mlflow run: -" not in proc.stdout
    (run,) = MlflowClient(f"sqlite:///{db}").search_runs(
        [MlflowClient(f"sqlite:///{db}").get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED" and f"mlflow run: {run.info.run_id}" in proc.stdout
    assert list(db.parent.glob("mlflow.db.half-made-*"))
