"""mlxlab-train: compose the config, build the parts, wire them, return the optimized metric.

No training logic, file formats or MLflow calls live here: see docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mlxlab.errors import ConfigError, UserError

# Hydra, the config and the tracking helpers are imported where they are used: `mlxlab-train`'s
# supervising parent runs this module's main() and must start its child without them (~0.8 s of
# wall time on a loaded 2-core machine, docs/benchmarks.md)
if TYPE_CHECKING:
    from pathlib import Path

    from omegaconf import DictConfig

    from mlxlab.training.settings import CheckpointPolicy

log = logging.getLogger("mlxlab")


def seed_everything(seed: int) -> None:
    """Seed the run's own generators: MLX's (weights, dropout). Data shuffling and splits use
    numpy Generators seeded from the config. Python's and numpy's global generators are left
    alone: other code draws from them (MLflow picks run names from `random`)."""
    import mlx.core as mx

    mx.random.seed(seed)


def build_tracker(cfg: DictConfig, name: str | None = None):
    """The `tracking` node's tracker (tracking/fanout.py builds MLflow, CSV or both, in a
    child process with tracking.background), named `name` or run_name(cfg) with the keys the
    sweep folder says are swept; in a multirun job, the sweep folder's parent run and job
    folder are handed to it (sweeps/folder.py reads them, here, once)."""
    from mlxlab.config import instantiate
    from mlxlab.sweeps.folder import current_job, swept_keys_here, tracker_arguments
    from mlxlab.tracking.run_info import run_name

    named = {"run_name": name or run_name(cfg, swept_keys_here())} if "run_name" in cfg.tracking \
        else {}
    return instantiate(cfg.tracking, **named, **tracker_arguments(current_job(), cfg.tracking))


def build_callbacks(cfg: DictConfig) -> tuple[list, CheckpointPolicy]:
    """The `callbacks` group's callbacks and, apart, the checkpoint policy; `eval.tasks` adds
    the task scoring; a search's trial, the reporter that feeds its pruner (sweeps/search/pruning.py)."""
    from mlxlab.config import instantiate
    from mlxlab.sweeps.search.trial_link import current_trial
    from mlxlab.training.callbacks import from_config
    from mlxlab.training.memory_watch import StepMark, SystemMemory
    from mlxlab.training.task_evaluation import task_scoring

    callbacks, policy = from_config(cfg.get("callbacks"), instantiate, cfg.get("checkpoint"))
    # evaluation tasks: one more evaluation, by a hook
    callbacks += task_scoring(instantiate(cfg.eval) if cfg.get("eval") else None)
    # memory under system/ in the tracker; each step for a supervising parent (runtime/supervise.py)
    callbacks += [SystemMemory(), StepMark()]
    trial = current_trial()  # a search's job: which trial it trains
    if trial is not None:
        from mlxlab.sweeps.search.pruning import TrialReporter

        reporter = TrialReporter(trial)
        reporter.name = "search_trial"
        callbacks.append(reporter)
    return callbacks, policy


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, train, and return the best validation metrics."""
    from mlxlab.config import (
        config_hash,
        instantiate,
        to_container,
        validate,
        validated_before_run,
    )
    from mlxlab.tracking.run_info import hydra_context, run_tags, summary_lines, track_dataset

    if not validated_before_run():  # (the Hydra app's run: its callback did, sweeps/checks.py)
        validate(cfg)
    from mlxlab.distill_rounds import rounds_of
    from mlxlab.models.sources import source_of, source_tags

    # the model the user named, as a local folder (a hub download, a GGUF conversion), or one
    # line saying why not: before the run folder or tracking exist
    model_source = source_of(cfg.model)

    if rounds_of(cfg) > 1:
        return train_distill_rounds(cfg)
    run_dir, choices, _ = hydra_context(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    from mlxlab.models import num_parameters
    from mlxlab.runs import choose_tokenizer, keep_pretrained_files
    from mlxlab.runs.resume import resolve_resume, resumed_run_folder
    from mlxlab.runtime import distributed
    from mlxlab.tracking.base import NullTracker
    from mlxlab.tracking.mlflow.stale import process_tags
    from mlxlab.tracking.tags import WORLD_SIZE
    from mlxlab.training.startup import prepare_device, setup_data
    from mlxlab.training.trainer import Trainer

    settings = instantiate(cfg.trainer)  # TrainerSettings: checked by validate() above
    world = distributed.world(settings.distributed.mode, settings.distributed.timeout_s)
    callbacks, checkpointing = build_callbacks(cfg)
    resume = resolve_resume(cfg, run_dir, checkpointing, settings.requeue)  # runs/resume.py
    if resume is not None:  # cfg is now what the checkpoint trained, the command line on top
        settings = instantiate(cfg.trainer)
    run_hash = config_hash(cfg)  # before the tokenizer paths below are filled in
    # the device line, and MLX's CUDA kernel cache in paths.cache_dir before any kernel compiles
    prepare_device(cfg.paths.cache_dir, settings.fused_kernels)
    seed_everything(cfg.seed)
    choose_tokenizer(cfg, resume)  # a resumed run's, a teacher's or model.pretrained's
    tracker = NullTracker()  # ranks other than 0 track nothing
    if world.is_main:
        tracker = build_tracker(cfg)
        tracker.probe()  # a named store that does not answer fails here, before any training
    data = instantiate(cfg.data)
    setup_data(data, world, run_dir)  # rank 0 first (the tokenizer, data caches), then the rest
    if world.is_main:
        keep_pretrained_files(cfg, run_dir)
    track_dataset(tracker, data)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    config = to_container(cfg)
    config["num_parameters"] = num_parameters(model)
    log.info("model %s: %s parameters", cfg.model._target_.rsplit(".", 1)[-1],
             f"{config['num_parameters']:,}")
    trainer = Trainer(settings, optimizer=instantiate(cfg.optimizer), callbacks=callbacks,
                      checkpointing=checkpointing, objective=instantiate(cfg.objective))
    resumed_from = resumed_run_folder(resume) if resume is not None else None
    tags = {**run_tags(cfg, choices, run_hash, run_dir, resumed_from, trial_tags()),
            **process_tags(), **source_tags(model_source), WORLD_SIZE: str(world.size)}
    result = trainer.fit(model, data, tracker, run_dir, config=config, tags=tags, resume=resume)
    if world.is_main:
        print("\n".join(summary_lines(result, tracker)))
    return result.metrics


def trial_tags() -> dict[str, str]:
    """A search's trial: its study and number on the run (none outside a search)."""
    from mlxlab.sweeps.search.trial_link import current_trial

    trial = current_trial()
    return trial.tags() if trial is not None else {}


