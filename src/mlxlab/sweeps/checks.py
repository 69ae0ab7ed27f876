"""Bad input fails first: the Hydra callback that checks a sweep, or a single run, before
anything of it exists (a single run's config goes through config.validate in on_run_start,
before Hydra makes its run folder).

Registered FIRST in conf/hydra/default.yaml (`sweep_checks`), so its on_multirun_start runs
before the sweep callback's (store, parent run, sweep folder) and before Hydra builds the
sweeper (the study): a bad `replicates`, `hydra.sweeper.n_trials` or a sweep value of the wrong
type (`trainer.max_epochs=two,3`) is one line, exit 2, and no parent run, multirun folder or
study is left behind. Each job's config is composed as the launcher will compose it and goes
through config.validate, the check every run passes: a covering set of jobs, so every value of
every swept key is checked at least once (not the whole product: a grid of 1000 jobs is
checked in as many compositions as its longest sweep has values).

The MLflow store is checked here, and only here, before anything exists (nothing made): a
server that does not answer, or a store this process cannot write (tracking/mlflow/store.py
check_writable, a real write), stops the command (one line, exit 2) instead of training
untracked; the sweep callback (callback.py) then creates it. Sweepers started at the same moment
on one sweep folder (the same search in N processes) make its parent run one at a time: the
start lock taken here is held through the sweep callback's start and released by
`SweepStarted`, registered after it. (A job's failure reason and a signal's stop reach the store
through the sweep callback and the parent run: callback.py, parent.py.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError, UserError
from mlxlab.runtime.files.locks import check_folder_free, file_lock, run_folder_busy
from mlxlab.sweeps.folder import sweep_dir_of

START_LOCK = ".mlxlab_start.lock"  # in the sweep folder
_start = contextlib.ExitStack()  # the start lock, from SweepChecks to SweepStarted


def fail(message: str) -> None:
    """One line on stderr and exit 2, as mlxlab-train's own errors."""
    print(f"mlxlab: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- the sweep's own settings ----------------------------------------------------------------


def check_settings(config: DictConfig) -> None:
    """resume=, replicates and the sweeper's numbers, as the user typed them."""
    resume = OmegaConf.select(config, "resume", default=None)
    if resume:
        # one run folder for every job: the same sweep command continues a sweep job by job
        raise ConfigError(
            f"resume={resume} on a --multirun would continue every job from one run; run the "
            "same sweep command without resume=: it continues the sweep, each killed job from "
            "its own checkpoint"
        )
    replicates = OmegaConf.select(config, "replicates", default=None)
    if replicates is not None:
        _whole("replicates", replicates, 1, "seeds per config, e.g. replicates=3")
    sweeper = OmegaConf.select(config, "hydra.sweeper") or {}
    n_trials = sweeper.get("n_trials")
    if n_trials is not None:
        _whole(
            "hydra.sweeper.n_trials",
            n_trials,
            1,
            "trials over all starts of the study, e.g. hydra.sweeper.n_trials=20 (null: a grid)",
        )
    for key, low, example in (
        ("n_jobs", 1, "trials at once"),
        ("rerun_top_k", 0, "0: none"),
        ("rerun_seeds", 1, "seeds per re-run config"),
    ):
        if sweeper.get(key) is not None:
            _whole(f"hydra.sweeper.{key}", sweeper.get(key), low, example)
    if n_trials is not None and int(replicates or 1) > 1:
        raise ConfigError(
            "replicates= is for grids; a search re-runs its best trials on more "
            "seeds with hydra.sweeper.rerun_top_k=K hydra.sweeper.rerun_seeds=N"
        )


def _whole(key: str, value: Any, low: int, what: str) -> None:
    try:
        check_number(key, value, int, low)
    except ConfigError:
        raise ConfigError(f"{key}={value}: give a whole number >= {low} ({what})") from None


# --- each job's config -------------------------------------------------------------------------


def covering_jobs(config: DictConfig) -> list[list[str]]:
    """Override lists of jobs that together take every value of every swept key: job i takes
    each sweep's i-th value (its last, once it has no more). A search's space gives its choices
    and its ranges' two ends."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
    task = [o for o in task if o.split("=", 1)[0].lstrip("+~") != "replicates"]
    if OmegaConf.select(config, "hydra.sweeper.n_trials", default=None) is not None:
        return _search_jobs(config, task)
    lists: list[list[str]] = []
    for override in OverridesParser.create().parse_overrides(task):
        key = override.get_key_element()
        if override.is_sweep_override() and override.is_discrete_sweep():
            lists.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        elif not override.is_sweep_override():
            lists.append([f"{key}={override.get_value_element_as_str()}"])
    width = max((len(values) for values in lists), default=1)
    return [[values[min(i, len(values) - 1)] for values in lists] for i in range(width)]


def _search_jobs(config: DictConfig, task: list[str]) -> list[list[str]]:
    from optuna.distributions import CategoricalDistribution

    from mlxlab.sweeps.search.space import override_text, split_space

    space, fixed = split_space(OmegaConf.select(config, "hydra.sweeper.params"), task)
    values = {
        key: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
        for key, d in space.items()
    }
    width = max((len(v) for v in values.values()), default=1)
    return [
        [*fixed, *(override_text(k, v[min(i, len(v) - 1)]) for k, v in values.items())]
        for i in range(width)
    ]


def check_run(config: DictConfig) -> None:
    """A single run's config validated as its job will be (Hydra's config set as the job sees
    it: the choices, the mode)."""
    from hydra.core.hydra_config import HydraConfig

    from mlxlab.config import hand_to_run, unwrapped, validate

    HydraConfig.instance().set_config(config)  # what Hydra's run_job sets next
    with unwrapped():
        hand_to_run(validate(config))  # the job trains with the parts built to check them
    run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
    # a folder another process trains in: before Hydra writes its .hydra/ and log into it
    check_folder_free(run_dir, run_folder_busy(run_dir))


def check_jobs(config: DictConfig) -> None:
    """Each covering job composed (as the launcher composes it) and validated."""
    from mlxlab.config import unwrapped, validate

    first: tuple[list[str], DictConfig] | None = None
    for overrides in covering_jobs(config):
        with _job_config(config, overrides, first) as job:
            first = first or (overrides, job)
            with open_dict(job):
                job.replicates = 1  # a grid's jobs get replicates=N: the sweeper ran them as seeds
            try:
                with unwrapped():
                    validate(job)
            except UserError as err:
                swept = " ".join(o for o in overrides if o.split("=", 1)[0] in _varied(config))
                where = f" (in the job {swept})" if swept else ""
                raise ConfigError(f"{err}{where}; nothing was started") from None


_ABSENT = object()


@contextlib.contextmanager
def _job_config(
    config: DictConfig, overrides: list[str], first: tuple[list[str], DictConfig] | None
) -> Iterator[DictConfig]:
    """A job's config: composed by Hydra (~0.1 s), or, when it differs from the first job only
    in values of keys the first has (a seed, a learning rate: no config group, nothing added
    or removed), the first job's with those values set as Hydra sets them, and set back after
    (~15 ms a job instead of ~100 ms: a sweep of 400 values is checked in ~6 s on 2 cores)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if first is not None:
        base = first[1]
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if o not in first[0]]
        )
        before = {
            o.get_key_element(): OmegaConf.select(base, o.get_key_element(), default=_ABSENT)
            for o in parsed
        }
        if all(
            not o.is_add()
            and not o.is_delete()
            and "/" not in o.get_key_element()
            and not isinstance(before[o.get_key_element()], DictConfig)
            and before[o.get_key_element()] is not _ABSENT
            for o in parsed
        ):
            try:
                for override in parsed:
                    OmegaConf.update(
                        base, override.get_key_element(), override.value(), merge=False
                    )
                updated = True
            except Exception:  # noqa: BLE001 - a typed node refused it: Hydra composes below
                updated = False
            try:
                if updated:
                    yield base
            finally:
                for key, value in before.items():
                    OmegaConf.update(base, key, value, merge=False)
            if updated:
                return
    try:
        job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's own type and grammar errors
        raise ConfigError(
            f"a job of this sweep does not compose: {_first_line(err)}; fix its sweep values"
        ) from None
    yield job


