"""A registered model's run: `models:/NAME@ALIAS` or `models:/NAME/VERSION` (as `mlxlab register`
writes them) back to the run folder it was logged from, for what takes a run where a registry
name may stand (`mlxlab serve`, a learned reward in GRPO: runs/learned_reward.py). MLflow is
imported by the functions that use it (~4 s), never by a run folder's path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import resolve_uri, sqlite_path
from mlxlab.tracking.mlflow.environment import set_for_the_call

REGISTRY_SCHEME = "models:/"


def is_registered_name(text: str) -> bool:
    """Whether `text` names a registered model version (models:/NAME@ALIAS, models:/NAME/N)."""
    return str(text).startswith(REGISTRY_SCHEME)


def registered_run_dir(model_uri: str, uri: str | None = None, download_to: Path | None = None
                       ) -> Path:
    """The run folder a registered model version was logged from (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`; its MLflow run's run-folder tag), or, when that folder is gone and
    `download_to` is given, the version's own checkpoint downloaded there (beside the
    tokenizer.json it was logged with)."""
    import mlflow  # ~4 s: only when a registered name is given
    from mlflow import MlflowClient

    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(f"no MLflow store at {db}: register the model first "
                                "(mlxlab register) or pass --uri")
    spec = model_uri.removeprefix("models:/")
    name, alias = spec.split("@", 1) if "@" in spec else (spec, None)
    name, version = (name.split("/", 1) + [None])[:2] if alias is None else (name, None)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, str(version)))
    except Exception:
        raise ValueError(f"{model_uri}: no such registered model version in {uri} (mlxlab "
                         "register names them; `mlflow models` lists them)") from None
    run_dir = client.get_run(found.run_id).data.tags.get(T.RUN_DIR) if found.run_id else None
    if run_dir and Path(run_dir).is_dir():
        return Path(run_dir)
    if download_to is None:
        raise FileNotFoundError(f"{model_uri}: its run folder {run_dir} is gone")
    with pointed_at(uri):
        folder = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{spec}", dst_path=str(download_to)))
    checkpoints = [p for p in (folder / "artifacts").iterdir() if p.is_dir()]
    if len(checkpoints) != 1:
        raise FileNotFoundError(f"{model_uri}: its logged model holds no checkpoint folder")
    return checkpoints[0]


@contextlib.contextmanager
def pointed_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, pyfunc.load_model) has no store argument: point its
    globals (and the MLFLOW_TRACKING_URI env var that set_tracking_uri also sets) at `uri`,
    then put them back as they were."""
    # The globals as set (None = "not set: follow the default / the tracking URI"), not the
    # getters' resolved values: restoring a resolved value would pin every later client of this
    # process to this moment's store.
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    with set_for_the_call({}, keep=("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])
