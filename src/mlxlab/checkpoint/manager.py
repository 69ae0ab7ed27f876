"""CheckpointManager: when to save, rotation (`keep_last_n` plus `best/`), and resume."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import mlx.nn as nn
import mlx.optimizers as optim

from mlxlab.checkpoint.atomic import (
    Snapshot,
    fsync_path,
    link_files,
    swap_into_place,
    take_snapshot,
    temp_dir,
    write_marker,
    write_snapshot,
)
from mlxlab.checkpoint.discover import (
    check_committed,
    committed_step_dirs,
    resume_candidates,
    step_dirs,
)
from mlxlab.checkpoint.layout import BEST, MARKER, OLD_PREFIX, TMP_PREFIX
from mlxlab.checkpoint.restore import Checkpoints, LoadReport
from mlxlab.checkpoint.state import StateLike, is_better, metric_of, with_metric


class CheckpointManager:
    """When to save, rotation (`keep_last_n` plus `best/`), and resume with fallback."""

    def __init__(
        self,
        directory: Path,
        keep_last_n: int = 3,
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        monitor: str | None = None,
        mode: str = "max",
    ) -> None:
        if keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1, got {keep_last_n}")
        if mode not in ("max", "min"):
            raise ValueError(f"checkpoint mode must be 'max' or 'min', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last_n = keep_last_n
        self.save_every_steps = save_every_steps
        self.save_every_minutes = save_every_minutes
        self.monitor = monitor
        self.mode = mode
        self.last_report: LoadReport | None = None
        self._last_save_time = time.monotonic()
        self._last_save_step: int | None = None
        self._recover()
        self.best_metric = self._read_best_metric()

    def _recover(self) -> None:
        """Undo what a killed process left: temp dirs, and a directory caught mid-swap."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
        for p in self.directory.glob(f"{OLD_PREFIX}*"):
            # `.old-NAME-xxxxxxxx`: the swap was killed between its two renames
            original = self.directory / p.name[len(OLD_PREFIX) :].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, original)

    def _read_best_metric(self) -> float | None:
        best = self.best_path
        return None if best is None else metric_of(best)

    def restore_best(self, value: float | None) -> None:
        """Best metric so far from a resumed trainer state, when best/ did not say."""
        if self.best_metric is None and value is not None:
            self.best_metric = float(value)

    @property
    def best_path(self) -> Path | None:
        best = self.directory / BEST
        return best if check_committed(best, full=False) is None else None

    def should_save(self, step: int) -> bool:
        if step == self._last_save_step:
            return False
        if self.save_every_steps and step > 0 and step % self.save_every_steps == 0:
            return True
        elapsed = time.monotonic() - self._last_save_time
        return bool(self.save_every_minutes) and elapsed >= self.save_every_minutes * 60

    def is_better(self, metric: float) -> bool:
        return is_better(metric, self.best_metric, self.mode)

    @property
    def last_saved_step(self) -> int | None:
        return self._last_save_step

    def adopt_best(self, run_checkpoints: Path) -> None:
        """Resuming into a new run folder: start from the earlier run's best/, so the best
        checkpoint survives even if this run never beats it."""
        source = Path(run_checkpoints) / BEST
        if self.best_path is None and source.is_dir() and check_committed(source, full=False) is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._refresh_best(source)
            self.best_metric = self._read_best_metric()

    def save(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None,
        state: StateLike,
        metric: float | None = None,
    ) -> Path:
        """Write a step checkpoint; refresh best/ when `metric` improves; rotate old ones."""
        return self.write(self.snapshot(model, optimizer, state, metric))

    def save_named(self, name: str, model: nn.Module, state: StateLike) -> Path:
        """A checkpoint of weights and state under its own name (e.g. `quantized`), outside the
        step rotation and resume: replaced whole by the next save of that name."""
        return write_snapshot(self.directory, take_snapshot(model, None, state), name=name)

    def snapshot(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer | None,
        state: StateLike,
        metric: float | None = None,
        best: bool | None = None,
        files: dict[str, Path] | None = None,
    ) -> Snapshot:
        """The in-memory half of `save` (on the training thread); `write` finishes it. `best`:
        the caller's decision whether it becomes best/ (a tie broken by another metric); None
        compares `metric` with the best so far. `files`: arrays written already ({file name:
        path}: a sharded run's, streamed), moved into the checkpoint."""
        if metric is not None:
            state = with_metric(state, self.monitor, self.mode, metric)
        snap = take_snapshot(model, optimizer, state)
        snap.metric = None if metric is None else float(metric)
        snap.best = best
        snap.files = dict(files or {})
        self._last_save_time = time.monotonic()
        self._last_save_step = snap.step
        return snap

    def write(self, snap: Snapshot) -> Path:
        """The disk half of `save`: the checkpoint, best/ and rotation (any one thread)."""
        path = write_snapshot(self.directory, snap)
        better = snap.best if snap.best is not None else (
            snap.metric is not None and self.is_better(snap.metric))
        if better:
            self._refresh_best(path)
            self.best_metric = snap.metric
        self._rotate()
        return path

    def _refresh_best(self, source: Path) -> None:
        """best/ = a hard-linked copy of `source`, swapped in atomically."""
        tmp = temp_dir(self.directory, BEST)
        try:
            tmp.mkdir()
            link_files(source, tmp, skip=(MARKER,))
            fsync_path(tmp)
            write_marker(tmp, source=source.name)
            swap_into_place(tmp, self.directory / BEST)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rotate(self) -> None:
        """Keep the newest keep_last_n committed step checkpoints; delete everything older."""
        kept = 0
        for p in step_dirs(self.directory):
            if kept >= self.keep_last_n:
                shutil.rmtree(p, ignore_errors=True)
            elif check_committed(p, full=False) is None:
                kept += 1

    def list_committed(self) -> list[Path]:
        """Committed step checkpoints, newest first (marker and sizes; hashes checked at load)."""
        return committed_step_dirs(self.directory)

    def latest(self) -> Path | None:
        committed = self.list_committed()
        return committed[0] if committed else None

    def load_latest(
        self, model: nn.Module, optimizer: optim.Optimizer | None = None
    ) -> tuple[dict, Path]:
        """`Checkpoints.load_latest` over this directory: the newest usable checkpoint, falling
        back to older ones (then best/) with a warning. FileNotFoundError when there are none;
        CheckpointError when none loads. The LoadReport is kept in `self.last_report`."""
        candidates = Checkpoints(resume_candidates(self.directory))
        if not candidates:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        state, path = candidates.load_latest(model, optimizer)
        self.last_report = candidates.last_report
        return state, path
