"""MLflow tracking against one central store: a sqlite file (default) or a tracking server.

Every run, sweep job and worker logs to the same store. MlflowClient (not the fluent
`mlflow.start_run` API, whose active run is process-global) so several trackers can coexist.
mlflow is imported inside functions: its first import costs seconds, and `tracking=none`
runs should not pay it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import json
import logging
import math
import os
import random
import re
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlxlab.errors import UserError
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import CHOICE_TAG_PREFIX, BaseTracker, flatten_config
from mlxlab.tracking.offline import SPOOL_FILE, Spool, reachable, send_spool

log = logging.getLogger(__name__)

ENV_PARENT_RUN_ID = "MLXLAB_PARENT_RUN_ID"  # set by the sweep callback, read by each job
ENV_SWEPT_KEYS = "MLXLAB_SWEPT_KEYS"  # likewise: the keys a sweep varies (JSON), for run names
# Tag names live in tracking/tags.py; these aliases keep this module's older names importable.
PARENT_RUN_TAG = T.PARENT_RUN
SWEEP_ID_TAG = T.SWEEP_ID
ROLE_TAG = T.ROLE
SWEEP_PARAMS_TAG = T.SWEEP_PARAMS
CONFIG_HASH_TAG = T.CONFIG_HASH
RUN_DIR_TAG = T.RUN_DIR
# Runs MlflowTracker started (or resumed) in this process, in order: the sweep callback reads
# which run a job produced from it (one job at a time per process in Hydra's launchers).
STARTED_RUN_IDS: list[str] = []
METRIC_TAG = T.OPTIMIZED_METRIC
MODE_TAG = T.OPTIMIZED_MODE
STATUSES = ("FINISHED", "FAILED", "KILLED")

MAX_PARAMS_PER_BATCH = 100  # MLflow log_batch limits
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# MLflow already makes sqlite wait 20 s for a lock (PRAGMA busy_timeout); a store still locked
# after that, or a server answering "database is locked", gets ~7 s more of backoff in all.
RETRY_ATTEMPTS = 8
# MLflow 3 opens experiments without this tag in its GenAI view; ours are model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = T.EXPERIMENT_KIND, "custom_model_development"
# Config parts that say where things go, not what is trained: kept out of a run's params.
UNLOGGED_PARAM_ROOTS = ("paths", "tracking", "hydra")
UNLOGGED_PARAM_KEYS = ("_target_", "_convert_", "_partial_", "_recursive_")


class TrackingUnavailable(UserError, ConnectionError):
    """The tracking store named by the config does not answer; the message says what to do."""


_ENV_LOCK = threading.RLock()  # bounded calls may nest (end() -> a reconnect)


@contextlib.contextmanager
def bounded_http(timeout: float) -> Iterator[None]:
    """MLflow's HTTP calls inside fail after one try of at most `timeout` seconds, instead of
    its default 7 retries with backoff of up to 120 s each (minutes on a dead server)."""
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
    }
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def probe_store(uri: str | None, timeout: float = 5.0, request_timeout: float = 30.0) -> None:
    """Raise TrackingUnavailable unless the store at `uri` answers: a connection within
    `timeout` s (a dead port fails at once), then one API reply within `request_timeout` s (a
    fresh server builds its database on its first request).

    Local sqlite stores are not probed (ensure_store creates them). A server is asked once for
    one experiment, with MLflow's retries off, in a thread given a hard deadline.
    """
    uri = resolve_uri(uri)
    if sqlite_path(uri) is not None:
        return
    from mlflow import MlflowClient  # imported here: its first import alone can take seconds

    fix = ("start the server (scripts/mlflow_server.sh), fix tracking.uri, or train untracked "
           "with tracking=none")
    if uri.startswith(("http://", "https://")) and not reachable(uri, timeout):
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer (no connection within {timeout:g} s, "
            f"tracking.connect_timeout): {fix}"
        )
    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            with bounded_http(request_timeout):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            outcome["error"] = None
        except Exception as e:
            outcome["error"] = e

    thread = threading.Thread(target=ask, daemon=True, name="mlflow-probe")
    thread.start()
    thread.join(timeout + request_timeout + 1)
    if "error" not in outcome:
        raise TrackingUnavailable(
            f"MLflow tracking store {uri} did not answer within {request_timeout:g} s "
            f"(tracking.request_timeout): {fix}"
        )
    error = outcome["error"]
    if error is not None:
        text = str(error)
        if "timed out" in text.lower():
            reason = f"no reply within {request_timeout:g} s, tracking.request_timeout"
        elif "Max retries exceeded" in text or "Connection" in text:
            reason = "the connection failed"
        else:
            reason = text.strip().splitlines()[0][:160]
        raise TrackingUnavailable(f"MLflow tracking store {uri} does not answer ({reason}): {fix}")


# --------------------------------------------------------------------------- store


def default_store_uri(root: str | Path | None = None) -> str:
    """sqlite URI of `<root>/mlruns/mlflow.db` (root: the project root), always absolute."""
    from mlxlab.config import project_root  # the same root train.py's paths use

    db = (Path(root) if root is not None else project_root()).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def resolve_uri(uri: str | None) -> str:
    """uri, else $MLFLOW_TRACKING_URI, else the default sqlite store; rejects file stores."""
    uri = str(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri())
    if "://" not in uri or uri.startswith("file:"):
        raise ValueError(
            f"tracking uri {uri!r} is a file store, which MLflow 3 no longer writes; "
            f"use a sqlite store such as 'sqlite:///{Path(uri.removeprefix('file:')).resolve()}"
            "/mlflow.db' or a server 'http://127.0.0.1:5000'"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (query string dropped), None for other backends."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def ensure_store(
    uri: str | None = None, experiment_name: str = "mlxlab", artifact_root: str | None = None
) -> str:
    """Create the store and the experiment if missing; return the experiment id. Idempotent.

    For sqlite the schema is created under an fcntl lock next to the database file: several
    processes migrating a fresh sqlite file at once can corrupt it. Artifacts default to
    `<database dir>/artifacts/<experiment id>`; a tracking server picks its own.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is None:
        return _retrying(_ensure_experiment_via_client, uri, experiment_name, artifact_root)

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    root = Path(artifact_root or db.parent / "artifacts").resolve()
    with _file_lock(db.with_name(db.name + ".lock")):
        fresh = not db.exists() or db.stat().st_size == 0
        if fresh:
            _copy_store_template(db)
        store = _retrying(SqlAlchemyStore, uri, str(root))
        if fresh:
            _save_store_template(db)
        experiment = store.get_experiment_by_name(experiment_name)
        if experiment is None:
            from mlflow.entities import ExperimentTag

            return store.create_experiment(
                experiment_name, tags=[ExperimentTag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)]
            )
        if experiment.lifecycle_stage == "deleted":
            log.warning("restoring deleted MLflow experiment %r", experiment_name)
            store.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before this tag was set
            from mlflow.entities import ExperimentTag

            store.set_experiment_tag(
                experiment.experiment_id, ExperimentTag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            )
        return experiment.experiment_id


