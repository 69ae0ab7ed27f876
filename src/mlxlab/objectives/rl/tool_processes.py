"""Where tool calls run: up to `size` worker processes (objectives/rl/tool_worker.py), one call at a
time each, side by side, a call that runs past its timeout ended by killing its worker.

A worker is a fresh interpreter (not a fork of the trainer: MLX runs threads by then), in a
session and process group of its own, started the first time a call finds no idle worker and
kept for the next calls. A call gets an idle worker, sends (name, arguments), and waits
`timeout_s` for the answer; past it the worker's whole process group gets SIGKILL (the tool and
any process it started that stayed in the group), so a hung or spinning tool costs one timeout
and nothing after it; the next call starts a fresh worker. A worker that dies in a call (the
tool called os._exit, segfaulted, or was killed by a limit) answers that call as raised.
Starting a worker (its imports) is not counted against a call's timeout.

What a worker inherits: the trainer's environment variables, user, working folder, open
stdout/stderr and sys.path; not its memory, threads or GPU/MLX state. A tool can still do what
that user can (read and write their files, use the network, start processes that leave the
group, use memory and CPU until its timeout): tools are trusted code, and code the model writes
belongs in objectives/rl/sandbox.py's `run_python`, not in a tool's own process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

START_WAIT_S = 300.0  # a worker's imports (a tool's module may import torch): generous


class _Worker:
    """One worker process and this end of its connection."""

    def __init__(self, tools: Mapping[str, tuple[str, dict]]) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "MLXLAB_BLAS": "off"}  # it multiplies no matrices (runtime/compute/blas.py)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlxlab.objectives.rl.tool_worker", str(theirs.fileno()),
             str(os.getpid())], pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(dict(tools))
        said = self.conn.recv() if self.conn.poll(START_WAIT_S) else ("failed", "no answer "
                                                                      f"in {START_WAIT_S:.0f} s")
        if said[0] != "ready":
            self.kill()
            raise RuntimeError(f"the tool worker did not start: {said[1]}")

    def ask(self, name: str, arguments: Mapping[str, Any], max_chars: int | None,
            timeout_s: float | None) -> tuple | None:
        """The worker's answer (tool_worker.answer), None past `timeout_s`; a worker that died
        answers ("raised", how it ended)."""
        try:
            self.conn.send((name, dict(arguments), max_chars))
            if not self.conn.poll(timeout_s):
                return None
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.process.wait()
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            return ("raised", f"the tool's process ended ({how}) before it answered")

    def kill(self) -> None:
        """SIGKILL to the worker's process group, then reaped."""
        with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


class ToolProcesses:
    """The run's tool workers (module docstring): `call` is safe from several threads at once;
    at most `size` calls run at a time, the others wait for a worker."""

    def __init__(self, tools: Mapping[str, tuple[str, dict]], size: int,
                 timeout_s: float | None, max_chars: int | None) -> None:
        self.tools, self.size = dict(tools), int(size)
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(self.size)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        # workers end with this object or, at the latest, when the process exits
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def call(self, name: str, arguments: Mapping[str, Any]) -> tuple | None:
        """The answer of `name(**arguments)` in a worker (tool_worker.answer), None when it ran
        past the timeout (its worker killed)."""
        with self._slots:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                try:
                    worker = _Worker(self.tools)
                except RuntimeError as e:
                    return ("raised", str(e))
                with self._lock:
                    self._workers.append(worker)
            outcome = worker.ask(name, arguments, self.max_chars, self.timeout_s)
            if outcome is None or worker.process.poll() is not None:
                with self._lock:
                    self._workers.remove(worker)
                worker.kill()
            else:
                self._idle.put(worker)
            return outcome

    def pids(self) -> list[int]:
        """The live workers' process ids."""
        with self._lock:
            return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Kill every worker (a call in flight answers as raised)."""
        self._finalizer()
