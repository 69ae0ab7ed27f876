"""A tracker that lives in a child process (`tracking.background=true`, the MLflow default).

Why: `import mlflow` and its sqlite store cost ~4 s of CPU on a 2-core box, ~10 % of
the default experiment; in-process that time is spent before the first step, and the metric and
checkpoint flushes hold the GIL the training loop needs. In a child process the import runs on
the other core while this process composes, builds and compiles; the training loop then hands
it small messages and never waits, except where the order of events matters:

  flush, rewind, continue_from, end   wait for the child (end returns once the run is closed)
  flush_barrier                       sent; the checkpoint writer's thread waits for its reply
                                      before it commits, so a checkpoint is committed only after
                                      the metrics it covers reached the store, and the training
                                      thread never waits on the store's writes
  start, log_metrics, set_tags, log_artifact, log_text, log_dict, set_dataset
                                      sent, not waited for; processed in order (run_id, read
                                      after start, waits for the start's reply)

`probe` and the settings (uri, experiment_name, ...) are answered by a copy of the tracker built
here, which never starts a run. What the child learns (run_id, experiment_id, offline_report)
comes back with its replies. Its log records are re-emitted here (the run's log file keeps
them); an exception it raises is raised here by the first call that finds its reply, at the
latest the next call that waits. The child ignores
SIGINT/SIGTERM (the trainer stops gracefully and ends the run itself). If this process dies
without `end` (SIGKILL, OOM), the child sees the pipe close and exits at once, writing nothing
more, as an in-process tracker dies with its process: what reached the store is what the last
flush (before each checkpoint) and the background flushes sent; the run stays RUNNING until
`resume=auto` continues it or the next run marks it (tracking/mlflow/stale.py). Writing on would race
the resumed run, which rewinds the steps after its checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from mlxlab.tracking.base import BaseTracker, Tracker

log = logging.getLogger(__name__)

WAITED = ("flush", "rewind", "continue_from", "end")
SENT = ("log_metrics", "set_tags", "log_artifact", "log_text", "log_dict", "log_figure",
        "set_dataset")
LEARNED = ("run_id", "experiment_id", "offline_report", "errors")  # read from the child
FUNCTION = "__function__"  # a submit()ted call
END_WAIT_S = 600  # a child still closing after this is abandoned (the run stays as it is)


class TrackerProcess(BaseTracker):
    """`local` (built here from `node`) answers settings, probe and summary (holding what the
    child learned); a twin built from `node` in a child process does the tracking."""

    def __init__(self, node: dict[str, Any], local: Tracker) -> None:
        self.local = local
        self._sent = self._received = 0  # calls sent, replies read (each call gets one, in order)
        self._reading = threading.Lock()  # a checkpoint writer's flush_barrier reads replies too
        self._gone = False  # the child exited: no reply will come
        self._start_pending = False
        self._error: BaseException | None = None
        self._process, self._conn = _WARM.pop() if _WARM else _spawn()
        self._conn.send(node)

    def start(self, params: dict, tags: dict, run_id: str | None = None) -> None:
        """Sent, not waited for; the first read of run_id after it waits for the child's reply."""
        self._call("start", (params, tags, run_id), {}, wait=False)
        self._start_pending = True

    @property
    def run_id(self) -> str | None:
        self._drain(block=self._start_pending)  # a run started, its id not known yet: wait
        self._start_pending = False
        return self.local.run_id

    def __getattr__(self, name: str) -> Any:  # its settings, or what the child learned
        if name in LEARNED:
            self._drain(block=False)
        return getattr(self.local, name)

    def probe(self) -> None:
        self.local.probe()

    def summary(self) -> list[str]:
        return self.local.summary()

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Run function(*args) in the child, not waited for (e.g. housekeeping that needs mlflow;
        the function is pickled by name: a module-level function)."""
        self._call(FUNCTION, (function, *args), {}, wait=False)

    def _call(self, method: str, args: tuple, kwargs: dict, wait: bool) -> Any:
        self._raise_pending()
        try:
            self._conn.send((method, args, kwargs))
        except (BrokenPipeError, EOFError, OSError) as e:
            raise RuntimeError(f"the tracking process has exited ({e}); see the log above") from e
        self._sent += 1
        result = self._drain(block=wait)
        self._raise_pending()
        return result

    def flush_barrier(self) -> Callable[[], None]:
        """Sends a flush and returns at once; the returned wait (the checkpoint writer's thread
        calls it) returns when the child answered it: the metrics before it are in the store."""
        self._call("flush", (), {}, wait=False)
        target = self._sent

        def wait() -> None:
            self._read_until(target)
            if self._gone:
                raise RuntimeError("the tracking process exited before the metrics this "
                                   "checkpoint covers reached the store; see the log above")

        return wait

    def _drain(self, block: bool) -> Any:
        """Read the child's replies: all of them when `block`, else those already here. Returns
        the last reply's result."""
        return self._read_until(self._sent, block)

    def _read_until(self, target: int, block: bool = True) -> Any:
        # Not waiting: if a checkpoint writer's barrier is reading (it may wait on a child that
        # is still starting), leave the replies to it rather than wait for the lock it holds.
        if not self._reading.acquire(blocking=block):
            return None
        try:
            return self._read_replies(target, block)
        finally:
            self._reading.release()

    def _read_replies(self, target: int, block: bool) -> Any:
        result = None
        while self._received < target and (block or self._conn.poll()):
            try:
                result, error, learned, records = self._conn.recv()
            except (EOFError, OSError) as e:
                self._received, self._gone = self._sent, True  # nothing more will come
                self._error = self._error or RuntimeError(
                    f"the tracking process has exited ({e})")
                return None
            self._received += 1
            for name, value in learned.items():
                setattr(self.local, name, value)
            for record in records:
                logging.getLogger(record.name).handle(record)
            if error is not None and self._error is None:
                self._error = error
        return result

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def end(self, status: str = "FINISHED") -> None:
        if self._conn.closed:  # ended already
            return
        try:
            self._call("end", (status,), {}, wait=True)
        finally:
            self._conn.close()
            try:
                self._process.wait(END_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("the tracking process is still closing the run after %d s; left to it",
                            END_WAIT_S)


def _spawn() -> tuple[subprocess.Popen, Connection]:
    """The tracking process and this end of its connection. A fresh interpreter (not fork:
    unsafe once MLX runs threads; not multiprocessing's spawn: it re-imports the caller's
    __main__, which a script without a main guard can't take), in its own session (a terminal's
    Ctrl-C goes to the trainer, which ends the run).

    A session of its own is also, on Linux with CONFIG_SCHED_AUTOGROUP (most distributions),
    a scheduler group of its own, which gets an equal share of the CPU whatever the child's
    niceness: its start-up (~1.7 s of CPU past the trainer's own) runs beside the first steps.
    In a process group of the trainer's session instead, where the niceness counts, the child's
    start-up waits for idle CPU, the first checkpoint's flush barrier waits on it, and the third
    checkpoint waits on that write: the same cost, paid later and logged."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # MLflow 3 sends usage telemetry over the network unless told not to; a training run makes no
    # network calls the user did not ask for. MLFLOW_DISABLE_TELEMETRY=false set by the user wins.
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # It multiplies no matrices: loading OpenBLAS (and its threads) would cost ~0.2 s of CPU
    # beside the first training steps (runtime/compute/blas.py).
    env["MLXLAB_BLAS"] = "off"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlxlab.tracking.mlflow.background", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
    theirs.close()
    return process, Connection(ours.detach())


# A tracking process started ahead of its tracker (prestart), taken by the first TrackerProcess.
_WARM: list[tuple[subprocess.Popen, Connection]] = []


def prestart() -> None:
    """Start the tracking process now, before the config is composed: its imports (mlflow,
    sqlalchemy: ~2 s of CPU) then run while this process is still single-threaded, not beside
    the first training steps. The first TrackerProcess takes it; one never taken sees this
    process exit and exits too."""
    if not _WARM:
        _WARM.append(_spawn())


def _method(name: str, wait: bool):
    def call(self: TrackerProcess, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs, wait)

    call.__name__ = name
    call.__doc__ = f"{name} in the tracking process ({'waits for it' if wait else 'not waited for'})."
    return call


for _name in WAITED[:-1]:
    setattr(TrackerProcess, _name, _method(_name, wait=True))
for _name in SENT:
    setattr(TrackerProcess, _name, _method(_name, wait=False))


CHILD_NICENESS = 10  # os.nice increment of the tracking process


class _Records(logging.Handler):
    """Keeps the child's log records to send back with its next reply."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not record.name.startswith("mlxlab"):
            return  # mlflow's and alembic's chatter, as in-process (their loggers stay quiet)
        record.msg, record.args, record.exc_info = record.getMessage(), None, None  # picklable
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        taken, self.records = self.records, []
        return taken


def serve(conn: Connection) -> None:
    """The child: build the tracker from the first message (its config node), then run each
    call as it comes, in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Below the training's priority: on a machine whose cores the step's threads fill, the
    # tracker's work (mlflow's import, the store's writes) waits for a free moment instead of
    # slowing steps; a waited call (flush, end) leaves the training idle, so it runs at once.
    # (Where the scheduler compares the two: not across Linux autogroups, see _spawn.)
    with contextlib.suppress(OSError, AttributeError):  # no os.nice on Windows
        os.nice(CHILD_NICENESS)
    # The imports leave ~430,000 objects for the cyclic collector, hardly any of them garbage:
    # without its passes over them they take ~10 % less CPU (2.35 -> 2.1 s here), CPU that the
    # first training steps share. Frozen afterwards, later collections skip them too.
    gc.disable()
    with contextlib.suppress(ImportError):  # first: a prestarted process has time for it now
        import mlflow  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        import mlxlab.tracking.mlflow  # noqa: F401
    gc.freeze()
    gc.enable()
    try:
        node = conn.recv()
    except (EOFError, OSError):  # prestarted, never used: the training process is gone
        os._exit(0)
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.INFO)
    tracker = build(node)

    ended = False
    while not ended:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the training process is gone without end()
            os._exit(0)  # now, threads and all: see the module docstring
        result = error = None
        try:
            if method == FUNCTION:
                result = args[0](*args[1:])
            else:
                result = getattr(tracker, method)(*args, **kwargs)
        except Exception as e:  # raised in the parent at its next waiting call
            error = e
        ended = method == "end"
        learned = {name: getattr(tracker, name, None) for name in LEARNED}
        try:
            conn.send((result, error, learned, records.take()))
        except (BrokenPipeError, OSError):
            os._exit(0)
    # The run is closed and its reply sent: leave without the interpreter's teardown (mlflow's
    # atexit hooks, ~0.8 s the training process would otherwise wait out before it exits).
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(0)


def build(node: dict[str, Any]) -> Tracker:
    """The tracker `node` names: its `_target_` called with its other keys. The node is flat
    (fanout.build_tracker makes it), so Hydra's instantiate is not needed, nor hydra's and
    omegaconf's imports (~0.3 s of CPU this process would spend beside the first steps)."""
    module, _, name = node["_target_"].rpartition(".")
    kwargs = {key: value for key, value in node.items() if key != "_target_"}
    return getattr(importlib.import_module(module), name)(**kwargs)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))


def tracks_in_a_child(argv: list[str]) -> bool:
    """Whether this command line will track with MLflow in a child process (the default:
    tracking=mlflow, tracking.background=true) from this process: one run, this rank the
    first. A wrong guess costs only an idle child that exits with this process."""
    from mlxlab.runtime.cluster import distributed

    if any(a in ("-m", "--multirun", "--help", "-h", "--cfg", "-c", "--info") or
           a.startswith(("--cfg=", "--info=", "hydra/launcher=")) for a in argv):
        return False
    if distributed.launched_rank() not in (None, 0):
        return False
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "tracking" and "mlflow" not in value:
            return False
        if key == "tracking.background" and value.lower() in ("false", "0", "no", "off"):
            return False
    return True
