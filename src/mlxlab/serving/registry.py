"""The MLflow model registry: a finished mlxlab run as an `mlflow.pyfunc` model.

    register_run("outputs/train/2026-...", name="titanic-bert", alias="champion")
    model = load_registered("titanic-bert@champion")     # = mlxlab.load_model(...)
    model.predict(pd.read_csv("test.csv"))          # classifier: raw CSV rows in
    model.predict(pd.DataFrame({"prompt": ["Once upon a time"]}))   # language model: text in

The model itself (what is logged, how it predicts) is serving/pyfunc.py.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from mlxlab.serving.pyfunc import log_kwargs
from mlxlab.sweeps.store import find_sweep_parent
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import ensure_store, resolve_uri, sqlite_path
from mlxlab.tracking.mlflow.environment import set_for_the_call

log = logging.getLogger(__name__)


def register_run(
    run_dir: str | Path,
    name: str,
    alias: str | None = "champion",
    uri: str | None = None,
    which: str = "best",
) -> Any:
    """Log the run's model (its `which` checkpoint: best or last) as a pyfunc model on its
    MLflow run (a new run when it has none in this store), register it as `name` and point
    `alias` at the new version; returns the ModelVersion. Load it with
    `mlflow.pyfunc.load_model(f"models:/{name}@{alias}")`."""
    from mlxlab.runs.inference import load_run  # MLX and the models (~0.8 s): only when used

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}: pass outputs/<task>/<time>")
    run = load_run(run_dir, which)
    uri = resolve_uri(uri)
    experiment_name = str(run.config.get("task_name") or "mlxlab")
    experiment_id = ensure_store(uri, experiment_name)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = run.state.run_id
    if run_id:
        try:
            run_id = client.get_run(run_id).info.run_id
        except Exception:
            log.warning("run %s is not in %s: logging the model on a new run", run_id, uri)
            run_id = None
    with pointed_at(uri), tempfile.TemporaryDirectory() as tmp:
        kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id}
        with mlflow.start_run(**kwargs, tags={T.RUN_DIR: str(run_dir.resolve())}):
            info = mlflow.pyfunc.log_model(name="model", registered_model_name=name,
                                           **log_kwargs(run, Path(tmp)))
    version = info.registered_model_version
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    log.info("registered %s version %s%s (%s)", name, version, f" @{alias}" if alias else "", uri)
    return client.get_model_version(name, str(version))


def save_run_model(run_dir: str | Path, out: str | Path, which: str = "best") -> Path:
    """Write the run's pyfunc model to the folder `out` (no store, no registry): what
    `mlflow models serve -m out` serves."""
    from mlxlab.runs.inference import load_run  # MLX and the models (~0.8 s): only when used

    run = load_run(run_dir, which)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(out), **log_kwargs(run, Path(tmp)))
    return Path(out)


def registered_run_dir(model_uri: str, uri: str | None = None, download_to: Path | None = None
                       ) -> Path:
    """The run folder a registered model version was logged from (`models:/NAME@ALIAS` or
    `models:/NAME/VERSION`; its MLflow run's run-folder tag), or, when that folder is gone and
    `download_to` is given, the version's own checkpoint downloaded there (beside the
    tokenizer.json it was logged with)."""
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


def best_run_dir(uri: str, sweep: str) -> str:
    """The run folder of a sweep's best child (`latest` = the newest sweep in the store)."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = find_sweep_parent(client, sweep)
    # the top single run (TOP_RUN_ID; BEST_RUN_ID in stores written by earlier versions)
    best = parent.data.tags.get(T.TOP_RUN_ID) or parent.data.tags.get(T.BEST_RUN_ID)
    if not best:
        raise ValueError(f"sweep {parent.info.run_id} has no best run (still running, or all failed)")
    run_dir = client.get_run(best).data.tags.get(T.RUN_DIR)
    if not run_dir:
        raise ValueError(f"run {best} has no {T.RUN_DIR} tag: pass its run folder instead")
    return run_dir


@contextlib.contextmanager
def pointed_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, pyfunc.load_model) has no store argument: point its
    globals (and the MLFLOW_TRACKING_URI env var that set_tracking_uri also sets) at `uri`,
    then put them back as they were."""
    # The globals as set (None = "not set: follow the default / the tracking URI"), not the
    # getters' resolved values: restoring a resolved value would pin every later client of this
    # process to this moment's store.
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    with set_for_the_call({}, keep=("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])


def load_registered(name: str, uri: str | None = None) -> Any:
    """A registered model as an mlflow.pyfunc model, from the project's store.

    `name` is "<name>@<alias>", "<name>/<version>" or a full "models:/..." URI; the store is
    `uri`, else $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db: the one training and
    `mlxlab register` write, whatever the working directory (no stray ./mlflow.db).
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(
            f"no MLflow store at {db}: register a model first (mlxlab register), run "
            "from the project folder, or set MLXLAB_ROOT / MLFLOW_TRACKING_URI"
        )
    model_uri = name if name.startswith("models:/") else f"models:/{name}"
    with pointed_at(uri):
        return mlflow.pyfunc.load_model(model_uri)
