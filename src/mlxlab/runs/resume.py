"""Where a run resumes from: `resume=auto` (discovery.py), a local run or checkpoint folder, or
object storage (`resume=s3://...`, or `resume=auto` with callbacks.checkpoint.remote set:
checkpoint/remote.py downloads a newer committed checkpoint into the run folder)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mlxlab.checkpoint.remote import fetch_remote_checkpoint
from mlxlab.config import is_remote
from mlxlab.errors import ConfigError
from mlxlab.runs.discovery import latest_run_with_checkpoints

log = logging.getLogger(__name__)


def prepare_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """`resume=auto` -> the run of this task with the highest committed step (this run's own
    folder included); `resume=<path>` -> that path."""
    resume = cfg.get("resume")
    if not resume:
        return None
    if str(resume) == "auto":
        found = latest_run_with_checkpoints(Path(cfg.paths.root_dir), cfg.task_name, run_dir)
        if found is None:
            log.warning("resume=auto: no earlier run of task %r has a checkpoint; starting fresh",
                        cfg.task_name)
        return found
    path = Path(str(resume)).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such run or checkpoint folder; use resume=auto or a "
                          "path under outputs/")
    return path


def remote_resume(
    cfg: Any, run_dir: Path,
    prepare_local: Callable[[Any, Path], Path | None] = prepare_resume,
) -> Path | None:
    """The resume source of `cfg`: `resume=<s3://...>` downloads from there; `resume=auto` with
    callbacks.checkpoint.remote set also looks there when the local checkpoint is missing or older;
    anything else is `prepare_local(cfg, run_dir)` (prepare_resume)."""
    resume = cfg.get("resume")
    ckpt = (cfg.get("callbacks") or {}).get("checkpoint") or {}
    retries, backoff = ckpt.get("remote_retries", 5), ckpt.get("remote_backoff_s", 1.0)
    timeout = ckpt.get("remote_timeout_s", 60.0)
    if is_remote(str(resume)):
        return fetch_remote_checkpoint(str(resume), run_dir, None, retries, backoff, required=True,
                                       timeout_s=timeout)
    local = prepare_local(cfg, run_dir)
    if str(resume) == "auto" and ckpt.get("remote"):
        return fetch_remote_checkpoint(str(ckpt["remote"]), run_dir, local, retries, backoff,
                                       timeout_s=timeout)
    return local
