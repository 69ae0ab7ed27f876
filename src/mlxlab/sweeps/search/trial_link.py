"""What a search tells the job that trains one of its trials, through the sweep folder.

The sweeper writes `<sweep dir>/.mlxlab_trials/<job num>.json` before it launches the job: the
study's storage and name, the trial, the metric to report and the pruner's settings. The job
(train.py, in whichever process or host the launcher runs it) reads its own file through
Hydra's job context, reports each evaluation to the trial and stops when the pruner says so
(sweeps/search/pruning.py). Files, not the environment, as the rest of the sweep folder
(sweeps/folder.py): every launcher's jobs see the folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)

TRIALS_DIR = ".mlxlab_trials"


@dataclass(frozen=True)
class TrialLink:
    storage: str
    study_name: str
    trial_id: int
    number: int
    metric: str
    pruner: dict[str, Any] = field(default_factory=dict)  # {"name": ..., "args": {...}}

    def tags(self) -> dict[str, str]:
        """Tags on the trial's MLflow run."""
        return {T.STUDY: self.study_name, T.TRIAL_NUMBER: str(self.number)}

    def storage_handle(self) -> Any:
        from mlxlab.sweeps.search.study import open_storage

        return open_storage(self.storage)

    def set_attr(self, key: str, value: Any) -> None:
        """A user attr on the trial (best effort: the run's own result never depends on it)."""
        try:
            self.storage_handle().set_trial_user_attr(self.trial_id, key, value)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            log.warning("search: could not record %s on trial %d: %s", key, self.number, err)


def link_path(sweep_dir: Path, job_num: int) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / f"{job_num}.json"


def write_link(sweep_dir: Path, job_num: int, link: TrialLink) -> None:
    path = link_path(sweep_dir, job_num)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(link)))
    tmp.replace(path)


def clear_link(sweep_dir: Path, job_num: int) -> None:
    link_path(sweep_dir, job_num).unlink(missing_ok=True)


def current_trial() -> TrialLink | None:
    """This job's trial, when a search launched it; None otherwise (a grid job, a single run)."""
    from mlxlab.sweeps.folder import current_job

    job = current_job()
    if job is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    path = link_path(job.sweep_dir, int(HydraConfig.get().job.num))
    if not path.is_file():
        return None
    return TrialLink(**json.loads(path.read_text()))


def record_failure(reason: str) -> None:
    """A trial's job failed on bad input (train.py's UserError funnel returns NaN to the
    sweeper): the reason goes on the trial, where the sweeper and the summary read it, and in
    the job's folder, where the sweep's checks put it on the job's MLflow run (sweeps/checks.py)."""
    from mlxlab.sweeps.folder import current_job, write_job_failure

    job = current_job()
    if job is not None:
        write_job_failure(job.job_dir, reason)
    link = current_trial()
    if link is not None:
        from mlxlab.sweeps.search.study import FAIL_REASON_ATTR

        link.set_attr(FAIL_REASON_ATTR, reason[:2000])
