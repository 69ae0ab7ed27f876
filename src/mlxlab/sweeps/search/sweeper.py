"""mlxlab's Hydra sweeper: a grid of configs on `replicates` seeds, or an Optuna search.

Every `--multirun` goes through it (conf/hydra/sweeper/mlxlab.yaml, the default):

- A grid (Hydra's basic sweeper, which it extends): the command line's sweeps (`a=1,2`,
  `range()`, `choice()`) as a cartesian product; `replicates=N` runs each config on the seeds
  seed, seed+1, ..., seed+N-1 (`seed=range(...)` written for you). Configs that differ only in
  the seed are one group of replicates: the sweep's parent run summarizes each group
  (sweeps/groups.py) and `mlxlab runs compare` tests them against each other.
- A search (`hydra.sweeper.n_trials` set, as conf/hparams_search/* do): Optuna over
  `hydra.sweeper.params`, with the study in RDB storage (sweeps/search/study.py) so a killed search
  resumes, pruning fed by the trainer's evaluations (sweeps/search/pruning.py), trials launched one
  at a time per free slot (`n_jobs` slots, through any launcher that runs jobs in other
  processes: joblib, submitit, ray), and optionally its top-k trials re-run on more seeds
  before a winner is named by the mean.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

from mlxlab.errors import ConfigError
from mlxlab.sweeps.search import study as S
from mlxlab.sweeps.search.pruning import PRUNERS, make_pruner
from mlxlab.sweeps.search.space import override_text, split_space
from mlxlab.sweeps.search.trial_link import TrialLink, clear_link, write_link

log = logging.getLogger("mlxlab.search")

JOB_SUBDIR = "${hydra.job.num}"  # conf/hydra/default.yaml: a trial's folder is its number
RERUN_JOB_NUM = 1_000_000        # reruns' job numbers start here: no trial's number is theirs
RERUN_ATTR = "mlxlab:rerun:{number}:{seed}"


@dataclass(frozen=True)
class Outcome:
    """How a trial's job ended: COMPLETE with its value, PRUNED, or FAIL with a reason."""

    state: str
    value: float | None = None
    reason: str | None = None


def replicate_arguments(arguments: Sequence[str], replicates: int, seed: int) -> list[str]:
    """The command line with `replicates=N` (or the config's `replicates`) turned into
    `seed=range(seed, seed+N)`."""
    args, n = [], replicates
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key.lstrip("+") == "replicates":
            n = int(value)
        else:
            args.append(argument)
    if n < 1:
        raise ConfigError(f"replicates={n}: give a number of seeds >= 1")
    if n == 1:
        return args
    for argument in args:
        key, _, value = argument.partition("=")
        if key.lstrip("+~") == "seed":
            raise ConfigError(f"replicates={n} and {argument}: replicates sets the seeds "
                              f"({seed}..{seed + n - 1}); give one or the other")
    # replicates=N stays in each job's config: every run's params say how many seeds its
    # config ran on; config hashes ignore it
    return [*args, f"seed=range({seed},{seed + n})", f"replicates={n}"]


class Sweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None = None,
        params: Any = None,
        n_trials: int | None = None,
        n_jobs: int = 1,
        direction: str = "max",
        study_name: str | None = None,
        storage: str | None = None,
        sampler: Any = None,
        pruner: str = "none",
        pruner_args: Any = None,
        rerun_top_k: int = 0,
        rerun_seeds: int = 5,
    ) -> None:
        super().__init__(max_batch_size, dict(params or {}))
        self.n_trials = int(n_trials) if n_trials else None
        self.n_jobs = max(1, int(n_jobs or 1))
        self.direction = _direction(direction)
        self.study_name, self.storage_url = study_name, storage
        self.sampler_cfg = OmegaConf.to_container(sampler, resolve=True) if isinstance(
            sampler, DictConfig) else dict(sampler or {})
        if pruner not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={pruner!r}: use one of {list(PRUNERS)}")
        self.pruner = {"name": pruner, "args": OmegaConf.to_container(pruner_args, resolve=True)
                       if isinstance(pruner_args, DictConfig) else dict(pruner_args or {})}
        self.rerun_top_k, self.rerun_seeds = int(rerun_top_k or 0), int(rerun_seeds or 1)

    # --- a grid ----------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> Any:
        if self.n_trials:
            return Search(self, arguments).run()
        replicates = int(OmegaConf.select(self.config, "replicates", default=1) or 1)
        seed = int(OmegaConf.select(self.config, "seed", default=0))
        return super().sweep(replicate_arguments(arguments, replicates, seed))

    # --- shared with the search ------------------------------------------------------------

    def slots(self) -> int:
        """Trials at once: n_jobs, but one where the launcher runs jobs in this process
        (Hydra's basic launcher: a job's signal handlers need the main thread)."""
        in_process = type(self.launcher).__name__ == "BasicLauncher"
        joblib = type(self.launcher).__name__ == "JoblibLauncher"
        workers = self.launcher.joblib.get("n_jobs") if joblib else None
        if workers is not None and workers != -1 and workers < max(2, self.n_jobs):
            # joblib runs a single worker's jobs in this process, and no more at once than it has
            raise ConfigError(f"hydra.launcher.n_jobs={workers}: give joblib at least "
                              f"{max(2, self.n_jobs)} workers (>= hydra.sweeper.n_jobs, and 2 so "
                              "trials run in worker processes)")
        if in_process and self.n_jobs > 1:
            log.warning("search: hydra.sweeper.n_jobs=%d runs one trial at a time with Hydra's "
                        "basic launcher (jobs in this process); use hydra/launcher=joblib "
                        "(or submitit, ray) for trials in parallel", self.n_jobs)
        return 1 if in_process else self.n_jobs

    def launch_one(self, overrides: list[str], job_num: int) -> Outcome | Any:
        """One job through the launcher; its JobReturn, or an Outcome when the launcher itself
        failed (a worker process killed, e.g. out of memory)."""
        try:
            (result,) = self.launcher.launch([overrides], initial_job_idx=job_num)
        except Exception as err:  # noqa: BLE001 - one trial's end, not the search's
            return Outcome("FAIL", reason=_reason(err))
        return result


