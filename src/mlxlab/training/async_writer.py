"""Checkpoints written off the training thread.

The step only takes a `Snapshot` (references to the already-evaluated parameter and optimizer
arrays, which MLX never changes in place while a reference is held) and hands it to one writer
thread, which runs the same `CheckpointManager.write` as a synchronous save: temp directory,
checksums, COMMITTED marker last, rename, best/, rotation. So a SIGKILL at any moment leaves
exactly what a killed synchronous save leaves, and resume picks the newest committed one.

At most one save is in flight. A save that comes due while the previous one is still being
written waits for it (`when_busy=wait`, the default) or is skipped (`when_busy=skip`); either is
logged. Saves that must not be lost (the final one, the one on SIGTERM) always wait. A write that
failed (full disk) raises on the training thread at the next save or at `wait()`, so a run still
fails the way a synchronous save made it fail.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import mlx.nn as nn
import mlx.optimizers as optim

from mlxlab.checkpoint import CHECKPOINTS_DIR, CheckpointManager, Snapshot, step_name
from mlxlab.checkpoint.state import StateLike, state_step
from mlxlab.config import check_choice
from mlxlab.tracking import tags as T
from mlxlab.training.settings import WHEN_BUSY

log = logging.getLogger(__name__)


class Uploader(Protocol):
    """What the writer tells after each commit (checkpoint/remote.py's RemoteUploader)."""

    store: Any  # the RemoteStore it uploads to (its `uri`, `url(...)`)
    uploaded: dict[str, str]  # checkpoint name -> its remote URI

    def notify(self, path: Path) -> None: ...

    def close(self) -> list[str]: ...


def upload_tags(uploader: Uploader) -> dict[str, str]:
    """MLflow tags: the prefix and the remote URI of every uploaded checkpoint."""
    uris = [uri for _, uri in sorted(uploader.uploaded.items()) if uri]
    text = "\n".join(uris)
    return {
        T.REMOTE_URI: uploader.store.uri,
        T.REMOTE_CHECKPOINTS: text if len(text) < 5000 else (
            f"{len(uris)} checkpoints under {uploader.store.url(CHECKPOINTS_DIR)}"),
    }


class CheckpointWriter:
    """Save checkpoints through `manager`, in a background thread when `asynchronous`."""

    def __init__(
        self,
        manager: CheckpointManager,
        asynchronous: bool = True,
        when_busy: str = "wait",
        uploader: Uploader | None = None,
    ) -> None:
        check_choice("checkpoint.when_busy", when_busy, WHEN_BUSY)
        self.manager = manager
        self.asynchronous = asynchronous
        self.when_busy = when_busy
        self.uploader = uploader
        self.stalls: list[float] = []  # seconds the training thread spent in each save
        self._thread: threading.Thread | None = None
        self._writing_step: int | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None,
        state: StateLike,
        metric: float | None = None,
        force: bool = False,
        before_write: Callable[[], dict | None] | None = None,
        best: bool | None = None,
        files: dict[str, Path] | None = None,
    ) -> Path | None:
        """Start writing a checkpoint of `state`'s step; its final path, or None if skipped.
        `best`: whether it becomes best/, decided by the trainer (a tie on the monitor broken by
        the loss, checkpoint.choose_best); None lets the manager compare `metric`.

        `force` (final and emergency saves) waits for a busy writer even under when_busy=skip.
        `before_write` runs first, on the writing thread (the tracker's flush barrier); the
        state fields it returns are set in the checkpoint (what was not known at the step).
        `files`: arrays written already ({file name: path}; a skipped save removes them).
        """
        start = time.perf_counter()
        if self.busy:
            if self.when_busy == "skip" and not force:
                log.info(
                    "checkpoint at step %s skipped: step %s is still being written "
                    "(checkpoint.when_busy=skip)", state_step(state), self._writing_step,
                )
                for path in (files or {}).values():
                    shutil.rmtree(path.parent, ignore_errors=True)
                return None
            log.info(
                "checkpoint at step %s waits for step %s to finish writing",
                state_step(state), self._writing_step,
            )
        self.wait()
        snap = self.manager.snapshot(model, optimizer, state, metric, best, files)
        final = self.manager.directory / step_name(snap.step)
        if not self.asynchronous:
            self._write(snap, before_write)
            self.stalls.append(time.perf_counter() - start)
            self._raise_error()
            return final
        self._writing_step = snap.step
        # Not a daemon: an interpreter that exits (even on an exception) finishes the write first.
        self._thread = threading.Thread(
            target=self._write, args=(snap, before_write), name=f"checkpoint-{snap.step}"
        )
        self._thread.start()
        self.stalls.append(time.perf_counter() - start)
        return final

    def _write(self, snap: Snapshot, before_write: Callable[[], dict | None] | None = None
               ) -> None:
        try:
            late = before_write() if before_write is not None else None
            if late:
                snap.update_state(**late)
            path = self.manager.write(snap)
        except BaseException as e:  # re-raised on the training thread
            self._error = e
            return
        if self.uploader is not None:
            self.uploader.notify(path)

    def wait(self) -> None:
        """Block until the save in flight is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, tracker: Any = None) -> None:
        """The end of a run, however it ends: wait for the last write (an error is logged, never
        raised over another one), then the last upload round, its report and MLflow tags."""
        try:
            self.wait()
        except BaseException as e:
            log.error("the last checkpoint write failed: %s", e)
        if self.uploader is None:
            return
        for line in self.uploader.close():
            log.info("%s", line)
        if tracker is not None:
            tracker.set_tags(upload_tags(self.uploader))
