"""The checkpoint an export reads, pinned: a run still training rotates its step checkpoints
(keeps the newest few) and swaps best/ in place, so the checkpoint chosen at the start could be
deleted before its weights are read. Checkpoint files are never modified in place, so a
hard-linked copy of the chosen one, taken in the run's checkpoints folder and checked complete
(its commit marker and every file's size and hash), holds those files whatever rotation deletes;
a copy that lost the race (the folder went while it was linked) is dropped and the newest
committed one chosen again.

The run folder says whether its run finished (checkpoint/finished.py); an export of a run that
has not (still training, or stopped before its end) says so in the log, its report and its
model card.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxlab.checkpoint.atomic import link_files
from mlxlab.checkpoint.discover import check_committed
from mlxlab.checkpoint.finished import finished_step
from mlxlab.export.hf import ExportError
from mlxlab.runs.model import choose_checkpoint

log = logging.getLogger(__name__)

TRIES = 20  # choices lost to rotation before giving up (each loses only to a newer checkpoint)


@contextmanager
def pinned_checkpoint(run: Path, which: str = "best") -> Iterator[tuple[Path, Path]]:
    """(the chosen committed checkpoint, a private complete copy of it) for the block."""
    chosen = choose_checkpoint(run, which)
    if chosen.parent.name == "checkpoints" and _writable(chosen.parent):
        home = chosen.parent  # the same filesystem: hard links, no bytes copied
    else:
        home = None  # a read-only run: copied to the temporary folder
    staging = Path(tempfile.mkdtemp(prefix=".export-pin-", dir=home))
    try:
        for attempt in range(TRIES):
            copy = staging / str(attempt) / chosen.name
            copy.mkdir(parents=True)
            try:
                link_files(chosen, copy)
                reason = check_committed(copy, full=True)
            except FileNotFoundError:  # rotated away while it was linked
                reason = "deleted while it was read"
            if reason is None:
                yield chosen, copy
                return
            log.info("export: %s changed while it was pinned (%s); choosing again", chosen,
                     reason)
            chosen = choose_checkpoint(run, which)
        raise ExportError(f"{run}: every committed checkpoint was rotated away while it was "
                          "read; export it again (or after the run ends)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def unfinished_note(run_dir: Path, step: int, config: dict) -> str | None:
    """One line saying the run has not finished, None for a finished run: one whose folder
    says so, or (a run from before finished.json) whose checkpoint reached trainer.max_steps."""
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if finished_step(run_dir) is not None or (max_steps and step >= max_steps):
        return None
    return (f"the run in {run_dir} has not finished (still training, or stopped before its "
            f"end): this is its checkpoint at step {step}, not a finished model")
