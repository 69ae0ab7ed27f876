"""Hydra callback: create the MLflow store before any job, group a multirun under a parent run.

Registered in conf/hydra/default.yaml:

    hydra:
      callbacks:
        mlflow_sweep:
          _target_: mlxlab.sweeps.callback.MlflowSweepCallback

Besides the swept keys (every multirun, for run names), does nothing unless `config.tracking` is
the MLflow tracker (tracking=none touches no store). What it tells the jobs goes through files
in the sweep folder (sweeps/folder.py), which every launcher's jobs can read.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mlxlab.errors import DISK_FULL
from mlxlab.sweeps.folder import (
    begin_sweep,
    clear_job_files,
    continue_in,
    job_of,
    job_runs,
    read_job_failure,
    read_parent_run,
    sweep_dir_of,
    write_parent_run,
)
from mlxlab.sweeps.groups import group_runs, log_summary
from mlxlab.sweeps.identity import (
    STEERING,
    FoundSweep,
    find_sweep,
    override_key,
    sweep_identity,
    wants_fresh,
)
from mlxlab.sweeps.jobs import job_runs_of
from mlxlab.sweeps.parent import ParentRun, child_tags
from mlxlab.sweeps.store import metric_mode, sweep_children, sweep_table, swept_keys
from mlxlab.sweeps.verdict import leader_tag, record
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import MAX_PARAM_VALUE_LENGTH
from mlxlab.tracking.mlflow.calls import MAX_TAGS_PER_BATCH, chunks
from mlxlab.tracking.mlflow.offline import replay_ended_run
from mlxlab.tracking.mlflow.server import TrackingUnavailable, bounded_http
from mlxlab.tracking.mlflow.stale import has_checkpoint, mark_dead_runs_quietly
from mlxlab.tracking.mlflow.store import ensure_store, tracked_store
from mlxlab.tracking.plots import sweep_plot_png
from mlxlab.tracking.source import command_line, source_tags

log = logging.getLogger(__name__)


def create_store(settings: dict[str, Any]) -> None:
    """Create the store and the experiment (checked first by the sweep's checks: checks.py);
    a store that cannot be made is one line on stderr and exit 2, before any job runs."""
    try:
        ensure_store(settings["uri"], settings["experiment_name"], settings["artifact_root"])
    except Exception as e:
        message = str(e) if isinstance(e, TrackingUnavailable) else (
            f"MLflow store {settings['uri']} cannot be used ({type(e).__name__}: {e}); fix "
            "tracking.uri or train untracked with tracking=none")
        print(f"mlxlab: error: {message}", file=sys.stderr)
        sys.exit(2)


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self._parent: ParentRun | None = None  # in the launching process

    def __getstate__(self) -> dict[str, Any]:
        """What a launcher's worker process gets (joblib pickles the callbacks): no parent run,
        whose heartbeat thread and client are the launching process's."""
        return {**self.__dict__, "_parent": None}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings = mlflow_settings(config)
        # A single run's background tracker creates the store in its own process, beside the
        # run's start-up (tracking/mlflow/background.py); train.py probes a server before training.
        if settings and not OmegaConf.select(config, "tracking.background", default=False):
            create_store(settings)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before any job (after checks.py refused bad input and a store that does not answer or
        cannot be written): the store created and its dead runs marked; a
        grid's unfinished sweep with this identity found and continued in its folder (one that
        finished: one line, exit 0); the swept keys into the sweep folder; the sweep's parent run
        (a continued sweep's or a resumed search's: the one it had)."""
        search = _is_search(config)  # its folder is the study's: a restart finds it again
        settings = mlflow_settings(config)
        found = None
        if settings:
            create_store(settings)
            mark_dead_runs_quietly(settings["uri"], settings["experiment_name"])
            if not search and not wants_fresh(config):
                found = self._unfinished_sweep(config, settings)
        if found is not None and found.sweep_dir:
            continue_in(config, Path(found.sweep_dir))
        sweep_dir = sweep_dir_of(config.hydra)
        begin_sweep(sweep_dir, _swept_keys(config), keep_parent=search or found is not None,
                    command=continuing_command())
        if not settings:
            return
        try:
            if found is not None:
                self._parent = ParentRun.adopt(settings["uri"], found.run_id, sweep_dir,
                                               settings["heartbeat"])
                write_parent_run(sweep_dir, found.run_id)
                log.info("sweep %s continues in %s: finished jobs are kept, killed ones resume "
                         "from their checkpoints, the rest run", found.run_id, sweep_dir)
            elif not (search and self._resume_parent(config, settings)):
                self._start_parent(config, settings)
        except Exception as e:  # jobs still train (and track, if the store comes back)
            log.warning("MLflow sweep parent run not created: %s: %s", type(e).__name__, e)

    def _unfinished_sweep(self, config: DictConfig, settings: dict[str, Any]) -> FoundSweep | None:
        """The newest sweep of this identity when it is unfinished; a finished one: one line,
        exit 0; one whose launcher is alive: one line, exit 2."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=settings["uri"])
        experiment = client.get_experiment_by_name(settings["experiment_name"])
        identity = sweep_identity(config, settings["uri"])
        found = find_sweep(client, experiment.experiment_id, identity) if experiment else None
        if found is None:
            return None
        where = f"sweep {found.run_id} ({found.sweep_dir})"
        if found.finished:
            print(f"mlxlab: {where} already finished; add sweep.fresh=true to start a new one")
            sys.exit(0)
        if found.run.info.status == "RUNNING":  # stale.py found its launcher alive
            tags = found.run.data.tags
            print(f"mlxlab: error: {where} is running now (process {tags.get(T.PID, '?')} on "
                  f"{tags.get(T.HOST, '?')}); wait for it, or add sweep.fresh=true to start "
                  "another", file=sys.stderr)
            sys.exit(2)
        return found

    def _resume_parent(self, config: DictConfig, settings: dict[str, Any]) -> bool:
        """A search started again in its study's folder continues its parent run."""
        sweep_dir = sweep_dir_of(config.hydra)
        run_id = read_parent_run(sweep_dir)
        if run_id is None:
            return False
        try:
            self._parent = ParentRun.adopt(settings["uri"], run_id, sweep_dir,
                                           settings["heartbeat"])
        except Exception:  # noqa: BLE001 - a store that lost it: a new parent run
            return False
        write_parent_run(sweep_dir, run_id)
        log.info("MLflow sweep parent run %s resumed (%s)", run_id, settings["uri"])
        return True

    def _start_parent(self, config: DictConfig, settings: dict[str, Any]) -> None:
        experiment_id = ensure_store(
            settings["uri"], settings["experiment_name"], settings["artifact_root"]
        )
        sweep_dir = sweep_dir_of(config.hydra)
        metric = OmegaConf.select(config, "optimized_metric", default=None)
        tags = {
            T.ROLE: "sweep",
            T.SWEEP_DIR: str(sweep_dir),
            T.SWEEPER: str(OmegaConf.select(config, "hydra.sweeper._target_", default="")),
            T.OVERRIDES: " ".join(OmegaConf.select(config, "hydra.overrides.task") or []),
            T.SWEEP_PARAMS: json.dumps(_override_keys(config)),
            T.SWEEP_IDENTITY: sweep_identity(config, settings["uri"]),
            T.TASK_NAME: str(OmegaConf.select(config, "task_name", default="")),
            **source_tags(),  # the sweep's Source and command line, as its jobs get them
        }
        if _is_search(config):
            tags[T.STUDY] = str(OmegaConf.select(config, "hydra.sweeper.study_name"))
        if metric:
            tags[T.OPTIMIZED_METRIC] = str(metric)
            tags[T.OPTIMIZED_MODE] = metric_mode(str(metric), _mode(config))
        job_name = OmegaConf.select(config, "hydra.job.name", default="sweep")
        run_name = f"{job_name} sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        parent = ParentRun(settings["uri"], sweep_dir, settings["heartbeat"], experiment_id,
                           run_name)
        parent.start({}, tags)  # with the launcher's tags
        self._parent = parent
        write_parent_run(sweep_dir, parent.run_id)  # what each job's MLflow tracker is given
        log.info("MLflow sweep parent run %s (%s)", parent.run_id, settings["uri"])

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In the job's process (wherever the launcher runs it), before the job."""
        if OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN:
            clear_job_files(job_of(config.hydra).job_dir)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """A sweep job's outcome onto its MLflow run: `best/<metric>` = the value the job
        returned (what sweepers rank by); a failed job's reason (the one train.py wrote into
        its folder, else what it raised) onto its runs, or a FAILED run for a job that failed
        before its tracker started (a bad combination raising in a constructor)."""
        if job_return is None or OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        value, failed = _job_outcome(job_return)
        settings = mlflow_settings(config)
        job = job_of(config.hydra)
        if not settings or not job.parent_run_id:
            return
        try:
            if not failed:
                with bounded_http(settings["request_timeout"]):  # a server away: no minutes
                    self._record_value(config, settings["uri"], job_runs(job.job_dir), value)
                return
            error = job_return._return_value if job_return.status == JobStatus.FAILED else value
            reason = read_job_failure(job.job_dir)
            overrides = [str(o) for o in config.hydra.overrides.task]
            record_failed_job(config, job.job_dir, int(config.hydra.job.num), overrides,
                              reason or f"{type(error).__name__}: {error}",
                              quiet_if_tracked=reason is None)
        except Exception as e:  # the job itself is done; its bookkeeping must not fail it
            log.warning("MLflow: recording the job's outcome failed: %s: %s", type(e).__name__, e)

    @staticmethod
    def _record_value(config: DictConfig, uri: str, runs: list[str], value: Any) -> None:
        """`runs`: what this job's trackers started (folder.job_runs); the value on the last."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        metric = OmegaConf.select(config, "optimized_metric", default=None)
        if runs and metric:
            MlflowClient(tracking_uri=uri).log_batch(
                runs[-1], metrics=[Metric(f"best/{metric}", float(value), _now_ms(), 0)]
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Send what jobs ended offline kept (their server was away), then log the top child's
        metric and params, a metric-vs-params PNG, the groups of replicates and the verdict
        (sweeps/verdict.py) on the parent; end it FINISHED when every job is (a search: when its
        trials are told), else FAILED, and then the command exits 1 (sweep_failure)."""
        if self._parent is None:
            return
        settings = mlflow_settings(config) or {}
        parent, status = self._parent, None
        with bounded_http(settings.get("request_timeout", 30.0)):  # a server away: no minutes
            try:
                self._replay_offline_jobs()
                self._summarize(config)
            except Exception as e:  # the jobs are done and logged; a summary failure must not hide it
                log.warning("MLflow sweep summary failed: %s: %s", type(e).__name__, e)
            self._parent = None
            try:
                status = "FINISHED" if _is_search(config) else parent.status_of_jobs()
                status = parent.end(status)
            except Exception as e:  # noqa: BLE001 - the store is away: the parent stays open
                parent.abandon()
                log.warning("MLflow sweep parent run %s not ended: %s: %s", parent.run_id,
                            type(e).__name__, e)
        if status not in ("FINISHED", "KILLED"):  # KILLED: a signal's exit code says it
            _FAILED.append(
                f"sweep {parent.run_id} ended {status or 'unrecorded (the store did not answer)'}"
                f": not every job finished (see above); the same command continues it: "
                f"{continuing_command()}")

    def _replay_offline_jobs(self) -> None:
        """Jobs whose runs ended while the tracking server was away left their metrics and final
        status in their folders (tracking/mlflow/offline.py); the server answers now: sent."""
        client = self._parent.client
        for run in job_runs_of(sweep_children(client, self._parent.run_id)):
            if run.info.status != "FINISHED":
                replay_ended_run(client, run)

    def _summarize(self, config: DictConfig) -> None:
        from mlflow.entities import Metric, RunTag

        client = self._parent.client
        parent_id = self._parent.run_id
        children = sweep_children(client, parent_id)
        jobs = job_runs_of(children)  # a job's earlier tries: history
        statuses = [r.info.status for r in jobs]
        adopted = sum(f"{T.ADOPTED_BY_PREFIX}{parent_id}" in r.data.tags for r in jobs)
        if adopted:  # a grown sweep (sweeps/jobs.py): say what it trained
            log.info("sweep: %d of %d jobs adopted from earlier sweeps (same config and seed), "
                     "%d trained or kept by this sweep", adopted, len(jobs), len(jobs) - adopted)
        tags = [
            RunTag(T.NUM_RUNS, str(len(statuses))),
            RunTag(T.NUM_FINISHED, str(statuses.count("FINISHED"))),
            RunTag(T.NUM_FAILED, str(statuses.count("FAILED"))),
        ]
        metric = OmegaConf.select(config, "optimized_metric", default=None)
        if not metric or not children:
            client.log_batch(parent_id, tags=tags)
            return
        mode = metric_mode(str(metric), _mode(config))
        keys = swept_keys(children, _override_keys(config))
        rows = sweep_table(children, metric, keys, mode)  # best first, no-metric runs last
        top = next((r for r in rows if r["status"] == "FINISHED" and _finite(r[metric])), None)
        metrics = []
        if top is not None:  # one seed's maximum: named top_run, never "best"
            metrics.append(Metric(f"top_run/{metric}", float(top[metric]), _now_ms(), 0))
            # tags, not params: a continuation may move the top run to another config, and
            # MLflow refuses to change a param (the whole summary would be refused)
            tags += [RunTag(f"{T.TOP_RUN_PREFIX}{k}", str(top[k])) for k in keys
                     if top[k] is not None]
            tags.append(RunTag(T.TOP_RUN_ID, top["run_id"]))
            log.info("sweep top single run %s=%s (run %s)", metric, top[metric], top["run_id"])
        for part in chunks(tags, MAX_TAGS_PER_BATCH):
            client.log_batch(parent_id, tags=part)
        client.log_batch(parent_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as tmp:
            png = sweep_plot_png(rows, metric, keys, Path(tmp) / f"sweep_{_safe(metric)}.png")
            client.log_artifact(parent_id, str(png), "plots")
            log_summary(client, parent_id, children, keys, metric, mode, Path(tmp), _now_ms())
            result = record(client, parent_id, group_runs(children, keys), metric, mode,
                            Path(tmp), command="the sweep's end")
        log.info("sweep verdict on %s: %s; leader %s", metric, result["verdict"],
                 leader_tag(result))
        optuna_results = sweep_dir_of(config.hydra) / "optimization_results.yaml"
        if optuna_results.is_file():  # the search's own verdict, next to the table's
            client.log_artifact(parent_id, str(optuna_results))
            found = OmegaConf.to_container(OmegaConf.load(optuna_results))
            best = [RunTag(f"{T.OPTUNA_BEST_PREFIX}{k}", str(v))
                    for k, v in found.get("best_params", {}).items()]
            metrics = []
            if _finite(found.get("best_value")):
                metrics = [Metric("optuna/best_value", float(found["best_value"]), _now_ms(), 0)]
            for state, count in (found.get("trials") or {}).items():
                metrics.append(Metric(f"search/trials_{state}", float(count), _now_ms(), 0))
            if found.get("steps_trained") is not None:
                metrics.append(Metric("search/steps_trained", float(found["steps_trained"]),
                                      _now_ms(), 0))
            client.log_batch(parent_id, metrics=metrics, tags=best[:MAX_TAGS_PER_BATCH])


# why this process's sweep did not finish (on_multirun_end): train.main exits 1 with it
_FAILED: list[str] = []


def sweep_failure() -> str | None:
    """Why the sweep this process launched ended other than FINISHED, None if it did not."""
    return _FAILED[-1] if _FAILED else None


def record_failed_job(config: DictConfig, job_dir: Path, job_num: int, overrides: list[str],
                      reason: str, quiet_if_tracked: bool = False, crashed: bool = False) -> None:
    """A sweep job that failed, in the store: `reason` (`mlxlab.error`) on the runs its
    trackers started, which end FAILED when its process `crashed` (a launcher's worker killed
    out of memory, a segfault: nothing ended them; the search sees that, where Hydra's
    on_job_end never runs); or, when it started none, one FAILED run with its overrides as
    params, so the sweep shows it. `quiet_if_tracked`: a reason that says nothing more than the
    runs themselves (a NaN) is not written on them."""
    settings = mlflow_settings(config)
    parent_id = read_parent_run(sweep_dir_of(config.hydra))
    if not settings or not parent_id:
        return
    from mlflow import MlflowClient

    try:
        _record_failed_job(MlflowClient(tracking_uri=settings["uri"]), parent_id, job_dir,
                           job_num, overrides, reason, quiet_if_tracked, crashed)
    except Exception as e:  # noqa: BLE001 - the sweep goes on; the job's own state says it
        log.warning("MLflow: recording the failed job %d failed: %s: %s", job_num,
                    type(e).__name__, e)


def _record_failed_job(client: Any, parent_id: str, job_dir: Path, job_num: int,
                       overrides: list[str], reason: str, quiet_if_tracked: bool,
                       crashed: bool) -> None:
    from mlflow.entities import Param, RunTag

    runs = job_runs(job_dir)
    # a full disk stopped it after a committed checkpoint: the same command resumes it there
    # (sweeps/jobs.py), as it resumes a killed job
    resumable = reason.startswith(DISK_FULL) and has_checkpoint(job_dir)
    for run_id in [] if quiet_if_tracked else runs:
        client.set_tag(run_id, T.ERROR, reason[:5000])
        if resumable:
            client.set_tag(run_id, T.RESUMABLE, "true")
        if crashed:
            client.set_terminated(run_id, "FAILED")
    if runs:
        return
    parent = client.get_run(parent_id)
    run = client.create_run(
        parent.info.experiment_id, run_name=f"failed job {job_num}",
        tags={**child_tags(parent_id), T.SWEEP_ID: parent_id, T.RUN_DIR: str(job_dir)})
    pairs = [o.split("=", 1) for o in overrides if "=" in o]
    client.log_batch(run.info.run_id, params=[
        Param(k.lstrip("+~"), v[:MAX_PARAM_VALUE_LENGTH]) for k, v in pairs][:100],
        tags=[RunTag(T.ERROR, reason[:5000])])
    client.set_terminated(run.info.run_id, "FAILED")


def continuing_command() -> str:
    """This launch's command line without `sweep.fresh=...`: the command that continues it."""
    argv = [a for a in sys.argv if override_key(a) != "sweep.fresh"]
    return command_line(argv)


def mlflow_settings(config: DictConfig) -> dict[str, Any] | None:
    """ensure_store arguments when the composed tracking config is the MLflow tracker."""
    tracking = OmegaConf.select(config, "tracking")
    uri = tracked_store(tracking)
    if uri is None:
        return None
    return {
        "uri": uri,
        "experiment_name": str(tracking.get("experiment_name") or "mlxlab"),
        "artifact_root": tracking.get("artifact_root"),
        "connect_timeout": float(tracking.get("connect_timeout") or 5.0),
        "request_timeout": float(tracking.get("request_timeout") or 30.0),
        "heartbeat": float(tracking.get("heartbeat_every_seconds") or 30.0),
    }


def _override_keys(config: DictConfig) -> list[str]:
    """Config keys the multirun command line and the sweeper's search space set (not
    `replicates`: the sweeper turns it into seeds; not the keys that steer continuing, which
    never make groups)."""
    keys = []
    for override in OmegaConf.select(config, "hydra.overrides.task") or []:
        key = override_key(override)
        if (key and key.split(".")[0].split("/")[0] != "hydra"
                and key not in (*keys, "replicates", *STEERING)):
            keys.append(key)
    params = OmegaConf.select(config, "hydra.sweeper.params")
    for key in params or {}:
        if key not in keys:
            keys.append(str(key))
    return keys


def _swept_keys(config: DictConfig) -> list[str]:
    """Keys the multirun varies: command-line sweeps (a,b / range() / choice()...) and the
    sweeper's search space."""
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
    keys = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra parsed them already; never fail a sweep over its run names
        parsed = []
    for override in parsed:
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    for key in OmegaConf.select(config, "hydra.sweeper.params") or {}:
        if str(key) not in keys:
            keys.append(str(key))
    if (OmegaConf.select(config, "replicates", default=1) or 1) > 1 and "seed" not in keys:
        keys.append("seed")  # the sweeper turns replicates=N into a seed sweep
    return keys


def _job_outcome(job_return: Any) -> tuple[Any, bool]:
    """(the value the job returned, whether it failed): raised, or returned a non-finite number."""
    if job_return.status != JobStatus.COMPLETED:
        return None, True
    value = job_return._return_value  # the property would raise for failed jobs
    try:
        return value, not math.isfinite(float(value))
    except (TypeError, ValueError):
        return value, False  # not a metric (an app returning None): nothing to judge


def _is_search(config: DictConfig) -> bool:
    """An Optuna search of mlxlab's sweeper (sweeps/search/sweeper.py): resumable from its folder."""
    return bool(OmegaConf.select(config, "hydra.sweeper.n_trials", default=None))


def _mode(config: DictConfig) -> str | None:
    mode = OmegaConf.select(config, "optimized_mode", default=None)
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if mode is None and isinstance(direction, str):
        mode = direction
    return mode


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
