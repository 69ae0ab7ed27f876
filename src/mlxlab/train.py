"""mlxlab-train: compose the config, build the parts, wire them, return the optimized metric.

`train_run(cfg)` is the wiring of one run, `train(cfg)` hands it to what drives the run
(launch/app.py's driver_for: that run, or an objective's rounds of them); `main` the entry point
(launch/: the command line, the Hydra app, the failure policy). No training logic, file formats
or MLflow calls live here: see docs/architecture.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("mlxlab")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train `cfg` as its config asks (launch/app.py's driver_for: this one run, or rounds of
    child runs under a parent run) and return the best validation metrics."""
    from mlxlab.launch.app import driver_for

    return driver_for(cfg)(cfg, train_run)


def train_run(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, train one run, and return its best validation metrics."""
    # the training process's imports: `mlxlab-train`'s supervising parent imports this module
    # for main() and starts its child without them (launch/entry.py)
    from mlxlab.config import checked_parts, config_hash, instantiate, to_container, validate
    from mlxlab.launch.resume import record_resume, resolve_resume, validate_resumed
    from mlxlab.launch.wiring import build_callbacks, build_tracker, seed_everything, trial_tags
    from mlxlab.models import num_parameters
    from mlxlab.models.sources import source_of, source_tags
    from mlxlab.runs import choose_tokenizer, keep_pretrained_files
    from mlxlab.runs.resume import resumed_run_folder
    from mlxlab.runtime.cluster import distributed
    from mlxlab.tracking.base import NullTracker
    from mlxlab.tracking.mlflow.stale import process_tags
    from mlxlab.tracking.run_info import hydra_context, run_tags, summary_lines, track_dataset
    from mlxlab.tracking.tags import WORLD_SIZE
    from mlxlab.training.startup import prepare_device, setup_data
    from mlxlab.training.trainer import Trainer

    parts = checked_parts() or validate(cfg)  # the Hydra app's run: its callback validated
    # the model the user named, as a local folder (a hub download, a GGUF conversion), or one
    # line saying why not: before the run folder or tracking exist
    model_source = source_of(cfg.model)
    run_dir, choices, _ = hydra_context(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = parts.build(cfg.trainer)  # TrainerSettings
    world = distributed.world(settings.distributed.mode, settings.distributed.timeout_s)
    callbacks, checkpointing = build_callbacks(cfg, parts.build)
    # the resume source, and the config it trains: the checkpoint's, the command line on top
    resume, cfg = resolve_resume(cfg, run_dir, checkpointing, settings.requeue)
    if resume is not None:  # checked as the command line's was, then the run folder says so
        settings = validate_resumed(cfg, resume, parts).build(cfg.trainer)
        record_resume(cfg, run_dir, resume)
    run_hash = config_hash(cfg)  # before the tokenizer paths below are filled in
    # the device line, and MLX's CUDA kernel cache in paths.cache_dir before any kernel compiles
    prepare_device(cfg.paths.cache_dir, settings.fused_kernels)
    seed_everything(cfg.seed)
    choose_tokenizer(cfg, resume)  # a resumed run's, a teacher's or model.pretrained's
    tracker = NullTracker()  # ranks other than 0 track nothing
    if world.is_main:
        tracker = build_tracker(cfg)
        tracker.probe()  # a named store that does not answer fails here, before any training
    data = parts.build(cfg.data)  # (built again when the tokenizer path was filled in above)
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
                      checkpointing=checkpointing, objective=parts.build(cfg.objective))
    resumed_from = resumed_run_folder(resume) if resume is not None else None
    tags = {**run_tags(cfg, choices, run_hash, run_dir, resumed_from, trial_tags()),
            **process_tags(), **source_tags(model_source), WORLD_SIZE: str(world.size)}
    result = trainer.fit(model, data, tracker, run_dir, config=config, tags=tags, resume=resume)
    if world.is_main:
        print("\n".join(summary_lines(result, tracker)))
    return result.metrics


def job(cfg: DictConfig) -> float:
    """One job of the Hydra app (launch/app.py): `train(cfg)` under the failure policy. Hydra
    names the app after this function's module: `train` (its log file, train.log)."""
    from mlxlab.data.streaming import source
    from mlxlab.launch.app import run_job

    source.leave_out_torch()  # a training process: its text streams never import PyTorch
    return run_job(cfg, train)


def main(supervised: bool = True) -> None:
    """mlxlab-train / `mlxlab train` (launch/entry.py); `python -m mlxlab.train` (the
    supervised child) trains in-process."""
    from mlxlab.launch.entry import main as launch

    launch(job, supervised)


if __name__ == "__main__":
    main(supervised=False)
