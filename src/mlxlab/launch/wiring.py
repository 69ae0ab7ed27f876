"""The parts of one run that come from the config but are no single node: the tracker (named,
in a sweep's folder), the callbacks with the checkpoint policy apart, the seed, a search
trial's tags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from omegaconf import DictConfig

from mlxlab.config import instantiate
from mlxlab.evaluation.in_training import task_scoring
from mlxlab.sweeps.folder import current_job, swept_keys_here, tracker_arguments
from mlxlab.sweeps.search.pruning import TrialReporter
from mlxlab.sweeps.search.trial_link import current_trial
from mlxlab.tracking.run_info import run_name
from mlxlab.training.callbacks import from_config
from mlxlab.training.memory_watch import StepMark, SystemMemory
from mlxlab.training.settings import CheckpointPolicy


def seed_everything(seed: int) -> None:
    """Seed the run's own generators: MLX's (weights, dropout). Data shuffling and splits use
    numpy Generators seeded from the config. Python's and numpy's global generators are left
    alone: other code draws from them (MLflow picks run names from `random`)."""
    mx.random.seed(seed)


def build_tracker(cfg: DictConfig, name: str | None = None):
    """The `tracking` node's tracker (tracking/fanout.py builds MLflow, CSV or both, in a
    child process with tracking.background), named `name` or run_name(cfg) with the keys the
    sweep folder says are swept; in a multirun job, the sweep folder's parent run and job
    folder are handed to it (sweeps/folder.py reads them, here, once)."""
    named = {"run_name": name or run_name(cfg, swept_keys_here())} if "run_name" in cfg.tracking \
        else {}
    return instantiate(cfg.tracking, **named, **tracker_arguments(current_job(), cfg.tracking))


def build_callbacks(cfg: DictConfig, build: Callable[[Any], Any] = instantiate
                    ) -> tuple[list, CheckpointPolicy]:
    """The `callbacks` group's callbacks and, apart, the checkpoint policy; `eval.tasks` adds
    the task scoring; a search's trial, the reporter that feeds its pruner
    (sweeps/search/pruning.py). `build` makes each node (config.Parts.build: the ones validation
    built already are not built again)."""
    callbacks, policy = from_config(cfg.get("callbacks"), build, cfg.get("checkpoint"))
    # evaluation tasks: one more evaluation, by a hook
    callbacks += task_scoring(build(cfg.eval) if cfg.get("eval") else None)
    # memory under system/ in the tracker; each step for a supervising parent (runtime/supervision/supervise.py)
    callbacks += [SystemMemory(), StepMark()]
    trial = current_trial()  # a search's job: which trial it trains
    if trial is not None:
        reporter = TrialReporter(trial)
        reporter.name = "search_trial"
        callbacks.append(reporter)
    return callbacks, policy


def trial_tags() -> dict[str, str]:
    """A search's trial: its study and number on the run (none outside a search)."""
    trial = current_trial()
    return trial.tags() if trial is not None else {}


