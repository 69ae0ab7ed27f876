"""MlflowTracker: the Tracker protocol (tracking/base.py) on the central MLflow store.

MlflowClient (not the fluent `mlflow.start_run` API, whose active run is process-global) so
several trackers can coexist. Metrics are buffered and sent by a thread; a server that stops
answering mid-run never stops training (tracking/mlflow/offline.py keeps what it did not take).
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError, UserError
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import BaseTracker, flatten_config
from mlxlab.tracking.mlflow.calls import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    chunks,
    is_transient_http,
    retrying,
)
from mlxlab.tracking.mlflow.heartbeat import Heartbeat, heartbeat_tags
from mlxlab.tracking.mlflow.offline import SPOOL_FILE, Spool, reachable, send_spool, spool_of
from mlxlab.tracking.mlflow.rewind import drop_metrics_after
from mlxlab.tracking.mlflow.server import TrackingUnavailable, bounded_http, probe_store
from mlxlab.tracking.mlflow.stale import LIVENESS_TAGS, clear_killed, mark_dead_runs_quietly
from mlxlab.tracking.mlflow.store import ensure_store, resolve_uri, sqlite_path
from mlxlab.tracking.run_info import record_job_run

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
# Config parts that say where things go, not what is trained: kept out of a run's params.
UNLOGGED_PARAM_ROOTS = ("paths", "tracking", "hydra")
UNLOGGED_PARAM_KEYS = ("_target_", "_convert_", "_partial_", "_recursive_")


class MlflowTracker(BaseTracker):
    """The Tracker of docs/architecture.md on MLflow; logging errors warn once, never raise.

    log_metrics only appends to a buffer; a background thread sends it with log_batch every
    `flush_every_steps` calls or `flush_every_seconds`, so the training step never waits on
    the store. `end()` flushes and sets the run's status.

    A tracking server that stops answering mid-run never stops training: each call to it fails
    after one try of `connect_timeout` seconds, metrics then go to `<run dir>/mlflow_offline.jsonl`
    and are sent when the server answers again; `offline_report` says which happened.

    In a multirun job (tracking/fanout.py's build_tracker fills these in from the sweep folder):
    `parent_run_id` is the sweep's parent run, tagged on this run as its parent; the run's id is
    added to `sweep_job_dir`'s run list, where the sweep callback reads which run the job made.
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
        parent_run_id: str | None = None,
        sweep_job_dir: str | None = None,
        heartbeat_every_seconds: float = 30.0,
    ) -> None:
        for key, value in (("connect_timeout", connect_timeout),
                           ("request_timeout", request_timeout),
                           ("flush_every_seconds", flush_every_seconds),
                           ("heartbeat_every_seconds", heartbeat_every_seconds)):
            check_number(f"tracking.{key}", value, float)
            if value <= 0:
                raise ConfigError(f"tracking.{key} must be > 0 seconds, got {value}")
        check_number("tracking.flush_every_steps", flush_every_steps, int, 1)
        self.uri = resolve_uri(uri)
        self.experiment_name = str(experiment_name)
        self.run_name = run_name
        self.artifact_root = artifact_root
        self.flush_every_steps = int(flush_every_steps)
        self.flush_every_seconds = float(flush_every_seconds)
        self.async_logging = async_logging
        self.connect_timeout = float(connect_timeout)
        self.request_timeout = float(request_timeout)
        self.parent_run_id = parent_run_id
        self.sweep_job_dir = sweep_job_dir
        self.heartbeat_every_seconds = float(heartbeat_every_seconds)
        self._heartbeat: Heartbeat | None = None
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
        self._unsent_spool: Path | None = None  # a resumed run's earlier offline file

    # -- lifecycle

    def probe(self) -> None:
        """Fail fast (TrackingUnavailable) unless the store answers within connect_timeout."""
        probe_store(self.uri, self.connect_timeout, self.request_timeout)

    def set_dataset(self, name: str, source: str, digest: str, rows: int | None) -> None:
        """The training data, logged as the run's MLflow dataset input when it starts."""
        self.dataset = {"name": name, "source": source, "digest": digest, "rows": rows}

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        """Start a run, or resume `run_id` (metrics append to it); logs params and tags. A run
        that cannot be started raises TrackingUnavailable (one line): never trained untracked."""
        if tags.get(T.RUN_DIR):
            self.spool_dir = Path(str(tags[T.RUN_DIR]))
        try:
            with self._bounded():
                self._start(params, tags, run_id)
        except Exception as e:  # a run asked to be tracked is tracked or fails
            self.run_id, self._active = None, False
            if isinstance(e, UserError):
                raise
            text = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrackingUnavailable(
                f"MLflow store {self.uri} could not start the run ({type(e).__name__}: {text}): "
                "fix tracking.uri, or train untracked with tracking=none") from None

    def _start(self, params: dict, tags: dict, run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        self.experiment_id = ensure_store(self.uri, self.experiment_name, self.artifact_root)
        self._client = client = MlflowClient(tracking_uri=self.uri)
        tags = {str(k): str(v) for k, v in tags.items()}
        tags.update(heartbeat_tags(self.heartbeat_every_seconds))
        # earlier runs of this task whose process died without ending them
        mark_dead_runs_quietly(self.uri, self.experiment_name, tags.get(T.TASK_NAME))
        if self.parent_run_id:  # a sweep's job (a distillation round keeps its own parent)
            tags.setdefault(T.PARENT_RUN, self.parent_run_id)
            tags.setdefault(T.SWEEP_ID, self.parent_run_id)

        logged_params: dict[str, str] = {}
        if run_id is not None:
            try:
                run = retrying(client.get_run, run_id)
            except Exception as e:
                log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, e)
                run_id = None
        if run_id is not None:
            # this process's liveness tags before RUNNING: a sibling job starting now (a joblib
            # worker's) would judge the run by its killed process's pid and mark it KILLED again
            alive = [RunTag(k, tags[k]) for k in LIVENESS_TAGS if k in tags]
            retrying(client.log_batch, run_id, tags=alive)
            retrying(client.update_run, run_id, status="RUNNING")
            clear_killed(client, run)
            logged_params = run.data.params
            # what the interrupted process kept while the server was away: sent at rewind (up to
            # the checkpoint it resumes from), else at the end
            self._unsent_spool = spool_of(run)
        else:
            # The Source the training process named (tracking/source.py): this process may be
            # the tracking child, whose own argv[0] is background.py.
            source = tags.get(T.SOURCE_NAME) or Path(sys.argv[0]).name
            # with its liveness tags from the first moment: a kill before the rest are logged
            # leaves a run the next check can judge, not one RUNNING for ever
            run_tags = {
                "mlflow.user": _user(),
                T.SOURCE_NAME: source,
                **{k: tags[k] for k in LIVENESS_TAGS if k in tags},
            }
            run = retrying(
                client.create_run, self.experiment_id, tags=run_tags, run_name=self.run_name
            )
            run_id = run.info.run_id
        self.run_id, self._active = run_id, True
        if self.sweep_job_dir:
            record_job_run(self.sweep_job_dir, run_id)
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
        self._heartbeat = Heartbeat(client, run_id, self.heartbeat_every_seconds)
        self._heartbeat.start()
        atexit.register(self._end_at_exit)

    def _log_params(self, params: dict, logged_params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        flat = {k: v for k, v in flatten_config(params).items() if _is_logged_param(k)}
        changed = sorted(k for k, v in flat.items() if logged_params.get(k, v) != v)
        if changed:  # MLflow params are write-once; the new values live in the checkpoint
            log.warning("resumed run %s keeps its logged values for %s", self.run_id, changed)
        new = [Param(k, v) for k, v in flat.items() if k not in logged_params]
        for chunk in chunks(new, MAX_PARAMS_PER_BATCH):
            retrying(self._client.log_batch, self.run_id, params=chunk)

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
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
        self.flush()
        self._send_earlier_spool(None)  # resumed without a rewind
        if self.offline_since is None:
            with self._bounded():
                self._safely("end", retrying, self._client.set_terminated, self.run_id, status)
        if self.offline_since is not None:  # still away (or it went away just now)
            spool = self._spool()
            spool.write_status(status)
            self.offline_report = (
                f"MLflow server {self.uri} has not answered since step {self.offline_since}: "
                f"{spool.metrics} metric values and the final status {status} are in {spool.path}; "
                f"send them when it is back: python -m mlxlab.tracking.mlflow.offline {spool.path}"
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
                        retrying(self._client.log_batch, self.run_id,
                                  metrics=[Metric(*row) for row in chunk])
                except Exception as e:
                    if self._server_lost(e):
                        self._spool().write(pending[i:])
                    elif self.remote and is_transient_http(e):  # slow or busy: next flush
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
        self._send_earlier_spool(step)
        if sqlite_path(self.uri) is None:
            log.warning("MLflow run %s: values logged after step %d before the interruption "
                        "cannot be removed from %s; replayed steps may appear twice",
                        self.run_id, step, self.uri)
            return
        with self._flush_lock:
            dropped = self._safely(
                "rewind", retrying, drop_metrics_after, self.uri, self.run_id, step
            )
        if dropped:
            log.info("MLflow run %s: dropped %d values logged after step %d by the interrupted "
                     "run; they are logged again as the steps are replayed",
                     self.run_id, dropped, step)

    def _send_earlier_spool(self, upto: int | None) -> None:
        """A resumed run's values kept offline by its interrupted process, sent once (steps up
        to `upto`, the checkpoint's: the later ones are trained and logged again)."""
        path, self._unsent_spool = self._unsent_spool, None
        if path is None:
            return
        with self._flush_lock, self._bounded():
            sent = self._safely("send offline metrics", send_spool, path, self._client,
                                set_status=False, upto=upto)
        if sent:
            log.info("MLflow run %s: %d metric values its interrupted process kept while the "
                     "server was away were sent from %s", self.run_id, sent, path)

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
        for chunk in chunks(entities, MAX_TAGS_PER_BATCH):
            retrying(self._client.log_batch, self.run_id, tags=chunk)

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