def train_distill_rounds(cfg: DictConfig) -> dict[str, float]:
    """objective.rounds > 1: one parent run, each round a child run (distill_rounds.py)."""
    from mlxlab.config import config_hash
    from mlxlab.distill_rounds import train_rounds
    from mlxlab.tracking.run_info import hydra_context, run_name, run_tags

    run_dir, choices, _ = hydra_context(cfg)
    from mlxlab.sweeps.folder import swept_keys_here

    name = run_name(cfg, swept_keys_here())
    parent = build_tracker(cfg, name)
    parent.probe()  # a store that does not answer fails here, before any manifest
    return train_rounds(cfg, train, parent, run_tags(cfg, choices, config_hash(cfg), run_dir), name)


def hydra_main() -> None:
    """The Hydra app: composes the config from sys.argv and runs `hydra_job` (one run, or each
    job of a sweep)."""
    import hydra

    from mlxlab.config import config_dir

    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(hydra_job)()


def hydra_job(cfg: DictConfig) -> float:
    from mlxlab.config import unwrapped
    from mlxlab.runtime import supervise
    from mlxlab.tracking.run_info import hydra_context
    from mlxlab.training.trainer import TrainingInterrupted

    composed()  # composing is over: errors from here on are the job's
    _, _, sweeping = hydra_context(cfg)
    supervise.set_sweeping(sweeping)  # a restart after running out of memory reruns the sweep
    try:
        if sweeping:  # a continued sweep: a finished job is kept, a killed one resumes
            from mlxlab.sweeps.jobs import continue_job

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
        from mlxlab.runs.command import leave_after_signal

        leave_after_signal(stop.checkpoint, stop.exit_code, stop.requeue)
    except UserError as err:  # bad input the user can fix; anything else is a bug: traceback
        from mlxlab.runtime import failures

        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            from mlxlab.sweeps.search.trial_link import record_failure

            record_failure(str(err))  # a search's trial: the reason on its Optuna trial
            failures.cleanup_done()  # its cleanup is over: a device failure's watchdog stands down
            return math.nan
        from mlxlab.runs import remove_unused_run_dir
        from mlxlab.runtime.locks import FolderBusy

        if not isinstance(err, FolderBusy):  # (the folder is the other process's)
            remove_unused_run_dir(cfg)
        # sys.exit, or os._exit after a device failure (MLX's teardown can hang then: mlx#2821)
        failures.leave(2, f"mlxlab: error: {err}")
    finally:
        from mlxlab.config import validated_before_run

        validated_before_run(False)  # for this job only


def training_in(run_dir: Path) -> contextlib.AbstractContextManager:
    """The run folder's lock while this process trains in it: a second process given the same
    folder (hydra.run.dir=) would write its checkpoints over the first's. The ranks of a
    data-parallel run share theirs (mlx.launch, a Slurm step): no lock."""
    from mlxlab.runtime import settings
    from mlxlab.runtime.locks import folder_lock, run_folder_busy

    env = settings.current()
    if env.launched or env.slurm_step:
        return contextlib.nullcontext()
    return folder_lock(run_dir, run_folder_busy(run_dir))


