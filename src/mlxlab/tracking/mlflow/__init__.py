"""MLflow tracking against one central store: a sqlite file (default) or a tracking server.

Every run, sweep job and worker logs to the same store. A module per job:

- store: where the store is (`resolve_uri`, `sqlite_path`) and creating it (`ensure_store`);
- server: a tracking server that may not answer (`probe_store`, `bounded_http`);
- calls: calling it (`retrying` while sqlite is locked, `chunks` within batch limits);
- tracker: `MlflowTracker`, the Tracker of docs/architecture.md;
- sweeps: queries over a sweep's runs and finished runs (`sweep_table`, `find_finished_run`).

mlflow is imported inside functions: its first import costs seconds, and `tracking=none`
runs should not pay it. This __init__ names the public parts, so `mlxlab.tracking.mlflow.X`
(and conf/tracking/mlflow.yaml's `_target_`) reach them as before the split.
"""

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow.calls import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    MAX_TAGS_PER_BATCH,
    RETRY_ATTEMPTS,
    chunks,
    retrying,
)
from mlxlab.tracking.mlflow.server import TrackingUnavailable, bounded_http, probe_store
from mlxlab.tracking.mlflow.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    default_store_uri,
    ensure_store,
    resolve_uri,
    sqlite_path,
    store_template_path,
    tracked_store,
)
from mlxlab.tracking.mlflow.sweeps import (
    find_finished_run,
    find_sweep_parent,
    finished_run_metrics,
    metric_mode,
    run_value,
    sweep_children,
    sweep_table,
    swept_keys,
)
from mlxlab.tracking.mlflow.tracker import STATUSES, MlflowTracker

# Tag names live in tracking/tags.py; these aliases keep this package's older names importable.
PARENT_RUN_TAG = T.PARENT_RUN
SWEEP_ID_TAG = T.SWEEP_ID
ROLE_TAG = T.ROLE
SWEEP_PARAMS_TAG = T.SWEEP_PARAMS
CONFIG_HASH_TAG = T.CONFIG_HASH
RUN_DIR_TAG = T.RUN_DIR
METRIC_TAG = T.OPTIMIZED_METRIC
MODE_TAG = T.OPTIMIZED_MODE

__all__ = [
    "CONFIG_HASH_TAG", "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "MAX_TAGS_PER_BATCH",
    "METRIC_TAG", "MODE_TAG", "PARENT_RUN_TAG", "RETRY_ATTEMPTS", "ROLE_TAG", "RUN_DIR_TAG",
    "STATUSES", "SWEEP_ID_TAG", "SWEEP_PARAMS_TAG", "MlflowTracker",
    "TrackingUnavailable", "bounded_http", "chunks", "default_store_uri", "ensure_store",
    "find_finished_run", "find_sweep_parent", "finished_run_metrics", "metric_mode",
    "probe_store", "resolve_uri", "retrying", "run_value", "sqlite_path", "store_template_path",
    "sweep_children", "sweep_table", "swept_keys", "tracked_store",
]
