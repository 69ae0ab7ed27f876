"""The MLflow model registry: a finished mlxlab run as an `mlflow.pyfunc` model.

    register_run("outputs/train/2026-...", name="titanic-bert", alias="champion")
    model = load_registered("titanic-bert@champion")     # = mlxlab.load_model(...)
    model.predict(pd.read_csv("test.csv"))          # classifier: raw CSV rows in
    model.predict(pd.DataFrame({"prompt": ["Once upon a time"]}))   # language model: text in

The model itself (what is logged, how it predicts) is serving/pyfunc.py; a registered name
back to its run folder is runs/registered.py (what serve and a learned GRPO reward take).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow import MlflowClient

from mlxlab.runs.registered import pointed_at
from mlxlab.serving.pyfunc import log_kwargs
from mlxlab.sweeps.store import find_sweep_parent
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import ensure_store, resolve_uri, sqlite_path

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
