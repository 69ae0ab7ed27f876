"""Which jobs of a continued sweep are kept, resumed or run.

A grid's job is its config (the `mlxlab.config_hash` tag: the seed in it, the sweep's steering
keys, paths and tracking out of it) under the sweep's parent run. When the same command
continues a sweep (identity.py), each job asks here before it trains:

- keep: a FINISHED run of its config is already under the parent: not trained again, the value
  it returned is returned (one log line);
- resume: its newest run is KILLED (its process died, stale.py, or a signal stopped it), or
  FAILED on a full disk (tagged resumable, callback.py), and its folder holds a committed
  checkpoint: the job resumes from there into that same run, bitwise as
  `resume=` does for a single run;
- adopt: none of its runs is under the parent, but a FINISHED job of an earlier sweep of the
  same task in the same store trained its config and seed (a sweep grown by more replicates or
  another value: its identity, and so its parent, is new): that run joins this sweep (tagged
  `mlxlab.adopted_by.<parent>`, so the sweep's table and `runs compare` count it; its own sweep
  keeps it too) and its value is returned (one log line);
- run: anything else (never started, FAILED, killed before its first checkpoint);
- busy: its newest run is still RUNNING (a worker that outlived its killed launcher, a run of
  another host whose heartbeat is fresh): the job fails with one line instead of training
  beside it.

A new sweep's parent has no children, so every job runs or is adopted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mlxlab.config import config_hash
from mlxlab.errors import UserError
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import retrying
from mlxlab.tracking.mlflow.offline import replay_ended_run
from mlxlab.tracking.mlflow.stale import has_checkpoint

log = logging.getLogger("mlxlab")


@dataclass(frozen=True)
class JobPlan:
    action: str  # "keep" | "adopt" | "resume" | "busy" | "run"
    run_id: str | None = None
    run_dir: Path | None = None  # resume: the folder whose checkpoint it continues
    value: float | None = None  # keep: the finished run's optimized metric
    status: str | None = None  # resume: the run's status (KILLED, or FAILED on a full disk)


def job_key(run: Any) -> str:
    """The job a run belongs to: its config hash (a run the callback recorded for a job that
    failed before tracking has none: it is a job of its own), and a search's trial number: two
    trials that drew the same params are two jobs (a resumed trial keeps its number)."""
    key = run.data.tags.get(T.CONFIG_HASH) or run.info.run_id
    trial = run.data.tags.get(T.TRIAL_NUMBER)
    return key if trial is None else f"{key} trial {trial}"


def job_runs_of(children: list) -> list:
    """The newest run of each job among a sweep's children (oldest first): what the sweep's
    table counts, where an earlier try of a job (killed before its checkpoint, failed) is
    history."""
    newest: dict[str, Any] = {}
    for run in children:
        key = job_key(run)
        if key not in newest or run.info.start_time >= newest[key].info.start_time:
            newest[key] = run
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def plan_job(client: Any, parent_run_id: str, cfg: DictConfig) -> JobPlan:
    """What this job does in its sweep (see the module's docstring)."""
    parent = retrying(client.get_run, parent_run_id)
    runs = _newest_first(client, parent, f"tags.`{T.PARENT_RUN}` = '{parent_run_id}' and "
                         f"tags.`{T.CONFIG_HASH}` = '{config_hash(cfg)}'")
    if runs and runs[0].info.status != "FINISHED" and replay_ended_run(client, runs[0]):
        # its process ended it while the server was away: the metrics it kept and its status
        # are sent now, and it is judged as it ended
        runs[0] = retrying(client.get_run, runs[0].info.run_id)
    for run in runs:
        if run.info.status == "FINISHED":
            return JobPlan("keep", run.info.run_id, value=_value(run, cfg))
    if runs and runs[0].info.status == "RUNNING":
        # alive: its process is on this host, or another host's heartbeat is fresh (stale.py
        # marked the dead ones before the sweep started): training it again beside it would
        # make two runs of one job, and resuming into it two writers of one run
        return JobPlan("busy", runs[0].info.run_id, Path(str(runs[0].data.tags.get(T.RUN_DIR))))
    newest = runs[0] if runs else None
    if newest is not None and (newest.info.status == "KILLED" or (
            newest.info.status == "FAILED" and newest.data.tags.get(T.RESUMABLE) == "true")):
        run_dir = newest.data.tags.get(T.RUN_DIR)  # (FAILED and resumable: a full disk)
        if has_checkpoint(run_dir):
            return JobPlan("resume", newest.info.run_id, Path(str(run_dir)),
                           status=newest.info.status)
    earlier = None if runs else finished_elsewhere(client, parent, cfg)
    if earlier is not None:
        return JobPlan("adopt", earlier.info.run_id, value=_value(earlier, cfg))
    return JobPlan("run")


def _newest_first(client: Any, parent: Any, query: str) -> list:
    """The runs of the parent's experiment that `query` selects, newest first (100 at most)."""
    return retrying(client.search_runs, [parent.info.experiment_id], filter_string=query,
                    max_results=100, order_by=["attributes.start_time DESC"])


def _value(run: Any, cfg: DictConfig) -> float:
    """A finished job's optimized metric: the value its job returned (`best/<metric>`)."""
    metrics, metric = run.data.metrics, str(cfg.optimized_metric)
    return float(metrics.get(f"best/{metric}", metrics.get(metric, float("nan"))))


def finished_elsewhere(client: Any, parent: Any, cfg: DictConfig) -> Any | None:
    """The newest FINISHED grid job of another sweep of this task, in this store, that trained
    `cfg` (its config hash holds the seed) and has the value the sweep ranks by; None if none."""
    task = parent.data.tags.get(T.TASK_NAME)
    if not task:
        return None
    runs = _newest_first(client, parent, f"tags.`{T.CONFIG_HASH}` = '{config_hash(cfg)}' and "
                         f"tags.`{T.TASK_NAME}` = '{task}' and attributes.status = 'FINISHED'")
    for run in runs:
        tags = run.data.tags
        if (tags.get(T.PARENT_RUN) not in (None, parent.info.run_id)
                and T.TRIAL_NUMBER not in tags and math.isfinite(_value(run, cfg))):
            return run
    return None


def continue_job(cfg: DictConfig) -> float | None:
    """In a grid's job with an MLflow parent run: the value of a kept job (the caller returns it
    without training), else None, with `cfg.resume` set to a killed job's folder. A search's
    trials are the search's to resume (sweeps/search/sweeper.py), a single run's are `resume=`'s."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mlxlab.sweeps.folder import current_job
    from mlxlab.tracking.mlflow.store import tracked_store

    job = current_job()
    uri = tracked_store(cfg.tracking)
    if (
        job is None
        or not job.parent_run_id
        or uri is None
        or OmegaConf.select(HydraConfig.get(), "sweeper.n_trials", default=None)
    ):
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    plan = plan_job(client, job.parent_run_id, cfg)
    if plan.action == "keep":
        log.info(
            "sweep: job %s finished as run %s: kept, not run again", job.job_dir.name, plan.run_id
        )
        return plan.value
    if plan.action == "adopt":
        earlier = retrying(client.get_run, plan.run_id).data.tags.get(T.PARENT_RUN)
        retrying(client.set_tag, plan.run_id, f"{T.ADOPTED_BY_PREFIX}{job.parent_run_id}", "true")
        log.info("sweep: job %s (same config and seed) finished as run %s of sweep %s: adopted, "
                 "not run again", job.job_dir.name, plan.run_id, earlier)
        return plan.value
    if plan.action == "busy":
        raise UserError(
            f"sweep: job {job.job_dir.name}'s run {plan.run_id} is still RUNNING (a process "
            f"writing {plan.run_dir} is alive, or its host's heartbeat is recent): stop that "
            "process or let it finish, then run the same sweep command again"
        )
    if plan.action == "resume":
        log.info("sweep: job %s was %s: its run %s resumes from %s", job.job_dir.name,
                 "killed" if plan.status == "KILLED" else "stopped by a full disk", plan.run_id,
                 plan.run_dir)
        cfg.resume = str(plan.run_dir)
    return None
