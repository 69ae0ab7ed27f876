"""One job of the Hydra app (a single run, or each job of a sweep): what drives its training
(one run, or an objective's rounds of child runs), and the failure policy around it. Bad input
the user can fix is one line and exit 2 (its run folder removed when the run left nothing in
it); in a sweep, a failed trial is recorded as failed (NaN) and the sweep goes on; a signal
leaves a checkpoint and the command that goes on; anything else is a bug: its traceback."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mlxlab.config import checked_parts, unwrapped
from mlxlab.errors import UserError
from mlxlab.launch.composing import composed
from mlxlab.launch.rounds import rounds_of, train_in_rounds
from mlxlab.runs import remove_unused_run_dir
from mlxlab.runs.command import leave_after_signal
from mlxlab.runtime import settings
from mlxlab.runtime.locks import FolderBusy, folder_lock, run_folder_busy
from mlxlab.runtime.supervision import failures, supervise
from mlxlab.sweeps.jobs import continue_job
from mlxlab.sweeps.search.trial_link import record_failure
from mlxlab.tracking.run_info import hydra_context
from mlxlab.training.trainer import TrainingInterrupted

log = logging.getLogger("mlxlab")

TrainOne = Callable[[DictConfig], dict[str, float]]
Driver = Callable[[DictConfig, TrainOne], dict[str, float]]


def one_run(cfg: DictConfig, train_one: TrainOne) -> dict[str, float]:
    return train_one(cfg)


def driver_for(cfg: DictConfig) -> Driver:
    """What drives the training of `cfg` with a function that trains one run: that run, or,
    when the objective's config asks for rounds (`objective.rounds` > 1), rounds of runs under
    a parent run (rounds.py). An objective.rounds that is no count is the objective's config
    check's to refuse, in the one run."""
    rounds = rounds_of(cfg)
    return train_in_rounds if isinstance(rounds, int) and rounds > 1 else one_run


def run_job(cfg: DictConfig, train: Callable[[DictConfig], dict[str, float]]) -> float:
    """Train `cfg` with `train` and return its optimized metric (NaN without one)."""
    composed()  # composing is over: errors from here on are the job's
    _, _, sweeping = hydra_context(cfg)
    supervise.set_sweeping(sweeping)  # a restart after running out of memory reruns the sweep
    try:
        if sweeping:  # a continued sweep: a finished job is kept, a killed one resumes
            kept = continue_job(cfg)
            if kept is not None:
                return kept
        # a constructor's own error (a bad size) as itself, not Hydra's report; one process
        # trains in a run folder at a time
        with unwrapped(), training_in(hydra_context(cfg)[0]):
            metrics = train(cfg)
        if cfg.optimized_metric not in metrics:  # e.g. streamed text with data.splits.val_examples=0
            log.warning("no %s to return: the run had no validation data", cfg.optimized_metric)
        return float(metrics.get(cfg.optimized_metric, math.nan))
    except TrainingInterrupted as stop:  # the hint: the command that goes on (runs/command.py)
        leave_after_signal(stop.checkpoint, stop.exit_code, stop.requeue)
    except UserError as err:  # bad input the user can fix; anything else is a bug: traceback
        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            record_failure(str(err))  # a search's trial: the reason on its Optuna trial
            failures.cleanup_done()  # its cleanup is over: a device failure's watchdog stands down
            return math.nan
        if not isinstance(err, FolderBusy):  # (the folder is the other process's)
            remove_unused_run_dir(cfg)
        # sys.exit, or os._exit after a device failure (MLX's teardown can hang then: mlx#2821)
        failures.leave(2, f"mlxlab: error: {err}")
    finally:
        checked_parts()  # the callback's parts are for this job only
    return math.nan  # (leave_after_signal and failures.leave exit)


def training_in(run_dir: Path) -> contextlib.AbstractContextManager:
    """The run folder's lock while this process trains in it: a second process given the same
    folder (hydra.run.dir=) would write its checkpoints over the first's. The ranks of a
    data-parallel run share theirs (mlx.launch, a Slurm step): no lock."""
    env = settings.current()
    if env.launched or env.slurm_step:
        return contextlib.nullcontext()
    return folder_lock(run_dir, run_folder_busy(run_dir))
