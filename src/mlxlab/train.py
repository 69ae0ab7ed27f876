"""mlxlab-train: compose the config, build the parts, wire them, return the optimized metric.

No training logic, file formats or MLflow calls live here: see docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from mlxlab.config import (
    check_group_choices,
    config_dir,
    config_hash,
    instantiate,
    to_container,
    unwrapped,
    validate,
)
from mlxlab.errors import ConfigError, UserError
from mlxlab.tracking.run_info import (
    run_name,
    run_tags,
    summary_lines,
    task_overrides,
    track_dataset,
)

if TYPE_CHECKING:
    from mlxlab.training.settings import CheckpointPolicy

log = logging.getLogger("mlxlab")


def seed_everything(seed: int) -> None:
    """Seed the run's own generators: MLX's (weights, dropout). Data shuffling and splits use
    numpy Generators seeded from the config. Python's and numpy's global generators are left
    alone: other code draws from them (MLflow picks run names from `random`)."""
    import mlx.core as mx

    mx.random.seed(seed)


def hydra_context(cfg: DictConfig) -> tuple[Path, dict[str, str], bool]:
    """The run folder, the chosen config-group options (as tags) and whether this is a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = Path(cfg.paths.output_dir)
    if not HydraConfig.initialized():
        return run_dir, {}, False
    hc = HydraConfig.get()
    from mlxlab.tracking.tags import CHOICE_PREFIX

    choices = {f"{CHOICE_PREFIX}{k}": str(v) for k, v in hc.runtime.choices.items()
               if not k.startswith("hydra")}
    return run_dir, choices, hc.mode == RunMode.MULTIRUN


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def build_tracker(cfg: DictConfig, name: str | None = None):
    """The `tracking` node's tracker (tracking/fanout.py builds MLflow, CSV or both, in a
    child process with tracking.background), named `name` or run_name(cfg) with the keys the
    sweep folder says are swept; in a multirun job, the sweep folder's parent run and job
    folder are handed to it (sweeps/folder.py reads them, here, once)."""
    from mlxlab.sweeps.folder import current_job, tracker_arguments

    job = current_job()
    swept = job.swept_keys if job is not None else ()
    named = {"run_name": name or run_name(cfg, swept)} if "run_name" in cfg.tracking else {}
    return instantiate(cfg.tracking, **named, **tracker_arguments(job, cfg.tracking))


def build_callbacks(cfg: DictConfig) -> tuple[list, CheckpointPolicy]:
    """The `callbacks` group's callbacks and, apart, the checkpoint policy
    (training/callbacks.py from_config); `eval.tasks` adds the task scoring
    (training/task_evaluation.py); a search's trial adds the reporter that feeds its pruner
    (search/pruning.py)."""
    from mlxlab.search.trial_link import current_trial
    from mlxlab.training.callbacks import from_config
    from mlxlab.training.task_evaluation import task_scoring

    callbacks, policy = from_config(cfg.get("callbacks"), instantiate)
    # evaluation tasks: one more evaluation, by a hook
    callbacks += task_scoring(instantiate(cfg.eval) if cfg.get("eval") else None)
    trial = current_trial()  # a search's job: which trial it trains
    if trial is not None:
        from mlxlab.search.pruning import TrialReporter

        reporter = TrialReporter(trial)
        reporter.name = "search_trial"
        callbacks.append(reporter)
    return callbacks, policy


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, train, and return the best validation metrics."""
    validate(cfg)
    from mlxlab.distill_rounds import rounds_of

    if rounds_of(cfg) > 1:
        return train_distill_rounds(cfg)
    run_dir, choices, _ = hydra_context(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    from mlxlab.runs import (
        first_teacher,
        keep_pretrained_files,
        load_teachers,
        prepare_resume,
        rebuild_from_checkpoint,
        record_resume,
        remote_resume,
        resumed_run_folder,
        reuse_tokenizer,
        use_pretrained_tokenizer,
    )
    from mlxlab.runtime import distributed, slurm
    from mlxlab.tracking.base import NullTracker
    from mlxlab.tracking.mlflow.stale import process_tags
    from mlxlab.tracking.tags import WORLD_SIZE
    from mlxlab.training.startup import prepare_device
    from mlxlab.training.trainer import Trainer

    settings = instantiate(cfg.trainer)  # TrainerSettings: checked by validate() above
    world = distributed.world(settings.distributed.mode, settings.distributed.timeout_s)
    if settings.requeue and not cfg.get("resume") and slurm.restarted():
        log.info("trainer.requeue: a requeued Slurm job: resume=auto")
        cfg.resume = "auto"
    callbacks, checkpointing = build_callbacks(cfg)
    resume = remote_resume(cfg.get("resume"), run_dir, checkpointing,
                           lambda: prepare_resume(cfg, run_dir))
    if resume is not None:  # what was trained, with what this command line names on top
        rebuild_from_checkpoint(cfg, resume, task_overrides())
        validate(cfg)
        settings = instantiate(cfg.trainer)
        record_resume(cfg, run_dir, resume)  # the run folder's config: what this run trains
    run_hash = config_hash(cfg)  # before the tokenizer paths below are filled in
    # the device line, and MLX's CUDA kernel cache in paths.cache_dir before any kernel compiles
    prepare_device(cfg.paths.cache_dir, settings.fused_kernels)
    seed_everything(cfg.seed)
    reuse_tokenizer(cfg, resume, "resume")
    reuse_tokenizer(cfg, first_teacher(cfg), "distillation")
    use_pretrained_tokenizer(cfg)
    tracker = NullTracker()  # ranks other than 0 track nothing
    if world.is_main:
        tracker = build_tracker(cfg)
        tracker.probe()  # a named store that does not answer fails here, before any training
    data = instantiate(cfg.data)
    if world.is_main:  # rank 0 writes the tokenizer (and data caches) first
        data.setup(run_dir)
        keep_pretrained_files(cfg, run_dir)
    # rank 0 may train a tokenizer or tokenize a table first, then the others read theirs: these
    # waits get the allowance of a first (compiling) step
    world.barrier("waiting for rank 0's data setup", scale=10.0)
    if not world.is_main:
        data.setup(None)
    world.check_same(str(data.tokenizer_hash), "the tokenizer",  # after the others' setup
                     "train it once (rank 0) and pass data.tokenizer.path=<its tokenizer.json>",
                     scale=10.0)
    track_dataset(tracker, data)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    config = to_container(cfg)
    config["num_parameters"] = count_parameters(model)
    log.info("model %s: %s parameters", cfg.model._target_.rsplit(".", 1)[-1],
             f"{config['num_parameters']:,}")
    trainer = Trainer(settings, optimizer=instantiate(cfg.optimizer), callbacks=callbacks,
                      load_teachers=load_teachers, checkpointing=checkpointing)
    resumed_from = resumed_run_folder(resume) if resume is not None else None
    tags = {**run_tags(cfg, choices, run_hash, run_dir, resumed_from, trial_tags()),
            **process_tags(), WORLD_SIZE: str(world.size)}
    result = trainer.fit(model, data, tracker, run_dir, config=config, tags=tags, resume=resume)
    if world.is_main:
        print("\n".join(summary_lines(result, tracker)))
    return result.metrics


def trial_tags() -> dict[str, str]:
    """A search's trial: its study and number on the run (none outside a search)."""
    from mlxlab.search.trial_link import current_trial

    trial = current_trial()
    return trial.tags() if trial is not None else {}


