"""Remote checkpoints against real storage servers on 127.0.0.1, started here: moto's S3 server,
gcp-storage-emulator (GCS) and Azurite (Azure Blob, from npm). Each: upload, resume from the
bucket after the local run directory is gone (bitwise-identical to an uninterrupted run), and the
server stopped mid-upload (training finishes, the upload is retried once it is back, nothing
half-written is ever taken for committed)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, REPO
from mlxlab.checkpoint import CheckpointWarning, check_committed, save_checkpoint
from mlxlab.checkpoint.remote import (
    RemoteStore,
    RemoteUploader,
    fetch_remote_checkpoint,
    open_filesystem,
)
from mlxlab.errors import RemoteError

pytest.importorskip("s3fs")

ARGS = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
    "trainer.batch_size=64", "trainer.max_epochs=2", "trainer.schedule.warmup_steps=4",  # 24 steps
    "trainer.log_every_steps=1", "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=4", "checkpoint.save_every_minutes=null",
    "checkpoint.keep_last_n=2", "checkpoint.remote_backoff_s=0.25",
    "task_name=remote",
]
LAST = 24
AZURITE_KEY = (  # Azurite's published development key (not a secret)
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Whether 127.0.0.1:port accepts within `timeout` (False at once if `proc` exits)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def wait_for_port(port: int, timeout: float = 60) -> None:
    if not listening(port, timeout):
        raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Server:
    """A storage server that can be stopped and started again on the same port and data."""

    scheme = ""
    env: dict[str, str]
    secret: str | None = None  # a credential that must never reach logs, MLflow or the run dir

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def make_bucket(self) -> None:
        with env_set(self.env):
            fs, root = open_filesystem(self.uri(""))
            fs.mkdir(root.split("/")[0])

    def uri(self, prefix: str) -> str:
        return f"{self.scheme}://bucket{self.port}/{prefix}".rstrip("/")


class MotoS3(Server):
    scheme = "s3"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.secret = f"s3cret-{time.time_ns()}"
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": self.secret,
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()  # moto's state lives in this process: a restart keeps the bucket
        wait_for_port(self.port)

    def stop(self) -> None:
        self.server.stop()


class FakeGCS(Server):
    scheme = "gs"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}"}

    def start(self) -> None:
        pytest.importorskip("gcp_storage_emulator")
        log = self.root / "gcs-emulator.log"
        # A restart right after a SIGKILL can fail to bind; the emulator then stays up without
        # serving (its API thread died, its main thread waits for it forever): start it again.
        for _ in range(4):
            with log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                     "--port", str(self.port)], cwd=self.root, stdout=out, stderr=out)
            if listening(self.port, 20, self.proc):
                return
            stop_process(self.proc, signal.SIGKILL)
            time.sleep(1)
        raise TimeoutError(f"the GCS emulator did not serve 127.0.0.1:{self.port}:\n"
                           f"{log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        # A crash, not a shutdown: SIGINT lets it serve on for seconds while it winds down (the
        # run could finish its uploads meanwhile); its objects are files on disk either way.
        stop_process(self.proc, signal.SIGKILL)


class Azurite(Server):
    scheme = "az"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        endpoint = f"http://127.0.0.1:{self.port}/devstoreaccount1"
        self.secret = AZURITE_KEY
        self.env = {"AZURE_STORAGE_CONNECTION_STRING": (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};")}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(azurite_bin()), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--location", str(self.root), "--silent", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM)


def stop_process(proc: subprocess.Popen, sig: int) -> None:
    """Ask the server to stop; kill it if it takes long (a busy CI box), and wait for it."""
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def azurite_bin() -> Path:
    """Azurite from npm, installed once into the git-ignored .cache/azurite (or skip, saying why)."""
    folder = REPO / ".cache" / "azurite"
    exe = folder / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("Azure tests need Azurite from npm, and node/npm are not installed")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "azurite@3"],
                       cwd=folder, check=True, timeout=600)
    return exe


SERVERS = {"s3": MotoS3, "gcs": FakeGCS, "azure": Azurite}


class env_set:
    def __init__(self, values: dict[str, str]) -> None:
        self.values, self.saved = values, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    srv = SERVERS[request.param](root)
    srv.start()
    srv.make_bucket()
    yield srv
    srv.stop()


def environment(root: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLXLAB_ROOT=str(root), PYTHONUNBUFFERED="1", **extra)
    return env


def start(args: list[str], run_dir: Path, env: dict) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([PYTHON, "-m", "mlxlab.train", *args, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def last_weights(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / "checkpoints" / f"step_{LAST:08d}" / "model.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must match bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    run_dir = root / "outputs" / "reference"
    finish(start(ARGS, run_dir, environment(root, {})))
    return run_dir


def remote_store(server: Server, prefix: str) -> RemoteStore:
    return RemoteStore(server.uri(prefix), retries=2, backoff_s=0.1)


HOLD_MODULE = '''
import time

from mlxlab.training.callbacks import Callback


class Hold(Callback):
    """Stops the loop at `step` (the uploads go on) until the test kills the run."""

    def __init__(self, step: int, max_s: float = 600.0) -> None:
        self.step, self.max_s = step, max_s

    def on_step(self, step: int, logs: dict) -> None:
        if step == self.step:
            time.sleep(self.max_s)
'''


def test_upload_then_resume_from_the_bucket_is_bitwise_identical(server, reference, tmp_path):
    prefix = f"run-{time.time_ns()}"
    uri = server.uri(prefix)
    env = environment(tmp_path, server.env)
    # The run holds at step 8 (a callback of the test's own, as a user adds one), so the kill
    # below lands mid-run however slow the uploads are next to 24 tiny steps (a busy CI box once
    # uploaded nothing before the run's last step).
    (tmp_path / "holdpoint.py").write_text(HOLD_MODULE)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    first = tmp_path / "outputs" / "remote" / "first"
    proc = start([*ARGS, f"checkpoint.remote={uri}",
                  "+callbacks.hold={_target_: holdpoint.Hold, step: 8}"], first, env)
    with env_set(server.env):
        store = remote_store(server, prefix)
        deadline = time.time() + 300
        while not store.committed_steps():  # the first committed upload, then the disk is lost
            assert proc.poll() is None, "the run ended before its first upload was seen:\n" + (
                proc.communicate()[1][-3000:])
            assert time.time() < deadline, "no committed upload within 300 s"
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shutil.rmtree(first)

    with env_set(server.env):
        uploaded = store.committed_steps()
        assert uploaded and max(uploaded) < LAST
        assert store.fs.exists(f"{store.root}/tokenizer.json")
        assert "trainer:" in store.fs.cat_file(f"{store.root}/config.yaml").decode()

    # S3: resume=auto with the remote configured (no local checkpoint: the bucket's newest);
    # GCS and Azure: resume=<the URI> itself
    second = tmp_path / "outputs" / "remote" / "second"
    resume = "resume=auto" if server.scheme == "s3" else f"resume={uri}"
    out = finish(start([*ARGS, f"checkpoint.remote={uri}", resume], second, env))
    assert f"downloaded {uri}/checkpoints/step_{max(uploaded):08d}" in out
    expected, got = last_weights(reference), last_weights(second)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key

    with env_set(server.env):
        steps = store.committed_steps()
        assert steps == [LAST, LAST - 4]  # remote rotation follows keep_last_n
        assert check_committed(store.download_checkpoint("best", tmp_path / "dl")) is None
    assert "remote checkpoints at" in out and f"step_{LAST:08d}" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
    assert f"{uri}/checkpoints/step_{LAST:08d}" in run.data.tags["mlxlab.remote.checkpoints"]
    assert run.data.tags["mlxlab.remote.uri"] == uri
    if server.secret:  # credentials come from the environment and go nowhere else
        seen = [out, *run.data.params.values(), *run.data.tags.values()]
        seen += [p.read_bytes().decode(errors="replace") for p in second.rglob("*") if p.is_file()]
        assert not [text for text in seen if server.secret in text]


def test_server_stopped_mid_upload(server, tmp_path):
    prefix = f"outage-{time.time_ns()}"
    uri = server.uri(prefix)
    env = environment(tmp_path, server.env)
    run_dir = tmp_path / "outputs" / "remote" / "outage"
    # ~2 min of backoff; a call on a connection the restarted server dropped ends after 10 s
    proc = start([*ARGS, f"checkpoint.remote={uri}", "checkpoint.remote_retries=9",
                  "checkpoint.remote_timeout_s=10"], run_dir, env)
    with env_set(server.env):
        store = remote_store(server, prefix)
        deadline = time.time() + 300
        while not store.step_dirs():  # an upload has begun
            assert proc.poll() is None, "the run finished before its first upload"
            assert time.time() < deadline
            time.sleep(0.02)
    server.stop()
    outage_over = threading.Event()

    def come_back() -> None:
        time.sleep(4)
        server.start()
        outage_over.set()

    threading.Thread(target=come_back, daemon=True).start()
    out = finish(proc)  # training never fails for the outage
    assert outage_over.is_set()  # the run was still uploading when the server came back
    # (s3fs/adlfs errors show as our "retry N of M" lines; gcsfs retries connection errors itself)
    with env_set(server.env):
        steps = store.committed_steps()
        assert steps and steps[0] == LAST, out[-3000:]
        for step, committed in store.step_dirs():  # every marker means a complete checkpoint
            if committed:
                name = f"step_{step:08d}"
                assert check_committed(store.download_checkpoint(name, tmp_path / "dl")) is None
    assert f"uploaded {uri}/checkpoints/step_{LAST:08d}" in out


def test_half_written_and_corrupt_remote_checkpoints_are_never_used(tmp_path):
    """In-process, S3 only: a directory without its marker is invisible, a corrupt one is
    skipped with a warning for the next older, as local resume does."""
    srv = MotoS3(tmp_path)
    srv.start()
    try:
        srv.make_bucket()
        with env_set(srv.env):
            store = remote_store(srv, "unit")
            local = tmp_path / "local" / "checkpoints"
            for step in (1, 2):
                store.upload_checkpoint(save_checkpoint(local, nn.Linear(2, 2), None,
                                                        {"step": step}), f"step_{step:08d}")
            # step 3: every file but the marker (an upload cut short)
            partial = save_checkpoint(local, nn.Linear(2, 2), None, {"step": 3})
            for f in partial.iterdir():
                if f.name != "COMMITTED":
                    store.put_file(f, "checkpoints", partial.name, f.name)
            assert store.committed_steps() == [2, 1]
            # step 2 corrupted remotely: fall back to step 1
            store.put_text("{}", "checkpoints", "step_00000002", "state.json")
            target = tmp_path / "resume"
            with pytest.warns(CheckpointWarning, match="step_00000002.*(checksum|bytes)"):
                got = fetch_remote_checkpoint(store.uri, target, None, retries=1, backoff_s=0.1)
            assert got == target
            assert sorted(p.name for p in (target / "checkpoints").iterdir()) == ["step_00000001"]
            assert json.loads((target / "checkpoints/step_00000001/state.json").read_text()) == {
                "step": 1}
            # remote rotation deletes the abandoned half-written step 3? No: it is newer than
            # the newest committed one, so a live upload is never deleted under the writer.
            store.rotate(1)
            assert [s for s, _ in store.step_dirs()] == [3, 2]
    finally:
        srv.stop()


def test_bad_remote_uris_are_one_clear_line():
    with pytest.raises(RemoteError, match="not s3://bucket/prefix"):
        RemoteStore("s3://")
    with pytest.raises(RemoteError, match="must not carry credentials"):
        RemoteStore("s3://AKIAXXX:secret@bucket/prefix")


@pytest.mark.slow  # a run's process; a remote failing at the start: the test below
def test_resume_from_a_bucket_that_does_not_exist_is_exit_2(tmp_path):
    env = environment(tmp_path, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                                 "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *ARGS, "resume=s3://nobucket/run",
         "checkpoint.remote_retries=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "cannot list checkpoints at s3://nobucket/run" in out.stderr


BROKEN_S3FS = 'raise ImportError("s3fs is broken in this environment")\n'


def test_a_remote_that_fails_at_the_start_ends_the_tracked_run(make_cfg, tmp_path, monkeypatch):
    """A remote whose filesystem cannot be opened when the checkpoint writer is built (its package
    fails to import, as when s3fs is missing or broken) fails after the tracker's run has started:
    the error is one line, and the MLflow run is FAILED when train() returns, not left RUNNING until
    the process exits (everything after the tracker's start is inside the loop's try/finally).
    In-process tracking, as sweeps and distillation rounds run it."""
    from mlxlab.train import train

    known = importlib.import_module("fsspec.registry")._registry  # classes fsspec imported
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails,
    monkeypatch.delitem(known, "s3", raising=False)  # even when an earlier test imported it
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_cfg(*ARGS, "trainer.max_epochs=1", f"tracking.uri={uri}", "tracking.background=false",
                   "checkpoint.remote=s3://bucket/prefix")
    with pytest.raises(RemoteError, match="s3:// checkpoints need s3fs") as raised:
        train(cfg)
    assert "\n" not in str(raised.value)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
    assert run.info.status == "FAILED"


def test_a_remote_that_fails_at_the_start_is_one_line_and_a_failed_run(tmp_path):
    """The same from the command line, tracking in its background process (the default): exit 2,
    one line, and the run recorded FAILED (before, the training process left before its tracking
    process had written the run, and the store had no run at all)."""
    fake = tmp_path / "fake_packages"
    fake.mkdir()
    (fake / "s3fs.py").write_text(BROKEN_S3FS)
    env = environment(tmp_path, {"PYTHONPATH": os.pathsep.join(
        filter(None, [str(fake), os.environ.get("PYTHONPATH")]))})
    out = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", *ARGS, "trainer.max_epochs=1",
         "checkpoint.remote=s3://bucket/prefix", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    [error] = [line for line in out.stderr.splitlines() if line.startswith("mlxlab: error:")]
    assert "s3:// checkpoints need s3fs" in error
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("remote")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_step_saved_twice_is_uploaded_as_one_whole_version(tmp_path):
    """The epoch-end save rewrites a step the periodic save just wrote: the bucket must end with
    the last version, never a mix of the two (uploads read hard links to one version)."""
    srv = MotoS3(tmp_path)
    srv.start()
    try:
        srv.make_bucket()
        with env_set(srv.env):
            run = tmp_path / "run"
            save_checkpoint(run / "checkpoints", nn.Linear(2, 2), None, {"step": 1})
            uploader = RemoteUploader(remote_store(srv, "twice"), run, keep_last_n=2)
            uploader.sync()
            save_checkpoint(run / "checkpoints", nn.Linear(2, 2), None, {"step": 1, "metric": 0.5})
            uploader.sync()
            assert uploader.close()[0].endswith("uploaded step_00000001")
            got = uploader.store.download_checkpoint("step_00000001", tmp_path / "dl")
            assert json.loads((got / "state.json").read_text()) == {"step": 1, "metric": 0.5}
            assert not list((run / "checkpoints").glob(".tmp-*"))  # staged links cleaned up
    finally:
        srv.stop()
