"""A cross-process file lock: what processes started at the same moment take before creating a
shared thing that is not safe to create twice at once (a fresh sqlite MLflow store's schema,
Optuna's tables and a study, a sweep's parent run).

`fcntl.flock` on a lock file beside the thing: the kernel releases it when its holder dies
(even SIGKILLed), so a crash never leaves a lock behind that blocks the next start. A lock held
for longer than `timeout_s` (a holder stuck on a hung network filesystem) fails with one line
naming the file, not an endless wait. POSIX only (the platforms MLX runs on)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mlxlab.errors import UserError

DEFAULT_TIMEOUT_S = 120.0
POLL_S = 0.05


class LockTimeout(UserError):
    """Another process held the lock for longer than the timeout."""


@contextlib.contextmanager
def file_lock(
    path: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S, what: str = "a shared store"
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, with its folder, when missing) for the block.
    Waits up to `timeout_s` for another holder; `what` names what it guards in the error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{what}: another process has held {path} for over {timeout_s:.0f} s (a "
                    "start stuck on a slow or hung filesystem?): stop it, or remove the lock file "
                    "if no mlxlab process is running"
                ) from None
            time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FolderBusy(UserError):
    """Another process holds the folder's lock (a run training in it)."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself (no file is added to it) for the block, without
    waiting: another holder is FolderBusy(`busy`). The kernel drops it when the holder dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusy(busy) from None
        yield
    finally:
        os.close(fd)


def check_folder_free(folder: str | Path, busy: str) -> None:
    """FolderBusy(`busy`) when another process holds `folder`'s lock now (a missing folder is
    free): asked before anything is written into it."""
    if Path(folder).is_dir():
        with folder_lock(folder, busy):
            pass


def run_folder_busy(run_dir: str | Path) -> str:
    """The line for a run folder another process trains in."""
    return (f"another process is training in {run_dir}: wait for it to end, or give this run a "
            "folder of its own (hydra.run.dir=)")
