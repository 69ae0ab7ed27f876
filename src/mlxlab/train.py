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
    from mlxlab.training.remote import remote_resume

    resume = remote_resume(cfg, run_dir, prepare_resume)
    reuse_tokenizer(cfg, resume, "resume")
    reuse_tokenizer(cfg, first_teacher(cfg), "distillation")
    tracker = instantiate(cfg.tracking)
    data = instantiate(cfg.data)
    data.setup(run_dir)
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    trainer = instantiate(cfg.trainer)
    tags = {
        **choices,
        "mlxlab.config_hash": run_hash,
        "mlxlab.run_dir": str(run_dir),
        "mlxlab.task_name": cfg.task_name,
        **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()},
    }
    result = trainer.fit(model, data, tracker, run_dir, config=to_container(cfg), tags=tags,
                         resume=resume)
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"validation: {shown}")
    print(f"run dir:    {run_dir}")
    print(f"mlflow run: {result.run_id or '- (tracking=none)'}")
    return result.metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    from mlxlab.training.checkpoint import CheckpointError
    from mlxlab.training.remote import RemoteError
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
    except (TrainingError, CheckpointError, RemoteError, OSError, ValueError) as err:
        if sweeping:  # a failed trial is recorded as failed (NaN) and the sweep goes on
            log.error("trial failed: %s", err)
            return math.nan
        print(f"mlxlab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