def _varied(config: DictConfig) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
    keys = {
        o.get_key_element()
        for o in OverridesParser.create().parse_overrides(task)
        if o.is_sweep_override()
    }
    return keys | {str(k) for k in OmegaConf.select(config, "hydra.sweeper.params") or {}}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --- the store -----------------------------------------------------------------------------------


def check_store(config: DictConfig, probe: bool = True) -> None:
    """The MLflow store usable, nothing made: a server answers within tracking.connect_timeout
    (`probe`), a sqlite store (or the folder it will be made in) takes a write."""
    from mlxlab.sweeps.callback import mlflow_settings
    from mlxlab.tracking.mlflow.server import probe_store
    from mlxlab.tracking.mlflow.store import check_writable

    settings = mlflow_settings(config)
    if settings is None:
        return
    if probe:
        probe_store(settings["uri"], settings["connect_timeout"], settings["request_timeout"])
    check_writable(settings["uri"])


def grid_start_lock(config: DictConfig) -> Path | None:
    """The lock two starts of one grid command take to find and continue its sweep in turn,
    named by the sweep's identity under `<root>/multirun/`; None untracked or with
    `sweep.fresh=true` (a new sweep shares nothing)."""
    from mlxlab.sweeps.callback import mlflow_settings
    from mlxlab.sweeps.identity import sweep_identity, wants_fresh

    settings = mlflow_settings(config)
    if settings is None or wants_fresh(config):
        return None
    root = Path(str(OmegaConf.select(config, "paths.root_dir")))
    return root / "multirun" / f".mlxlab_start_{sweep_identity(config, settings['uri'])}.lock"