def store_template_path() -> Path:
    """An empty store migrated by this MLflow version, kept in the user's cache
    ($MLXLAB_CACHE_DIR, else $XDG_CACHE_HOME/mlxlab, else ~/.cache/mlxlab): MLflow builds a new
    sqlite store by running every schema migration since its first release (~10 s on 2 cores),
    a copy takes milliseconds."""
    import mlflow

    base = os.environ.get("MLXLAB_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlxlab"
    return Path(base) / f"mlflow-{mlflow.__version__}-empty-store.db"


def _copy_store_template(db: Path) -> None:
    template = store_template_path()
    if template.is_file():
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)


def _save_store_template(db: Path) -> None:
    """The fresh store, minus its Default experiment (whose artifact folder is this store's;
    MLflow recreates it in every copy), as the template for the next fresh store."""
    template = store_template_path()
    if template.is_file():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        shutil.copyfile(db, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as conn, conn:
            conn.execute("DELETE FROM experiment_tags")
            conn.execute("DELETE FROM experiments")
        os.replace(tmp, template)
    except (OSError, sqlite3.Error) as e:  # a read-only home: every fresh store migrates
        log.debug("no MLflow store template at %s: %s", template, e)


def _ensure_experiment_via_client(uri: str, name: str, artifact_root: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException as e:  # another job created it first
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_transient(error: BaseException) -> bool:
    message = str(error).lower()
    return "database is locked" in message or "database table is locked" in message


def _retrying(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), retried with jittered exponential backoff while sqlite is locked."""
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == RETRY_ATTEMPTS - 1 or not _is_transient(e):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(1.0, 1.5))
    raise AssertionError("unreachable")


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------- tracker


class MlflowTracker(BaseTracker):
    """The Tracker of docs/architecture.md on MLflow; logging errors warn once, never raise.

    log_metrics only appends to a buffer; a background thread sends it with log_batch every
    `flush_every_steps` calls or `flush_every_seconds`, so the training step never waits on
    the store. `end()` flushes and sets the run's status.

    A tracking server that stops answering mid-run never stops training: each call to it fails
    after one try of `connect_timeout` seconds, metrics then go to `<run dir>/mlflow_offline.jsonl`
    and are sent when the server answers again; `offline_report` says which happened.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment_name: str = "mlxlab",
        run_name: str | None = None,
        artifact_root: str | None = None,
        flush_every_steps: int = 50,
        flush_every_seconds: float = 10.0,
        async_logging: bool = True,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
    ) -> None:
        if connect_timeout <= 0 or request_timeout <= 0:
            raise ValueError("tracking.connect_timeout and tracking.request_timeout must be > 0 "
                             f"seconds, got {connect_timeout} and {request_timeout}")
        if flush_every_steps < 1 or flush_every_seconds <= 0:
            raise ValueError(
                "tracking.flush_every_steps must be >= 1 and tracking.flush_every_seconds > 0, "
                f"got {flush_every_steps} and {flush_every_seconds}"
            )
        self.uri = resolve_uri(uri)
        self.experiment_name = str(experiment_name)
        self.run_name = run_name
        self.artifact_root = artifact_root
        self.flush_every_steps = int(flush_every_steps)
        self.flush_every_seconds = float(flush_every_seconds)
        self.async_logging = async_logging
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.remote = self.uri.startswith(("http://", "https://"))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.errors = 0  # logging calls that failed (after retries) and were skipped
        self._client = None
        self._active = False
        self._warned = False
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, time ms, step)
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time keeps batches in order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dataset: dict | None = None  # set_dataset(): logged as the run's input at start
        self.spool_dir = Path.cwd()  # where unsent metrics go: the run dir (its tag) at start
        self.spool: Spool | None = None
        self.offline_since: int | None = None  # the step at which the server stopped answering
        self.outages: list[tuple[int, int, int]] = []  # (from step, to step, values sent late)
        self.skipped: list[str] = []  # calls left out while the server was away
        self.offline_report: str | None = None
        self._last_step = 0

    # -- lifecycle

    def probe(self) -> None:
        """Fail fast (TrackingUnavailable) unless the store answers within connect_timeout."""
        probe_store(self.uri, self.connect_timeout, self.request_timeout)

    def set_dataset(self, name: str, source: str, digest: str, rows: int | None) -> None:
        """The training data, logged as the run's MLflow dataset input when it starts."""
        self.dataset = {"name": name, "source": source, "digest": digest, "rows": rows}

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        """Start a run, or resume `run_id` (metrics append to it); logs params and tags."""
        if tags.get(RUN_DIR_TAG):
            self.spool_dir = Path(str(tags[RUN_DIR_TAG]))
        try:
            with self._bounded():
                self._start(params, tags, run_id)
        except Exception as e:
            self._warn("start", e)
            self.run_id, self._active = None, False

    def _start(self, params: dict, tags: dict, run_id: str | None) -> None:
        from mlflow import MlflowClient

        self.experiment_id = ensure_store(self.uri, self.experiment_name, self.artifact_root)
        self._client = client = MlflowClient(tracking_uri=self.uri)
        tags = {str(k): str(v) for k, v in tags.items()}
        # earlier runs of this task killed before their first checkpoint (tracking/stale.py)
        from mlxlab.tracking.stale import mark_dead_runs_quietly

        mark_dead_runs_quietly(self.uri, self.experiment_name, tags.get(T.TASK_NAME))
        parent = os.environ.get(ENV_PARENT_RUN_ID)
        if parent:
            tags.setdefault(PARENT_RUN_TAG, parent)
            tags.setdefault(SWEEP_ID_TAG, parent)

        logged_params: dict[str, str] = {}
        if run_id is not None:
            try:
                run = _retrying(client.get_run, run_id)
            except Exception as e:
                log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, e)
                run_id = None
        if run_id is not None:
            _retrying(client.update_run, run_id, status="RUNNING")
            logged_params = run.data.params
        else:
            run_tags = {"mlflow.user": _user(), "mlflow.source.name": Path(sys.argv[0]).name}
            run = _retrying(
                client.create_run, self.experiment_id, tags=run_tags, run_name=self.run_name
            )
            run_id = run.info.run_id
        self.run_id, self._active = run_id, True
        STARTED_RUN_IDS.append(run_id)
        self._safely("log params", self._log_params, params, logged_params)
        self._safely("set_tags", self._log_tags, tags)
        if self.dataset is not None and not logged_params:
            self._safely("log_inputs", self._log_dataset)

        self._stop.clear()
        if self.async_logging:
            self._thread = threading.Thread(
                target=self._flush_loop, daemon=True, name="mlflow-flush"
            )
            self._thread.start()
        atexit.register(self._end_at_exit)

    def _log_params(self, params: dict, logged_params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = {k: v for k, v in flatten_config(params).items() if _is_logged_param(k)}
        changed = sorted(k for k, v in flat.items() if logged_params.get(k, v) != v)
        if changed:  # MLflow params are write-once; the new values live in the checkpoint
            log.warning("resumed run %s keeps its logged values for %s", self.run_id, changed)
        new = [Param(k, v) for k, v in flat.items() if k not in logged_params]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            _retrying(self._client.log_batch, self.run_id, params=chunk)

    def _log_dataset(self) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        info = self.dataset
        profile = json.dumps({"num_rows": info["rows"]}) if info["rows"] is not None else None
        dataset = Dataset(info["name"], info["digest"], "local", json.dumps({"uri": info["source"]}),
                          profile=profile)
        self._client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])]
        )

    def end(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics and set the run's final status."""
        if status not in STATUSES:
            raise ValueError(f"run status must be one of {STATUSES}, got {status!r}")
        if not self._active:
            return
        self._active = False
        atexit.unregister(self._end_at_exit)
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        self.flush()
        if self.offline_since is None:
            with self._bounded():
                self._safely("end", _retrying, self._client.set_terminated, self.run_id, status)
        if self.offline_since is not None:  # still away (or it went away just now)
            spool = self._spool()
            spool.write_status(status)
            self.offline_report = (
                f"MLflow server {self.uri} has not answered since step {self.offline_since}: "
                f"{spool.metrics} metric values and the final status {status} are in {spool.path}; "
                f"send them when it is back: python -m mlxlab.tracking.offline {spool.path}"
                + (f" (not uploaded: {', '.join(sorted(set(self.skipped)))}; they are in the run "
                   "directory)" if self.skipped else "")
            )
            log.warning("%s", self.offline_report)
        elif self.outages:
            spans = ", ".join(f"steps {a}-{b}" for a, b, _ in self.outages)
            self.offline_report = (
                f"MLflow server {self.uri} was away ({spans}); the "
                f"{sum(n for *_, n in self.outages)} metric values kept meanwhile were sent when "
                "it came back"
                + (f" (not uploaded: {', '.join(sorted(set(self.skipped)))})" if self.skipped else "")
            )
            log.info("%s", self.offline_report)

    def summary(self) -> list[str]:
        if not self.run_id:
            return ["mlflow run: -"]
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.remote:
            lines = [f"mlflow run: {self.run_id}, open {self.uri.rstrip('/')}/{page}"]
        else:
            lines = [f"mlflow run: {self.run_id} (experiment {self.experiment_name!r}); open it: "
                     f"mlflow ui --backend-store-uri {self.uri}  then http://127.0.0.1:5000/{page}"]
        if self.offline_report:
            lines.append(f"mlflow:     {self.offline_report}")
        return lines

    def _end_at_exit(self) -> None:  # the process is leaving without end(): keep the metrics
        self.end("FAILED")

    # -- metrics

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._active:
            return
        now_ms = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError) as e:
                self._warn(f"metric {key!r}", e)
                continue
            rows.append((str(key), value, now_ms, int(step)))
        self._last_step = int(step)
        with self._pending_lock:
            self._pending.extend(rows)
            self._steps_since_flush += 1
            due = self._steps_since_flush >= self.flush_every_steps or (
                time.monotonic() - self._last_flush >= self.flush_every_seconds
            )
        if due:
            if self._thread is not None:
                self._wake.set()
            else:
                self.flush()

    def flush(self) -> None:
        """Send buffered metrics now (blocking). Normally the background thread does this."""
        if self._client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        with self._flush_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, []
                self._steps_since_flush = 0
                self._last_flush = time.monotonic()
            if self.offline_since is not None and not self._back_online():
                self._spool().write(pending)
                return
            for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
                chunk = pending[i : i + MAX_METRICS_PER_BATCH]
                try:
                    with self._bounded():
                        _retrying(self._client.log_batch, self.run_id,
                                  metrics=[Metric(*row) for row in chunk])
                except Exception as e:
                    if self._server_lost(e):
                        self._spool().write(pending[i:])
                    elif self.remote and _is_transient_http(e):  # slow or busy: next flush
                        log.debug("MLflow server %s did not take metrics yet: %s", self.uri, e)
                        with self._pending_lock:
                            self._pending[:0] = pending[i:]
                    else:
                        self._warn("log_metrics", e)
                        continue
                    return

    def rewind(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint at `step`: drop the values the
        interrupted process logged for them, so each step keeps one value (sqlite stores only;
        MLflow offers no way to delete values on a server)."""
        if not self._active:
            return
        if sqlite_path(self.uri) is None:
            log.warning("MLflow run %s: values logged after step %d before the interruption "
                        "cannot be removed from %s; replayed steps may appear twice",
                        self.run_id, step, self.uri)
            return
        from mlxlab.tracking.rewind import drop_metrics_after

        with self._flush_lock:
            dropped = self._safely(
                "rewind", _retrying, drop_metrics_after, self.uri, self.run_id, step
            )
        if dropped:
            log.info("MLflow run %s: dropped %d values logged after step %d by the interrupted "
                     "run; they are logged again as the steps are replayed",
                     self.run_id, dropped, step)

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.flush_every_seconds)
            self._wake.clear()
            self.flush()

    # -- tags and artifacts

    def set_tags(self, tags: dict) -> None:
        if self._active:
            self._safely("set_tags", self._log_tags, {str(k): str(v) for k, v in tags.items()})

    def _log_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        entities = [RunTag(k, v) for k, v in tags.items()]
        for chunk in _chunks(entities, MAX_TAGS_PER_BATCH):
            _retrying(self._client.log_batch, self.run_id, tags=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under `artifact_path` of the run."""
        if self._active:
            self._safely("log_artifact", self._log_artifact, Path(path), artifact_path)

    def _log_artifact(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"no file or directory at {path} to log as an artifact")

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A dict as a JSON or YAML artifact (picked by the file suffix)."""
        if self._active:
            self._safely("log_dict", self._client.log_dict, self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._active:
            self._safely("log_text", self._client.log_text, self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as `plots/<name>.png`."""
        if self._active:
            file = name if name.endswith(".png") else f"{name}.png"
            self._safely(
                "log_figure", self._client.log_figure, self.run_id, figure, f"plots/{file}"
            )

    # -- errors

    def _safely(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.remote and not self._online():
            self.skipped.append(what)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if self._server_lost(e):
                self.skipped.append(what)
            else:
                self._warn(what, e)

    # -- a server that goes away

    def _bounded(self) -> contextlib.AbstractContextManager:
        return bounded_http(self.request_timeout) if self.remote else contextlib.nullcontext()

    def _online(self) -> bool:
        """Before a call to a server: is it there (sending what was kept if it is back)?"""
        if self.offline_since is not None:
            with self._flush_lock:
                return self._back_online()
        if not self._answers():
            self._go_offline(f"no connection within {self.connect_timeout:g} s")
            return False
        return True

    def _answers(self) -> bool:
        return reachable(self.uri, self.connect_timeout)

    def _server_lost(self, error: BaseException) -> bool:
        """After a failed call: whether the server is gone (then the tracker goes offline)."""
        if not self.remote or self._answers():
            return False
        self._go_offline(f"{type(error).__name__}")
        return True

    def _go_offline(self, why: str) -> None:
        self.offline_since = self._last_step
        log.warning(
            "MLflow server %s stopped answering at step %d (%s): training goes on; metrics are "
            "kept in %s and sent when it answers again", self.uri, self._last_step, why,
            self.spool_dir / SPOOL_FILE,
        )

    def _spool(self) -> Spool:
        if self.spool is None:
            self.spool = Spool(self.spool_dir / SPOOL_FILE, self.uri, self.run_id or "")
        return self.spool

    def _back_online(self) -> bool:
        """While offline: if the server answers, send what was kept (True); else False."""
        if not self._answers():
            return False
        sent = 0
        if self.spool is not None and self.spool.path.exists():
            try:
                with self._bounded():
                    sent = send_spool(self.spool.path, self._client, set_status=False)
            except Exception as e:  # it answers TCP but not MLflow yet: keep waiting
                log.debug("MLflow server %s not back yet: %s", self.uri, e)
                return False
            self.spool = None
        self.outages.append((self.offline_since, self._last_step, sent))
        log.info("MLflow server %s answers again: %d metric values kept since step %d were sent",
                 self.uri, sent, self.offline_since)
        self.offline_since = None
        return True

    def _warn(self, what: str, error: BaseException) -> None:
        """Tracking must never stop training: warn the first time, count the rest."""
        self.errors += 1
        message = f"MLflow tracking: {what} failed ({type(error).__name__}: {error})"
        if self._warned:
            log.debug(message)
            return
        self._warned = True
        log.warning(
            "%s; training goes on, further tracking errors are logged at debug level", message
        )


def _is_transient_http(error: BaseException) -> bool:
    """A timeout, a refused or reset connection, a 5xx: the same call may work later."""
    text = str(error)
    return any(m in text for m in ("timed out", "Max retries exceeded", "Connection", " 502",
                                   " 503", " 504", "database is locked"))


def _is_logged_param(key: str) -> bool:
    parts = key.split(".")
    return parts[0] not in UNLOGGED_PARAM_ROOTS and not any(
        p in UNLOGGED_PARAM_KEYS for p in parts
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- sweeps


def find_finished_run(uri: str | None, experiment_name: str, config_hash: str) -> Any | None:
    """The newest FINISHED run of the experiment tagged with this config hash, else None.
    Reads only: a missing sqlite store or experiment is not created."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = _retrying(client.get_experiment_by_name, experiment_name)
    if experiment is None:
        return None
    runs = _retrying(
        client.search_runs,
        [experiment.experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def finished_run_metrics(uri: str | None, run_id: str) -> dict[str, float] | None:
    """What the trainer returned for a run whose status is FINISHED: its best/<metric> values
    (prefix dropped) and any quantized val_q<bits>/ ones; None for a run that did not finish or
    a store that does not hold it. Reads only."""
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return None
    from mlflow import MlflowClient

    try:
        run = _retrying(MlflowClient(tracking_uri=uri).get_run, run_id)
    except Exception:  # noqa: BLE001 - an unknown run id is "not finished" here
        return None
    if run.info.status != "FINISHED":
        return None
    metrics = run.data.metrics
    found = {k[len("best/"):]: v for k, v in metrics.items() if k.startswith("best/")}
    found.update({k: v for k, v in metrics.items() if re.match(r"val_q\d+/", k)})
    return found


def sweep_children(client: Any, parent_run_id: str) -> list:
    """The runs tagged with `parent_run_id` as their parent, oldest first."""
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
        max_results=50000,
        order_by=["attributes.start_time ASC"],
    )


def run_value(run: Any, key: str) -> str | None:
    """A run's value for a config key: its param, else a tag, else its Hydra choice tag."""
    for source, name in (
        (run.data.params, key),
        (run.data.tags, key),
        (run.data.tags, CHOICE_TAG_PREFIX + key),
    ):
        if name in source:
            return source[name]
    return None


def swept_keys(runs: Sequence, candidates: Sequence[str] = ()) -> list[str]:
    """Which keys a sweep varied: the candidates (the sweep's overrides) that take several
    values across runs (all found candidates for a one-job sweep); without candidates, every
    param that differs between runs, bar output paths."""
    found = [k for k in candidates if any(run_value(r, k) is not None for r in runs)]
    varying = [k for k in found if len({run_value(r, k) for r in runs}) > 1]
    if found:
        return varying or found
    names = sorted({k for r in runs for k in r.data.params})
    return [
        k
        for k in names
        if len({r.data.params.get(k) for r in runs}) > 1 and "dir" not in k and "path" not in k
    ]


def metric_mode(metric: str, mode: str | None = None) -> str:
    """'max' or 'min': an explicit mode ('max'/'min'/'maximize'/'minimize') wins; else losses,
    perplexities and errors are minimized and everything else maximized."""
    if mode:
        mode = str(mode).lower()
        if mode not in ("max", "min", "maximize", "minimize"):
            raise ValueError(f"optimized metric mode must be 'max' or 'min', got {mode!r}")
        return mode[:3]
    lowered = metric.lower()
    return "min" if any(w in lowered for w in ("loss", "perplexity", "error")) else "max"


def sweep_table(runs: Sequence, metric: str, keys: Sequence[str], mode: str = "max") -> list[dict]:
    """One row per run (run_id, name, status, metric, each key): finished runs best first,
    then unfinished (failed, running) ones, runs without a finite metric value last in each.
    A run's `best/<metric>` (what train.py returned, when the trainer logs it) wins over the
    metric's last logged value."""
    rows = []
    for run in runs:
        value = run.data.metrics.get(f"best/{metric}", run.data.metrics.get(metric))
        row = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            metric: value,
        }
        row.update({k: run_value(run, k) for k in keys})
        rows.append(row)

    def order(row: dict) -> tuple:
        value, unfinished = row[metric], row["status"] != "FINISHED"
        if value is None or not math.isfinite(value):
            return (unfinished, 1, 0.0)
        return (unfinished, 0, -value if mode == "max" else value)

    return sorted(rows, key=order)


def find_sweep_parent(client, sweep: str, experiment_ids: list[str] | None = None):
    """The parent run of a sweep: `sweep` is its run id, or "latest" (newest in the store)."""
    if sweep != "latest":
        return client.get_run(sweep)
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not parents:
        raise SystemExit("no sweep (multirun) parent run in this store")
    return parents[0]