def train_distill_rounds(cfg: DictConfig) -> dict[str, float]:
    """trainer.distill.rounds > 1: one parent run, each round a child run (distill_rounds.py)."""
    from mlxlab.distill_rounds import train_rounds

    run_dir, choices, _ = hydra_context(cfg)
    name = run_name(cfg, swept_keys_of_this_job())
    parent = build_tracker(cfg, name)
    parent.probe()  # a store that does not answer fails here, before any manifest
    return train_rounds(cfg, train, parent, run_tags(cfg, choices, config_hash(cfg), run_dir), name)


def swept_keys_of_this_job() -> tuple[str, ...]:
    from mlxlab.sweeps.folder import current_job

    job = current_job()
    return job.swept_keys if job is not None else ()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from mlxlab.training.trainer import TrainingInterrupted

    _, _, sweeping = hydra_context(cfg)
    if sweeping:  # a continued sweep: a finished job is kept, a killed one resumes
        from mlxlab.sweeps.jobs import continue_job

        kept = continue_job(cfg)
        if kept is not None:
            return kept
    try:
        with unwrapped():  # a constructor's own error (a bad size) as itself, not Hydra's report
            metrics = train(cfg)
        if cfg.optimized_metric not in metrics:  # e.g. streamed text with data.splits.val_examples=0
            log.warning("no %s to return: the run had no validation data", cfg.optimized_metric)
        return float(metrics.get(cfg.optimized_metric, math.nan))
    except TrainingInterrupted as stop:
        from mlxlab.runs.command import stopped_hint

        log.error("%s", stopped_hint(stop.checkpoint, stop.exit_code))
        if stop.requeue:
            from mlxlab.runtime import slurm

            slurm.requeue()
        sys.exit(stop.exit_code)
    except UserError as err:  # bad input the user can fix; anything else is a bug: traceback
        from mlxlab.runtime import failures

        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            from mlxlab.search.trial_link import record_failure

            record_failure(str(err))  # a search's trial: the reason on its Optuna trial
            failures.cleanup_done()  # its cleanup is over: a device failure's watchdog stands down
            return math.nan
        from mlxlab.runs import remove_unused_run_dir

        remove_unused_run_dir(cfg)
        # sys.exit, or os._exit after a device failure (MLX's teardown can hang then: mlx#2821)
        failures.leave(2, f"mlxlab: error: {err}")


def main() -> None:
    """mlxlab-train / `mlxlab train`: the group choices checked first, then the Hydra app."""
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as err:
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    from mlxlab.tracking.mlflow import background

    if background.tracks_in_a_child(sys.argv[1:]):
        background.prestart()  # its imports overlap Hydra's composing and ours
    hydra_main()


if __name__ == "__main__":
    main()
