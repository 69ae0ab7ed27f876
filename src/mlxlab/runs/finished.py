"""sweep.skip_finished: a finished run of this very config (its config hash) in the tracking
store, and the metric it returned."""

from __future__ import annotations

from omegaconf import DictConfig


def finished_metric(cfg: DictConfig) -> float | None:
    """For sweep.skip_finished: the metric of a finished run with this config hash, if any."""
    from mlxlab.config import config_hash
    from mlxlab.tracking.mlflow import find_finished_run  # mlflow only when asked

    if "uri" not in cfg.tracking:
        return None
    run = find_finished_run(cfg.tracking.uri, cfg.tracking.experiment_name, config_hash(cfg))
    if run is None:
        return None
    metrics = run.data.metrics
    return float(metrics.get(f"best/{cfg.optimized_metric}",
                             metrics.get(cfg.optimized_metric, float("nan"))))
