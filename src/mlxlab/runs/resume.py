"""Where a run resumes from: `resume=auto` (discovery.py), a local run or checkpoint folder, or
object storage (`resume=s3://...`, or `resume=auto` with checkpoint.remote set:
checkpoint/remote.py downloads a newer committed checkpoint into the run folder); and the run
folder a resume source belongs to. The config a resumed run trains is launch/resume.py's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from mlxlab.checkpoint.remote import fetch_remote_checkpoint, is_remote
from mlxlab.errors import ConfigError
from mlxlab.runs.discovery import latest_run_with_checkpoints

if TYPE_CHECKING:
    from mlxlab.training.settings import CheckpointPolicy

log = logging.getLogger(__name__)


def prepare_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`resume=auto` -> the run of this task and objective with the highest committed step (this
    run's own folder included); `resume=<path>` -> that path."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if str(resume) == "auto":
        objective = cfg.objective.get("_target_") if cfg.get("objective") else None
        found = latest_run_with_checkpoints(Path(cfg.paths.root_dir), cfg.task_name, run_dir,
                                            objective)
        if found is None:
            log.warning("resume=auto: no earlier run of task %r with objective %s has a "
                        "checkpoint; starting fresh", cfg.task_name,
                        str(objective).rsplit(".", 1)[-1])
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such run or checkpoint folder; use resume=auto or a "
                          "path under outputs/")
    return path


def remote_resume(
    resume: Any, run_dir: Path, policy: CheckpointPolicy,
    prepare_local: Callable[[], Path | None],
) -> Path | None:
    """The resume source of `resume=`: `resume=<s3://...>` downloads from there; `resume=auto`
    with a remote in `policy` (the run's checkpoint settings) also looks there when the
    local checkpoint is missing or older; anything else is `prepare_local()` (prepare_resume)."""
    retries, backoff = policy.remote_retries, policy.remote_backoff_s
    if is_remote(str(resume)):
        return fetch_remote_checkpoint(str(resume), run_dir, None, retries, backoff, required=True,
                                       timeout_s=policy.remote_timeout_s)
    local = prepare_local()
    if str(resume) == "auto" and policy.remote:
        return fetch_remote_checkpoint(str(policy.remote), run_dir, local, retries, backoff,
                                       timeout_s=policy.remote_timeout_s)
    return local


def resumed_run_folder(source: Path) -> Path:
    """The run folder a resume source belongs to (a run folder, its checkpoints/ or one
    checkpoint in it), else the source itself (a checkpoint copied elsewhere)."""
    source = Path(source).resolve()
    return next((f for f in [source, *source.parents][:3]
                 if (f / ".hydra").is_dir() or (f / "checkpoints").is_dir()), source)