def check_study_storage(config: DictConfig) -> None:
    """A search's Optuna storage opens (made if missing, under its lock) before the sweep's
    parent run exists: a corrupt optuna.db or a database that does not answer is one line and
    leaves nothing behind."""
    if OmegaConf.select(config, "hydra.sweeper.n_trials", default=None) is None:
        return
    from mlxlab.sweeps.callback import mlflow_settings
    from mlxlab.sweeps.search import study as S

    root = str(OmegaConf.select(config, "paths.root_dir"))
    settings = mlflow_settings(config)
    url = OmegaConf.select(config, "hydra.sweeper.storage", default=None) or S.default_storage(
        root, settings and settings["uri"]
    )
    with file_lock(S.lock_path(url, root), what=f"the Optuna storage {S._safe_url(url)}"):
        S.open_storage(url)


# --- the callbacks -------------------------------------------------------------------------------


class SweepChecks(Callback):
    """First of conf/hydra/default.yaml's callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: its config through config.validate before Hydra makes its run folder
        and the sweep callback the store (bad input leaves nothing behind); then the store."""
        # a background tracker's process is probed by train.py, through the tracker
        background = bool(OmegaConf.select(config, "tracking.background", default=False))
        try:
            check_run(config)
            check_store(config, probe=not background)
        except UserError as err:
            fail(str(err))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_settings(config)
            check_jobs(config)
            check_store(config)
            check_study_storage(config)
        except UserError as err:
            fail(str(err))
        if OmegaConf.select(config, "hydra.sweeper.n_trials", default=None):
            # a search's folder is shared by processes (the study's name names it)
            sweep_dir = sweep_dir_of(config.hydra)
            _start.enter_context(file_lock(sweep_dir / START_LOCK, what=f"the sweep {sweep_dir}"))
        else:
            # a grid's folder is new (its start stamp), but two starts of one command find the
            # same unfinished sweep: one at a time, the second sees it RUNNING (sweeps/callback.py)
            lock = grid_start_lock(config)
            if lock is not None:
                _start.enter_context(file_lock(lock, what="the sweep's start"))


class SweepStarted(Callback):
    """Last of conf/hydra/default.yaml's callbacks: the sweep has its parent run; the next
    sweeper of this folder may start."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _start.close()
