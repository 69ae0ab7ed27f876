"""The run folder's `finished.json`: written when a run has trained to its end (its last
checkpoint written), removed when training starts in that folder again. Without it a run's
checkpoints are of a run still training or one stopped before its end (killed, an error), which
is what an export of it says (export/pin.py)."""

from __future__ import annotations

import json
from pathlib import Path

FINISHED = "finished.json"


def mark_finished(run_dir: Path, step: int) -> None:
    (Path(run_dir) / FINISHED).write_text(json.dumps({"step": int(step)}) + "\n")


def clear_finished(run_dir: Path) -> None:
    (Path(run_dir) / FINISHED).unlink(missing_ok=True)


def finished_step(run_dir: Path) -> int | None:
    """The step the run in `run_dir` finished at, None when it has not finished."""
    file = Path(run_dir) / FINISHED
    try:
        return int(json.loads(file.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