def check_misplaced_keys(argv: list[str]) -> None:
    """A key where the run has none is one line naming the key meant, not Hydra's multi-line
    "Key 'beta' is not in struct" (exit 1): `trainer.beta=0.3` (the objective's: objective.beta),
    `objective.label_smoothing=0.1` under objective=grpo (a setting of other objectives).
    Old spellings (trainer.preference.beta) are config.check_moved's."""
    from mlxlab.config import chosen_objective, group_options, objective_keys

    def takers(name: str) -> str:
        return "|".join(o for o in group_options("objective") if name in (objective_keys(o) or ()))

    for arg in argv:
        key, eq, value = arg.partition("=")
        group, dot, name = key.partition(".")
        if not (eq and dot and name) or "." in name or group not in ("trainer", "objective"):
            continue  # (+key= adds a key on purpose: its class says whether it takes it)
        if group == "trainer" and takers(name) and name not in trainer_keys():
            raise ConfigError(f"{key} is not a key of trainer: did you mean objective.{name}="
                              f"{value}? (a setting of objective={takers(name)})")
        chosen = chosen_objective(argv) if group == "objective" else None
        keys = objective_keys(chosen) if chosen else None
        if keys is not None and name not in keys:
            where = (f"a setting of objective={takers(name)}" if takers(name)
                     else f"it takes {sorted(keys)}")
            raise ConfigError(f"{key} is not a setting of objective={chosen} ({where}): drop it, "
                              "or choose the objective it belongs to")


# Hydra reports an error of its own (a key the config lacks) in several lines, with a hint about
# HYDRA_FULL_ERROR; with that variable set while it composes, the error reaches `composing`,
# which words it as one line. The job itself runs under Hydra's own reporting again.
FULL_ERROR = "HYDRA_FULL_ERROR"
_full_error_was: list[str | None] = []


@contextlib.contextmanager
def composing() -> Iterator[None]:
    """Run the Hydra app with its composition errors raised here: an override of a key the
    config does not have is a ConfigError naming the nearest key (`trainer.max_epoch=3`: did
    you mean trainer.max_epochs?); a malformed override, its first line."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    _full_error_was[:] = [os.environ.get(FULL_ERROR)]
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    except ConfigCompositionException as err:
        raise ConfigError(unknown_key_line(err)) from None
    except OverrideParseException as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"an override does not parse ({first}): write key=value, quoting a "
                          "value with spaces or brackets, e.g. 'key=[1,2]'") from None
    finally:
        composed()


def composed() -> None:
    """HYDRA_FULL_ERROR as the user had it (the job's errors are Hydra's to report)."""
    if _full_error_was:
        was = _full_error_was.pop()
        if was is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = was


def unknown_key_line(err: Exception) -> str:
    """One line for Hydra's composition error: a key the config does not have, with the nearest
    key of its node (OmegaConf's error holds the node); anything else, Hydra's first line."""
    import difflib

    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    first = str(err).strip().splitlines()[0]
    cause = err.__cause__
    if not isinstance(cause, OmegaConfBaseException):
        return first
    try:  # set where OmegaConf raised it with the key's place (a key missing from a node)
        key, node = cause.full_key, cause.parent_node
    except AttributeError:
        return first
    if not key or not isinstance(node, DictConfig):
        return first
    parent, _, name = str(key).rpartition(".")
    keys = [str(k) for k in node if not str(k).startswith("_") and str(k) != "hydra"]
    where = f"of {parent}" if parent else "of the config"
    near = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    full = f"{parent}.{near[0]}" if parent and near else (near[0] if near else "")
    fix = (f"did you mean {full}?" if near else f"it has {sorted(keys)}")
    return (f"{key} is not a key {where}: {fix} (a new key is added with +{key}=...)")


def trainer_keys() -> set[str]:
    from dataclasses import fields

    from mlxlab.training.settings import TrainerSettings  # only for a trainer.<key> override

    return {f.name for f in fields(TrainerSettings)}


def main(supervised: bool = True) -> None:
    """mlxlab-train / `mlxlab train`: the group choices checked first, then the Hydra app, in a
    child process under a parent that restarts it at half the micro-batch when it runs out of
    memory (runtime/supervise.py); `python -m mlxlab.train` (that child) trains in-process."""
    from mlxlab.runtime import supervise

    if supervised and supervise.wanted():  # the child checks, composes and trains
        sys.exit(supervise.main(sys.argv[1:]))
    from mlxlab.config import check_group_choices

    try:
        check_group_choices(sys.argv[1:])
        check_misplaced_keys(sys.argv[1:])
    except ConfigError as err:
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    supervise.as_typed()  # a supervised child: the entry point the user typed, for the tags
    from mlxlab.tracking.mlflow import background

    if background.tracks_in_a_child(sys.argv[1:]):
        background.prestart()  # its imports overlap Hydra's composing and ours
    try:
        with composing():
            hydra_main()
    except UserError as err:  # an override Hydra could not compose, as one line
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    sweeps = sys.modules.get("mlxlab.sweeps.callback")  # loaded: a multirun's callback ran
    failure = sweeps.sweep_failure() if sweeps is not None else None
    if failure:  # a sweep whose parent did not finish does not exit 0 (issue 59)
        print(f"mlxlab: error: {failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(supervised=False)