class Search:
    """One start of an Optuna search: open the study, run what is left, re-run the top k."""

    def __init__(self, sweeper: Sweeper, arguments: list[str]) -> None:
        self.sweeper, self.config = sweeper, sweeper.config
        for argument in arguments:
            if argument.partition("=")[0].lstrip("+") == "replicates":
                raise ConfigError("replicates= is for grids; a search re-runs its best trials "
                                  "on more seeds with hydra.sweeper.rerun_top_k=K "
                                  "hydra.sweeper.rerun_seeds=N")
        self.space, self.fixed = split_space(sweeper.params, arguments)
        if not self.space:
            raise ConfigError("a search needs a space: hydra.sweeper.params (see "
                              "conf/hparams_search/) or sweeps such as model.dropout="
                              "interval(0,0.3) on the command line")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its own lines: ours say more
        self.metric = str(OmegaConf.select(self.config, "optimized_metric"))
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        root = str(OmegaConf.select(self.config, "paths.root_dir"))
        self.storage_url = sweeper.storage_url or S.default_storage(root, _tracking_uri(self.config))
        self.root = root
        self.name = sweeper.study_name or str(OmegaConf.select(self.config, "task_name"))
        self.storage, self.study = S.open_study(self.storage_url, root, self.name,
                                                sweeper.direction, self.spec())
        self.study.pruner = make_pruner(sweeper.pruner["name"], sweeper.pruner["args"])
        self.heartbeat = S.Heartbeat(self.storage)
        self.running: dict[int, Any] = {}  # trial number -> trial, while its job runs

    def spec(self) -> dict[str, Any]:
        s = self.sweeper
        return {"space": {k: repr(v) for k, v in sorted(self.space.items())},
                "fixed": sorted(self.fixed), "direction": s.direction, "metric": self.metric,
                "sampler": s.sampler_cfg, "pruner": s.pruner}

    def run(self) -> list:
        s = self.sweeper
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state != TrialState.RUNNING for t in trials)
        log.info("search: study %r in %s: %d of %d trials done, %d running; pruner %s, %d at "
                 "once", self.name, S._safe_url(self.storage_url), done, s.n_trials,
                 len(trials) - done, s.pruner["name"], s.slots())
        with self.heartbeat:
            try:
                with stop_signals_interrupt():
                    self.run_trials()
            except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, SIGTERM, a job's exit
                self.stopped(stop)
            self.write_results()
            if s.rerun_top_k:
                self.rerun_best()
        return []

    # --- trials ------------------------------------------------------------------------------

    def stale_trials(self) -> list:
        """RUNNING trials whose sweeper died: each is run again once its job's process (a
        launcher's worker, which stops itself when its sweeper is gone) has ended."""
        from optuna.trial import TrialState

        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        stale = [t for t in running if S.sweeper_gone(t)]
        for t in stale:
            deadline = time.monotonic() + S.STALE_AFTER_S
            while S.worker_alive(self.storage.get_trial(t._trial_id)):
                if time.monotonic() > deadline:
                    raise ConfigError(f"trial {t.number}'s process still runs although the "
                                      "search that started it is gone: stop it, then start "
                                      "the search again")
                log.info("search: waiting for trial %d's process to save and stop", t.number)
                time.sleep(2.0)
            log.info("search: trial %d was left running by a search that is gone: running it "
                     "again (from its checkpoint, if it has one)", t.number)
        return stale

    def run_trials(self) -> None:
        queue, slots = deque(self.stale_trials()), self.sweeper.slots()

        def next_trial() -> Any:
            return queue.popleft() if queue else self.ask()

        if slots == 1:
            while (trial := next_trial()) is not None:
                self.tell(trial, self.run_trial(trial))
            return
        with ThreadPoolExecutor(slots, thread_name_prefix="mlxlab-trial") as pool:
            running: dict = {}
            while True:
                while len(running) < slots and (trial := next_trial()) is not None:
                    running[pool.submit(self.run_trial, trial)] = trial
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    self.tell(running.pop(future), future.result())

    def ask(self) -> Any:
        """A new trial, or None when the study has its n_trials, sampled by a sampler seeded
        for the trial's number: with the same seed and history a resumed search asks what the
        uninterrupted one asked, and sweepers sharing the study never sample alike.

        The number is the one the storage gives the new trial (counted and created under the
        study's lock (study.trial_lock: a file lock, PostgreSQL's advisory lock), so sweepers
        started together make n_trials in all, not one each
        past the count they read); the sampler is seeded for it only then, and the trial's
        params are drawn after (what Study.ask does in one call, with the sampler it has)."""
        import optuna

        with S.trial_lock(self.storage, self.storage_url, self.root, self.name):
            if len(self.study.get_trials(deepcopy=False)) >= self.sweeper.n_trials:
                return None
            # through the study's own storage (Optuna wraps the RDB storage in a cache that
            # must see the trial made, or the params' writes do not find it)
            storage = self.study._storage
            trial_id = storage.create_new_trial(self.study._study_id)
        self.study.sampler = self.make_sampler(storage.get_trial_number_from_id(trial_id))
        trial = optuna.Trial(self.study, trial_id)
        for name, distribution in self.space.items():
            trial._suggest(name, distribution)
        return trial

    def make_sampler(self, number: int) -> Any:
        from hydra.utils import instantiate

        cfg = dict(self.sweeper.sampler_cfg) or {"_target_": "optuna.samplers.TPESampler"}
        if cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + number
        return instantiate(cfg)

    def stopped(self, stop: BaseException) -> None:
        """A signal stopped the search: each trial it was running ends FAIL with the reason
        (and its checkpoint's folder), its MLflow runs KILLED, then the process leaves with the
        signal's code and one line, no traceback; the stop is written into the sweep folder, so
        the sweep's parent ends KILLED at exit (sweeps/parent.py, as a grid's job's stop does),
        even when no job of it was signalled (a trial in a launcher's worker)."""
        from mlxlab.sweeps.folder import record_stop

        code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 130
        if isinstance(stop, KeyboardInterrupt) and stop.args == ("SIGTERM",):
            code = 128 + signal.SIGTERM  # as a process ended by SIGTERM reports it
        record_stop(self.sweep_dir, code)
        reason = f"stopped by a signal (exit {code}) while running"
        uri = _tracking_uri(self.config)
        for number, trial in sorted(self.running.items()):
            job_dir = self.sweep_dir / str(number)
            self.storage.set_trial_user_attr(trial._trial_id, S.FAIL_REASON_ATTR,
                                             f"{reason}; its checkpoints are in {job_dir}")
            self.study.tell(number, state=_fail_state(), skip_if_finished=True)
            if uri is not None:
                kill_job_runs(uri, job_dir, reason)
        print(f"mlxlab: search stopped by a signal: trial(s) {sorted(self.running) or '-'} "
              f"marked FAIL, their runs KILLED; the same command continues study {self.name!r}",
              file=sys.stderr)
        sys.exit(code)

    def run_trial(self, trial: Any) -> Outcome:
        number = trial.number
        self.running[number] = trial
        outcome = self._run_trial(trial)  # a signal leaves it in `running`, for stopped()
        self.running.pop(number, None)
        return outcome

    def _run_trial(self, trial: Any) -> Outcome:
        trial_id, number = trial._trial_id, trial.number
        attempts = S.claim(self.storage, trial_id)
        if attempts > S.MAX_ATTEMPTS:
            return Outcome("FAIL", reason=f"its process died {attempts - 1} times (killed "
                                          "out of memory?): not started again")
        params = self.storage.get_trial_params(trial_id)
        overrides = [*self.fixed, *(override_text(k, v) for k, v in params.items())]
        overrides += self.resume_override(str(number))
        write_link(self.sweep_dir, number, TrialLink(
            self.storage_url, self.name, trial_id, number, self.metric, self.sweeper.pruner))
        log.info("search: trial %d: %s", number, " ".join(
            override_text(k, v) for k, v in params.items()))
        self.heartbeat.add(trial_id)
        try:
            result = self.sweeper.launch_one(overrides, number)
        finally:
            self.heartbeat.remove(trial_id)
        if isinstance(result, Outcome):  # the job's process died: its MLflow runs say why
            from mlxlab.sweeps.callback import record_failed_job

            record_failed_job(self.config, self.sweep_dir / str(number), number, overrides,
                              result.reason or "", crashed=True)
            return result
        return self.outcome(trial_id, result)

    def resume_override(self, subdir: str) -> list[str]:
        """`resume=<the job folder>` when an interrupted start left a checkpoint there."""
        pattern = OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir")
        if pattern != JOB_SUBDIR and not subdir.startswith("rerun_"):
            return []  # a custom folder pattern: the trial starts over instead
        folder = self.sweep_dir / subdir
        if any(folder.glob("checkpoints/*/COMMITTED")):
            log.info("search: %s resumes from its checkpoint", folder)
            return [f"resume={folder}"]
        return []

    def outcome(self, trial_id: int, result: Any) -> Outcome:
        from hydra.core.utils import JobStatus

        attrs = self.storage.get_trial_user_attrs(trial_id)
        if result.status != JobStatus.COMPLETED:
            return Outcome("FAIL", reason=_reason(result._return_value))
        try:
            value = float(result._return_value)
        except (TypeError, ValueError):
            return Outcome("FAIL", reason=f"the job returned {result._return_value!r}, not a number")
        if not math.isfinite(value):
            return Outcome("FAIL", reason=attrs.get(S.FAIL_REASON_ATTR)
                           or f"{self.metric} = {value}")
        if attrs.get(S.PRUNED_AT_ATTR) is not None:
            return Outcome("PRUNED", value)
        return Outcome("COMPLETE", value)

    def tell(self, trial: Any, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        if outcome.reason:
            self.storage.set_trial_user_attr(trial._trial_id, S.FAIL_REASON_ATTR, outcome.reason)
        # skip_if_finished: a sweeper elsewhere that took the trial over may have told it
        if outcome.state == "COMPLETE":
            self.study.tell(trial.number, outcome.value, skip_if_finished=True)
        else:
            self.study.tell(trial.number, state=getattr(TrialState, outcome.state),
                            skip_if_finished=True)
        shown = {"COMPLETE": f"{self.metric} {outcome.value:.4f}" if outcome.value is not None
                 else "", "PRUNED": "pruned", "FAIL": f"failed: {outcome.reason}"}
        log.info("search: trial %d %s%s", trial.number, shown[outcome.state], self.best_text())
        clear_link(self.sweep_dir, trial.number)

    def best_text(self) -> str:
        try:
            best = self.study.best_trial
        except ValueError:  # no complete trial yet
            return ""
        return f"  | best {self.metric} {best.value:.4f} (trial {best.number})"

    # --- results -----------------------------------------------------------------------------

    def write_results(self) -> None:
        """`<sweep dir>/optimization_results.yaml` (as hydra-optuna-sweeper wrote it): the best
        trial's params and value, and the count of trials by state."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        counts = {state.name.lower(): sum(t.state == state for t in trials) for state in
                  (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
        results: dict[str, Any] = {"name": "optuna", "study_name": self.name,
                                   "storage": S._safe_url(self.storage_url), "trials": counts,
                                   "steps_trained": sum(int(t.user_attrs.get(S.STEPS_ATTR, 0))
                                                        for t in trials)}
        try:
            best = self.study.best_trial
            results.update(best_params=dict(best.params), best_value=float(best.value),
                           best_trial=best.number)
        except ValueError:
            log.warning("search: no trial completed (%s)", counts)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        log.info("search: %s", ", ".join(f"{v} {k}" for k, v in counts.items() if v))

    def rerun_best(self) -> None:
        """The top `rerun_top_k` complete trials again on seeds seed+1 .. seed+rerun_seeds-1
        (the trial itself is the seed's own replicate): each config then has rerun_seeds
        replicates, summarized and ranked by the mean on the sweep's parent run."""
        from optuna.trial import TrialState

        s = self.sweeper
        if "seed" in self.space:
            log.warning("search: the seed is searched: no re-runs on other seeds")
            return
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        top = sorted(complete, key=lambda t: t.value, reverse=s.direction == "maximize")
        base = int(OmegaConf.select(self.config, "seed", default=0))
        fixed = [o for o in self.fixed if o.partition("=")[0].lstrip("+~") != "seed"]
        jobs, done = [], self.study.user_attrs
        for trial in top[: s.rerun_top_k]:
            for seed in range(base + 1, base + s.rerun_seeds):
                key = RERUN_ATTR.format(number=trial.number, seed=seed)
                claimed = done.get(key)  # a value, or {"owner": ...} while a sweeper runs it
                if key not in done or (isinstance(claimed, dict)
                                       and S.process_alive(claimed.get("owner")) is False):
                    jobs.append((key, trial, seed))
        log.info("search: re-running the best %d trials on %d seeds each (%d runs left)",
                 min(s.rerun_top_k, len(top)), s.rerun_seeds, len(jobs))
        for i, (key, trial, seed) in enumerate(jobs):
            subdir = f"rerun_{trial.number}_seed{seed}"
            overrides = [*fixed, *(override_text(k, v) for k, v in trial.params.items()),
                         f"seed={seed}", f"hydra.sweep.subdir={subdir}",
                         *self.resume_override(subdir)]
            clear_link(self.sweep_dir, RERUN_JOB_NUM + i)
            if key in self.study.user_attrs and not isinstance(self.study.user_attrs[key], dict):
                continue  # another sweeper of this study ran it meanwhile
            self.study.set_user_attr(key, {"owner": S.this_process()})
            result = s.launch_one(overrides, RERUN_JOB_NUM + i)
            value = None if isinstance(result, Outcome) else self.rerun_value(result)
            self.study.set_user_attr(key, value)
            log.info("search: trial %d on seed %d: %s", trial.number, seed,
                     "failed" if value is None else f"{self.metric} {value:.4f}")

    @staticmethod
    def rerun_value(result: Any) -> float | None:
        from hydra.core.utils import JobStatus

        if result.status != JobStatus.COMPLETED:
            return None
        try:
            value = float(result._return_value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM stops the search as Ctrl-C does (a KeyboardInterrupt where the search waits),
    instead of ending the process with no cleanup; the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail_state() -> Any:
    from optuna.trial import TrialState

    return TrialState.FAIL


def kill_job_runs(uri: str, job_dir: Path, reason: str) -> None:
    """The MLflow runs a stopped job's trackers started end KILLED (those still RUNNING: a job
    that saved and ended its run itself already says KILLED)."""
    from mlflow import MlflowClient

    from mlxlab.sweeps.folder import job_runs
    from mlxlab.tracking import tags as T

    client = MlflowClient(tracking_uri=uri)
    for run_id in job_runs(job_dir):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, T.ERROR, reason)
                client.set_terminated(run_id, "KILLED")
        except Exception as err:  # noqa: BLE001 - the process is leaving; the next run marks it
            log.warning("MLflow: run %s not marked KILLED: %s", run_id, err)


def _direction(direction: str) -> str:
    text = str(direction).lower()
    if text in ("max", "maximize"):
        return "maximize"
    if text in ("min", "minimize"):
        return "minimize"
    raise ConfigError(f"hydra.sweeper.direction={direction!r}: use max or min")


def _tracking_uri(config: DictConfig) -> str | None:
    from mlxlab.tracking.mlflow import tracked_store

    try:
        return tracked_store(OmegaConf.select(config, "tracking"))
    except ValueError:
        return None


def _reason(error: Any) -> str:
    """One line for a failed job: out of memory named as such."""
    text = f"{type(error).__name__}: {error}".splitlines()[0][:1000]
    lowered = text.lower()
    if isinstance(error, MemoryError) or any(w in lowered for w in (
            "out of memory", "bad_alloc", "unable to allocate", "terminatedworkererror",
            "killed")):
        return f"out of memory (or killed): {text}"
    return text

