"""mlxlab-train: compose the config, build the parts, wire them, return the optimized metric.

No training logic, file formats or MLflow calls live here: see docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from pathlib import Path

import hydra
import numpy as np
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from mlxlab.config import config_dir, config_hash, instantiate, to_container, validate

log = logging.getLogger("mlxlab")


def seed_everything(seed: int) -> None:
    import mlx.core as mx

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def hydra_context(cfg: DictConfig) -> tuple[Path, dict[str, str], bool]:
    """The run folder, the chosen config-group options (as tags) and whether this is a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    run_dir = Path(cfg.paths.output_dir)
    if not HydraConfig.initialized():
        return run_dir, {}, False
    hc = HydraConfig.get()
    choices = {f"choice.{k}": str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    return run_dir, choices, hc.mode == RunMode.MULTIRUN


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, train, and return the best validation metrics."""
    validate(cfg)
    run_hash = config_hash(cfg)  # before the tokenizer paths below are filled in
    seed_everything(cfg.seed)
    run_dir, choices, _ = hydra_context(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    from mlxlab.runs import first_teacher, prepare_resume, reuse_tokenizer
    from mlxlab.runtime import distributed
    from mlxlab.tracking.base import NullTracker

    world = distributed.world(cfg.trainer.get("distributed", "auto"),
                              cfg.trainer.get("distributed_timeout_s", 30.0))
    resume = prepare_resume(cfg, run_dir)
    reuse_tokenizer(cfg, resume, "resume")
    reuse_tokenizer(cfg, first_teacher(cfg), "distillation")
    tracker = instantiate(cfg.tracking) if world.is_main else NullTracker()  # rank 0 tracks
    data = instantiate(cfg.data)
    if world.is_main:  # rank 0 writes the tokenizer (and data caches) first
        data.setup(run_dir)
    world.barrier("waiting for rank 0's data setup")
    if not world.is_main:
        data.setup(None)
    world.check_same(str(data.tokenizer_hash), "the tokenizer",
                     "train it once (rank 0) and pass data.tokenizer.path=<its tokenizer.json>")
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    trainer = instantiate(cfg.trainer)
    tags = {
        **choices,
        "mlxlab.config_hash": run_hash,
        "mlxlab.run_dir": str(run_dir),
        "mlxlab.task_name": cfg.task_name,
        "mlxlab.world_size": str(world.size),
        **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
    }
    result = trainer.fit(model, data, tracker, run_dir, config=to_container(cfg), tags=tags,
                         resume=resume)
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    if not world.is_main:
        return result.metrics
    print(f"validation: {shown}")
    print(f"run dir:    {run_dir}")
    print(f"mlflow run: {result.run_id or '- (tracking=none)'}")
    return result.metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    from mlxlab.training.checkpoint import CheckpointError
    from mlxlab.training.trainer import TrainingError, TrainingInterrupted

    _, _, sweeping = hydra_context(cfg)
    if cfg.get("sweep", {}).get("skip_finished") and sweeping:
        from mlxlab.runs import finished_metric

        done = finished_metric(cfg)
        if done is not None:
            log.info("skip_finished: this config already has a finished run; skipping")
            return done
    try:
        try:
            return float(train(cfg)[cfg.optimized_metric])
        except InstantiationException as wrapped:  # a constructor's own error, e.g. a bad size
            raise (wrapped.__cause__ or wrapped) from None
    except TrainingInterrupted as stop:
        log.error("stopped by signal; checkpoint: %s (resume with resume=auto)", stop.checkpoint)
        sys.exit(stop.exit_code)
    except (TrainingError, CheckpointError, OSError, ValueError) as err:
        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            return math.nan
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
