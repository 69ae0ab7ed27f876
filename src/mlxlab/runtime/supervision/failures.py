"""Device failures that must end a run: out of memory, and a GPU's errors after it.

MLX on CUDA raises a RuntimeError when the GPU runs out of memory, and may then crash or hang
while it tears down (its buffers' destructors raise again: ml-explore/mlx#2821), so a run that
only re-raised could sit there for hours. MLX's CPU backend does not raise at all: a failed
allocation is a segmentation fault in its stream thread (measured with MLX 0.32.4: 4 TiB asked
for, or any allocation under `ulimit -v`): that process ends at once, non-zero, and its
committed checkpoints are intact because they are written to a temporary folder and renamed.

What this module does for the raising kind:
- `device_failure(exc, ...)` recognizes MLX's messages and turns the error into a
  `DeviceFailure` (a UserError: one `mlxlab: error:` line, exit 2, a NaN trial in a sweep) that
  says what to change and names the last committed checkpoint, and arms a watchdog: if the
  cleanup after it (the last checkpoint write, the tracker's end) is not done within
  `CLEANUP_S`, the process prints the line and exits anyway;
- under mlxlab-train's supervising parent (runtime/supervision/supervise.py) an out of memory is not the
  end: it is recorded for the parent and the process exits at once with `supervise.OOM_EXIT`,
  as the CPU backend's crash would end it; the parent restarts the run at half the
  micro-batch from its last committed checkpoint;
- `leave(code)`: train.py's exit; after a device failure it is `os._exit` once the line is out,
  so MLX's teardown is never run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlxlab.errors import UserError
from mlxlab.runtime.supervision import supervise

# Lower-cased pieces of the messages MLX's allocators and CUDA raise on exhausted memory
# (mlx/allocator.cpp "[malloc] Unable to allocate N bytes."; Metal "[metal::malloc] Attempting to
# allocate ..."; CUDA "cudaMallocAsync(...) failed: out of memory", cudaMallocManaged).
OUT_OF_MEMORY = ("unable to allocate", "[metal::malloc]", "out of memory", "cudamalloc",
                 "cuda_error_out_of_memory", "cudaerrormemoryallocation")
# What a CUDA context says once an out-of-memory has broken it (mlx#2821): sticky errors that
# every later call repeats.
BROKEN_DEVICE = ("illegal memory access", "cuda error", "cudaerror", "cublas_status_alloc_failed")
CLEANUP_S = 10.0  # the cleanup after a device failure gets this long, then the process ends
EXIT_CODE = 2  # a UserError's: the config does not fit this device

log = logging.getLogger(__name__)


class DeviceFailure(UserError, RuntimeError):
    """The device ran out of memory (or failed after it): the run ends with one line."""


def kind_of(exc: BaseException) -> str | None:
    """"out of memory", "device error" or None (not a device failure) for MLX's error."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, UserError):
        return None
    text = str(exc).lower()
    if any(marker in text for marker in OUT_OF_MEMORY):
        return "out of memory"
    if any(marker in text for marker in BROKEN_DEVICE):
        return "device error"
    return None


class _Watchdog:
    """Ends the process `seconds` after `arm` unless `disarm` came first."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.line = ""
        self.failed = False  # a device failure happened in this process
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, line: str, seconds: float) -> None:
        with self._lock:
            self.line, self.deadline, self.failed = line, time.monotonic() + seconds, True
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="mlxlab-failure-watchdog")
                self._thread.start()

    def disarm(self) -> None:
        with self._lock:
            self.deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                due = self.deadline is not None and time.monotonic() > self.deadline
                line = self.line
            if due:
                end_process(line, EXIT_CODE)


_watchdog = _Watchdog()


def device_failure(exc: BaseException, step: int, last_checkpoint: Callable[[], Path | None],
                   cleanup_s: float = CLEANUP_S) -> DeviceFailure | None:
    """The DeviceFailure for MLX's error `exc` at `step` (None: not one). The watchdog is armed
    first, so that neither `last_checkpoint` (which may wait for a checkpoint being written)
    nor the cleanup after it can keep the process alive."""
    kind = kind_of(exc)
    if kind is None:
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    fix = ("lower trainer.batch_size (trainer.grad_accum keeps the effective batch), set "
           "trainer.micro_batch=auto, or use a smaller model" if kind == "out of memory" else
           "the GPU's state is lost after such an error; start a new process")
    what = "out of memory" if kind == "out of memory" else "into an error"
    if kind == "out of memory" and supervise.report_oom(step, first):
        end_process(f"mlxlab: the device ran out of memory at step {step + 1} ({first}): "
                    "restarting at half the micro-batch", supervise.OOM_EXIT)

    def message(checkpoint: str) -> str:
        return (f"the device ran {what} at step {step} ({first}): {fix}; committed checkpoints "
                f"are intact (last: {checkpoint}; resume with resume=auto)")

    _watchdog.arm(f"mlxlab: error: {message('see the run folder')}", cleanup_s)
    failure = DeviceFailure(message(str(last_checkpoint() or "none")))
    _watchdog.arm(f"mlxlab: error: {failure}", cleanup_s)
    return failure


def cleanup_done() -> None:
    """The run's cleanup after a device failure finished: the watchdog stands down (a sweep's
    next trial may start)."""
    _watchdog.disarm()


def end_process(line: str | None, code: int) -> None:
    """Print `line`, flush what can be flushed, and exit without running any teardown."""
    try:
        if line:
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        logging.shutdown()
    finally:
        os._exit(code)


def leave(code: int, line: str | None = None) -> None:
    """Print `line` and exit with `code` (train.py's funnel). After a device failure in this
    process the exit skips the interpreter's and MLX's teardown, where MLX on CUDA can crash or
    hang (mlx#2821)."""
    _watchdog.disarm()
    if _watchdog.failed:
        end_process(line, code)
    if line:
        print(line, file=sys.stderr)
    sys.exit(code)
