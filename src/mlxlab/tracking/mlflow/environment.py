"""MLflow's own environment variables: the settings MLflow takes only from the environment, and
the one it changes itself. mlxlab's variables are read in runtime/settings.py; these are not
mlxlab's, so they are read and set here, when MLflow reads them.

- MLFLOW_TRACKING_URI: MLflow's default store, which mlxlab's default follows (`tracking_uri`);
  `mlflow.set_tracking_uri` sets it while the process runs, so it is read at each use.
- MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT (server.bounded_http) and
  MLFLOW_ALLOW_FILE_STORE (merge.py), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR (evaluation/run_scores.py):
  set for the length of a call (`set_for_the_call`).
- MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI: put back as they were after `mlflow.set_*_uri`
  pointed MLflow at a store for a moment (runs/registered.py's `pointed_at`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping

# One process environment for every thread: a call that sets it holds this until it put the
# values back, so two threads never restore each other's values mid-call (calls may nest).
_LOCK = threading.RLock()


def tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI as it is now (None when unset or empty)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


@contextlib.contextmanager
def set_for_the_call(values: Mapping[str, str], keep: Iterable[str] = ()) -> Iterator[None]:
    """`values` set in the environment for the block; after it, they and the `keep` names
    (variables the block may change: mlflow.set_tracking_uri sets one) are as they were."""
    names = {*values, *keep}
    with _LOCK:
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update(values)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
