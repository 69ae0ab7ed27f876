"""Which run folder a `resume=auto` continues: the committed checkpoints of this task's run
folders, read from their state.json (checkpoint/), and the lineage of the newest one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from mlxlab.checkpoint import (
    BEST,
    CHECKPOINTS_DIR,
    MARKER,
    CheckpointError,
    CheckpointState,
    check_committed,
    step_of,
)
from mlxlab.data.chat import TEMPLATE_FILE

log = logging.getLogger(__name__)


def newest_committed(run: Path) -> tuple[int, Path, str | None] | None:
    """(step, checkpoint, MLflow run id) of the run folder's committed checkpoint with the highest
    step, best/ included; a step_* checkpoint wins a tie with best/ (best/ is a copy of one)."""

    found = []
    for ckpt in (run / CHECKPOINTS_DIR).glob("*"):
        if check_committed(ckpt, full=False) is not None:
            continue
        try:
            state = CheckpointState.read(ckpt)
        except (OSError, CheckpointError, TypeError):
            continue
        step = state.step if ckpt.name == BEST else step_of(ckpt)
        if step >= 0:
            found.append((step, ckpt.name != BEST, ckpt, state.run_id))
    if not found:
        return None
    step, _, ckpt, run_id = max(found, key=lambda f: f[:2])
    return step, ckpt, run_id


def trained_objective(checkpoint: Path) -> str | None:
    """The objective `_target_` the checkpoint's run trained with (None: its state.json keeps no
    config, or cannot be read)."""
    try:
        config = CheckpointState.read(checkpoint).config or {}
    except (OSError, CheckpointError, TypeError):
        return None
    objective = config.get("objective")
    return objective.get("_target_") if isinstance(objective, dict) else None


def latest_run_with_checkpoints(root: Path, task_name: str, run_dir: Path,
                                objective: str | None = None) -> Path | None:
    """The run folder to continue: among the folders of this task (outputs/, multirun/, and
    `run_dir` itself) that trained `objective` (its `_target_`; None: any) and continue the
    newest such folder's MLflow run (every resume appends to it), the one whose committed
    checkpoint has the highest step; the passed-over ones are logged. Another objective's run
    under the same task name (a GRPO run and the default classifier both in task `train`) is
    another kind of run, never continued.

    Not simply the newest folder: a run resumed into a new folder holds a copy of the source's
    best/ from its first second, and when it is killed before its own first checkpoint that copy
    is older than the source's newest checkpoint. Not the highest step of the whole task either:
    an unrelated older run may have trained longer.
    """
    folders = {run_dir.resolve()}
    for base in (root / "outputs" / task_name, root / "multirun" / task_name):
        if base.is_dir():
            folders |= {p.parents[2].resolve() for p in base.glob(f"**/{CHECKPOINTS_DIR}/*/{MARKER}")}
    candidates, other_kind = [], 0
    for folder in folders:
        newest = newest_committed(folder)
        if newest is not None:
            step, checkpoint, run_id = newest
            trained = trained_objective(checkpoint)
            if objective is not None and trained is not None and trained != objective:
                other_kind += 1
                continue
            candidates.append((step, folder.stat().st_mtime, folder, checkpoint, run_id))
    if other_kind:
        log.info("resume=auto: passed over %d run folder(s) of task %r that trained another "
                 "objective than %s", other_kind, task_name, objective.rsplit(".", 1)[-1])
    if not candidates:
        return None
    newest_folder = max(candidates, key=lambda c: c[1])
    lineage = [c for c in candidates if c[4] == newest_folder[4]]
    step, mtime, chosen, checkpoint, _ = max(lineage, key=lambda c: c[:2])
    log.info("resume=auto: %s has the highest committed step of its run: %s at step %d",
             chosen, checkpoint.name, step)
    for other_step, other_mtime, folder, other, _ in lineage:
        if folder != chosen and other_mtime >= mtime:  # newer, yet behind: say why not it
            log.warning("resume=auto: skipped %s%s: its newest committed checkpoint is %s at step "
                        "%d, behind step %d", folder, " (the newest run folder)"
                        if folder == newest_folder[2] else "", other.name, other_step, step)
    if len(candidates) > len(lineage):
        log.info("resume=auto: %d older run folder(s) of task %r belong to other runs",
                 len(candidates) - len(lineage), task_name)
    return chosen


# What the data setup copies into a run folder before it reads a row (the tokenizer and chat
# template the run will be loaded with): copies of inputs, not something the run made.
INPUT_COPIES = ("tokenizer.json", TEMPLATE_FILE)


def remove_unused_run_dir(cfg: Any) -> None:
    """A run that failed before it made anything (bad config, no tracking server, a data file
    that cannot be read) leaves no output folder holding only Hydra's `.hydra/`, its log and
    copies of its inputs: remove it and its emptied parents."""
    run_dir = Path(str(cfg.paths.output_dir))
    if not run_dir.is_dir():
        return
    made = [p.name for p in run_dir.iterdir()
            if p.name != ".hydra" and p.suffix != ".log" and p.name not in INPUT_COPIES]
    if made:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = Path(str(cfg.paths.root_dir)) / "outputs"
    for parent in run_dir.parents:
        if outputs not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()
