"""Experiment tracking: the Tracker interface, a no-op tracker, and MLflow (imported lazily)."""

from mlxlab.tracking.base import NullTracker, Tracker, flatten_config

__all__ = ["NullTracker", "Tracker", "flatten_config"]
