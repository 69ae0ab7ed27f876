"""sweep.skip_finished: a finished run of this very config (its config hash) in the tracking
store, and the metric it returned."""

from __future__ import annotations

from omegaconf import DictConfig

from mlxlab.config import config_hash
from mlxlab.sweeps.store import find_finished_run
from mlxlab.tracking.mlflow import tracked_store


def finished_metric(cfg: DictConfig) -> float | None:
    """For sweep.skip_finished: the metric of a finished run with this config hash, if any
    (mlflow itself is imported by the lookup, when asked)."""
    uri = tracked_store(cfg.tracking)
    if uri is None:
        return None
    run = find_finished_run(uri, cfg.tracking.experiment_name, config_hash(cfg))
    if run is None:
        return None
    metrics = run.data.metrics
    return float(metrics.get(f"best/{cfg.optimized_metric}",
                             metrics.get(cfg.optimized_metric, float("nan"))))
