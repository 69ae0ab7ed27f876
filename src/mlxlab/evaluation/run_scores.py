"""A run's per-example task scores, wherever they are: its run folder (`eval_tasks/best|last/`),
or the MLflow run's artifacts (a training run's `eval_tasks/best|last/`, an `mlxlab eval` run's
`eval_tasks/`). `mlxlab runs compare A B` and the model card read them through here."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mlxlab.evaluation.results import FOLDER, SavedTask, read_scores
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.environment import set_for_the_call

WHICH = ("best", "last")


def folder_scores(run_dir: str | Path, which: str = "best") -> dict[str, SavedTask]:
    """The scores a training run wrote into its folder ({} when it scored no task)."""
    return read_scores(Path(run_dir) / FOLDER / which)


def run_scores(client: Any, run: Any, folder: Path | None = None, which: str = "best"
               ) -> dict[str, SavedTask]:
    """The task scores of an MLflow run (None: only `folder`) or of a run folder: an eval run's
    scores, or a training run's `which` evaluation (best or last); {} when there are none."""
    if which not in WHICH:
        raise ValueError(f"which={which!r}: use best or last")
    if folder is not None:
        found = folder_scores(folder, which)
        if found:
            return found
    if run is None:
        return {}
    path = FOLDER if run.data.tags.get(T.ROLE) == "eval" else f"{FOLDER}/{which}"
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # no progress bar on stderr
    with tempfile.TemporaryDirectory(prefix="mlxlab-scores-") as tmp:
        try:
            with set_for_the_call(quiet):
                local = client.download_artifacts(run.info.run_id, path, tmp)
        except Exception:  # noqa: BLE001 - no such artifact (a run that scored no task)
            return {}
        return read_scores(local)
