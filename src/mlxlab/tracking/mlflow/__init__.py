"""MLflow tracking against one central store: a sqlite file (default) or a tracking server.

Every run, sweep job and worker logs to the same store. Everything that only makes sense for
MLflow lives here, a module per job:

- store: where the store is (`resolve_uri`, `sqlite_path`), creating it (`ensure_store`) and
  whether a `tracking` node builds an MLflow tracker (`builds_mlflow`, `tracked_store`);
- server: a tracking server that may not answer (`probe_store`, `bounded_http`);
- calls: calling it (`retrying` while sqlite is locked, `chunks` within batch limits);
- tracker: `MlflowTracker`, the Tracker of docs/architecture.md;
- offline: the metrics a run could not send while the server was away (a spool, sent later);
- rewind: a resumed run's metric history cut back to its checkpoint (sqlite);
- stale: runs left RUNNING by a process that died, marked KILLED;
- background: the tracker in a child process (`tracking.background`);
- merge: `mlxlab runs merge`, other stores copied into this one.

Modules here import their siblings, never this __init__ (so none of them closes a loop through
it). mlflow itself is imported inside functions: its first import costs seconds, and
`tracking=none` runs should not pay it. This __init__ names the public parts of the light
modules, so `mlxlab.tracking.mlflow.X` (and conf/tracking/mlflow.yaml's `_target_`) reach them.
Tag names are tracking/tags.py's, and only there.
"""

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
    builds_mlflow,
    default_store_uri,
    ensure_store,
    resolve_uri,
    sqlite_path,
    store_template_path,
    tracked_store,
)
from mlxlab.tracking.mlflow.tracker import STATUSES, MlflowTracker

__all__ = [
    "EXPERIMENT_KIND", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "MAX_TAGS_PER_BATCH",
    "RETRY_ATTEMPTS", "STATUSES", "MlflowTracker", "TrackingUnavailable", "bounded_http",
    "builds_mlflow", "chunks", "default_store_uri", "ensure_store",
    "probe_store", "resolve_uri", "retrying",
    "sqlite_path", "store_template_path",
    "tracked_store",
]
