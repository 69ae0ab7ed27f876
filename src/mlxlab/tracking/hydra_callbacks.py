"""Old name of tracking/mlflow/hydra_callbacks.py, kept for configs written before the move: a
user's own hydra config (a copy of conf/hydra/default.yaml in a `--config-dir`) or a queued
launcher job may still name `mlxlab.tracking.hydra_callbacks.MlflowSweepCallback`. Nothing in
mlxlab imports this module."""

from mlxlab.tracking.mlflow.hydra_callbacks import MlflowSweepCallback  # noqa: F401
