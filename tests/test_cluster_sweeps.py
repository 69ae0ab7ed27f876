"""Hydra cluster launchers for real on this machine: a 2-job sweep through submitit (local
executor) and through Ray (a head the test starts on 127.0.0.1), tracked in a real `mlflow
server`: the jobs land as children of one sweep parent run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, REPO, wait_for_server

TINY = [
    "trainer.max_steps=3", "trainer.eval_every_steps=3", "trainer.schedule.warmup_steps=0",
    "callbacks.progress.enabled=false", "trainer.batch_size=64", "checkpoint.save_every_minutes=null",
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "data.max_length=48",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`scripts/mlflow_server.sh` on a free loopback port; yields its URI."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "MLRUNS_DIR": str(tmp_path / "srv")}
    log = (tmp_path / "server.log").open("w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(REPO / "scripts/mlflow_server.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, uri, tmp_path / "server.log", 180)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLXLAB_ROOT": str(tmp_path), "OPENBLAS_NUM_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sweep(tmp_path: Path, uri: str, launcher: list[str], task: str, **extra_env: str) -> None:
    env = job_env(tmp_path, **extra_env)
    proc = subprocess.run(
        [str(Path(PYTHON).parent / "mlxlab-train"), "--multirun", *launcher, f"tracking.uri={uri}",
         f"task_name={task}", "optimizer.learning_rate=1e-3,3e-3", *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(task).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["optimizer.learning_rate"] for r in children} == {"0.001", "0.003"}
    assert all(r.info.status == "FINISHED" and "val/accuracy" in r.data.metrics for r in children)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="needs the slurm extra: pip install -e '.[slurm]'")
def test_submitit_local_sweep_lands_under_one_parent(tmp_path, server):
    sweep(tmp_path, server, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"],
          "submitit_sweep")


# Ray on loopback only: Ray turns 127.0.0.1 into the host's routable address (and then fails to
# reach itself on a box whose other address is not routable) unless it is told it runs no
# multi-host cluster (this variable, despite its name, is the switch on Linux too); token auth
# (on by default since Ray 2.5x) is off, like `ray start` on a laptop. Head, driver and
# workers all need both.
RAY_LOCAL = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
             "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 in its own session (stopped by its process group,
    never `ray stop`, which would stop every Ray on the machine); yields its address. Workers
    inherit the head's environment and folder, so both are the test's."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = job_env(tmp_path, **RAY_LOCAL)
    log_path = tmp_path / "ray_head.log"
    log = log_path.open("w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(Path(PYTHON).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={port}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Ray waits up to a hard-coded ~30 s for its raylet; a saturated box needs longer overall.
        deadline = time.monotonic() + 240
        while "Ray runtime started" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "ray head did not start in 240 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)  # `ray start --block` can hang in its own shutdown
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # whatever of the session is left, daemons included
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="needs the ray extra: pip install -e '.[ray]'")
def test_ray_sweep_lands_under_one_parent(tmp_path, server, ray_head):
    sweep(tmp_path, server, ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head}",
                             # ray.init refuses object_store_memory when it joins a cluster
                             "+hydra.launcher.ray.init.object_store_memory=null"],
          "ray_sweep", RAY_ADDRESS=ray_head, **RAY_LOCAL)
