"""The MLflow model registry: a finished mlxlab run as an `mlflow.pyfunc` model.

    register_run("outputs/train/2026-...", name="titanic-bert", alias="champion")
    model = load_registered("titanic-bert@champion")     # = mlxlab.load_model(...)
    model.predict(pd.read_csv("test.csv"))          # classifier: raw CSV rows in
    model.predict(pd.DataFrame({"prompt": ["Once upon a time"]}))   # language model: text in

The logged model holds the run's best checkpoint, its tokenizer.json and `predictor.json` (the
resolved data config plus what setup() learnt from the training CSV: label values, pad id), so
predicting needs neither the training data nor the run folder. The code is not copied: the
wrapper class lives in the installed mlxlab package, which the loading process must have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"
# What the loading side needs; listed, not inferred (inference runs the model in a subprocess).
PIP_REQUIREMENTS = ["mlxlab", "mlx", "tokenizers", "pandas", "numpy"]


class MlxlabPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts from raw rows (classification) or prompts (language model).

    Classifier input: a DataFrame with the CSV's feature columns (the label column may be
    absent). Output: the id column when the data has one, `prediction` (the original label
    values) and `probability` (of the predicted label).
    LM input: a DataFrame with a `prompt` (or `text`) column, or a list of strings. Output:
    `prompt` and `completion` (greedy, `max_new_tokens` via params, stops at end-of-text).
    """

    def load_context(self, context: Any) -> None:
        from tokenizers import Tokenizer

        from mlxlab.data.tabular import TabularText
        from mlxlab.runs import load_run_model

        self.meta = json.loads(Path(context.artifacts["predictor"]).read_text())
        self.model, _ = load_run_model(context.artifacts["checkpoint"])
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])
        if self.meta["task"] == "classification":
            self.data = TabularText.from_encoding_state(
                self.meta["data"], self.tokenizer, self.meta["encoding"]
            )

    def predict(self, context, model_input, params=None):  # no hints: MLflow parses them
        if self.meta["task"] == "classification":
            return self._classify(_frame(model_input))
        return self._complete(_prompts(model_input), **(params or {}))

    def _classify(self, rows: pd.DataFrame) -> pd.DataFrame:
        import mlx.core as mx
        import numpy as np

        probs = []
        for batch in self.data.encode_frame(rows):
            logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
            probs.append(np.array(mx.softmax(logits.astype(mx.float32), axis=-1)))
        probs = np.concatenate(probs) if probs else np.zeros((0, len(self.data.label_values)))
        predicted = probs.argmax(axis=-1)
        out = self.data.submission(rows, predicted) if len(rows) else pd.DataFrame()
        out = out.rename(columns={self.data.label_column: "prediction"})
        out["probability"] = probs.max(axis=-1) if len(rows) else []
        return out

    def _complete(self, prompts: list[str], max_new_tokens: int = 32) -> pd.DataFrame:
        from mlxlab.models.transformer import generate_step

        eot = self.meta["eot_id"]
        completions = []
        for prompt in prompts:
            ids = [eot, *self.tokenizer.encode(prompt, add_special_tokens=False).ids]
            new = []
            for token in generate_step(self.model, ids, temperature=0.0):
                if token == eot or len(new) >= int(max_new_tokens):
                    break
                new.append(token)
            completions.append(self.tokenizer.decode(new))
        return pd.DataFrame({"prompt": prompts, "completion": completions})


def _frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input.reset_index(drop=True)
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return pd.DataFrame(model_input)
    raise ValueError(
        f"a classifier predicts from rows: pass a pandas DataFrame (or a list of dicts) with the "
        f"CSV's columns, got {type(model_input).__name__}"
    )


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        for column in ("prompt", "text"):
            if column in model_input.columns:
                return [str(x) for x in model_input[column]]
        raise ValueError(
            f"a language model predicts from a 'prompt' (or 'text') column, got columns "
            f"{list(model_input.columns)}"
        )
    if isinstance(model_input, list | tuple) and all(isinstance(x, str) for x in model_input):
        return list(model_input)
    raise ValueError(f"pass prompts as a list of strings or a DataFrame, got {type(model_input)}")


# --------------------------------------------------------------------------- registering


def run_files(run_dir: str | Path) -> tuple[Path, Path, dict]:
    """(the checkpoint to serve: best/, else the newest committed; tokenizer.json; its state)."""
    from mlxlab.training.checkpoint import check_committed, find_run_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}: pass outputs/<task>/<time>")
    tokenizer = run_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} is missing: is {run_dir} an mlxlab run folder?")
    candidates = sorted(find_run_checkpoints(run_dir), key=lambda p: p.name != "best")
    usable = [p for p in candidates if check_committed(p, full=False) is None]
    if not usable:
        raise FileNotFoundError(f"{run_dir} holds no committed checkpoint: let the run finish")
    state = json.loads((usable[0] / "state.json").read_text())
    if "config" not in state or "model_init" not in state:
        raise ValueError(f"{usable[0]}/state.json has no config: it is not an mlxlab checkpoint")
    return usable[0], tokenizer, state


def predictor_meta(state: dict, tokenizer_path: Path) -> dict:
    """What predicting needs beyond the weights: the data config and what its setup() learnt."""
    from omegaconf import OmegaConf

    from mlxlab.config import instantiate
    from mlxlab.data.tokenizer import EOT_TOKENS, PAD_TOKENS, find_token_id

    data_cfg = dict(state["config"]["data"])
    meta: dict[str, Any] = {"data": data_cfg}
    if state["model_init"].get("num_labels"):
        encoding = state.get("encoding")
        if encoding is None:  # a checkpoint from before they were saved: the training CSV again
            cfg = OmegaConf.create({**data_cfg, "cache_dir": None})
            cfg.tokenizer.path = str(tokenizer_path)
            data = instantiate(cfg)
            data.setup(None)
            encoding = data.encoding_state()
        meta.update(task="classification", encoding=encoding)
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path))
        meta.update(
            task="lm",
            eot_id=find_token_id(tok, EOT_TOKENS, "end-of-text"),
            pad_id=find_token_id(tok, PAD_TOKENS + EOT_TOKENS, "padding"),
        )
    return meta


def register_run(
    run_dir: str | Path,
    name: str,
    alias: str | None = "champion",
    uri: str | None = None,
) -> Any:
    """Log the run's model as a pyfunc model on its MLflow run (a new run when it has none in
    this store), register it as `name` and point `alias` at the new version; returns the
    ModelVersion. Load it with `mlflow.pyfunc.load_model(f"models:/{name}@{alias}")`."""
    import mlflow
    from mlflow import MlflowClient

    from mlxlab.tracking.mlflow import ensure_store, resolve_uri

    checkpoint, tokenizer, state = run_files(run_dir)
    uri = resolve_uri(uri)
    experiment_name = str(state["config"].get("task_name") or "mlxlab")
    experiment_id = ensure_store(uri, experiment_name)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = state.get("run_id")
    if run_id:
        try:
            run_id = client.get_run(run_id).info.run_id
        except Exception:
            log.warning("run %s is not in %s: logging the model on a new run", run_id, uri)
            run_id = None
    with pointed_at(uri), tempfile.TemporaryDirectory() as tmp:
        predictor = Path(tmp) / PREDICTOR_FILE
        predictor.write_text(json.dumps(predictor_meta(state, tokenizer), indent=2, default=str))
        kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id}
        with mlflow.start_run(**kwargs, tags={T.RUN_DIR: str(Path(run_dir).resolve())}):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MlxlabPyfunc(),
                artifacts={
                    "checkpoint": str(checkpoint),
                    "tokenizer": str(tokenizer),
                    "predictor": str(predictor),
                },
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=name,
            )
    version = info.registered_model_version
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    log.info("registered %s version %s%s (%s)", name, version, f" @{alias}" if alias else "", uri)
    return client.get_model_version(name, str(version))


@contextlib.contextmanager
def pointed_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, pyfunc.load_model) has no store argument: point its
    globals (and the MLFLOW_TRACKING_URI env var that set_tracking_uri also sets) at `uri`,
    then put them back as they were."""
    import mlflow

    saved = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_registered(name: str, uri: str | None = None) -> Any:
    """A registered model as an mlflow.pyfunc model, from the project's store.

    `name` is "<name>@<alias>", "<name>/<version>" or a full "models:/..." URI; the store is
    `uri`, else $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db: the one training and
    scripts/register_model.py write, whatever the working directory (no stray ./mlflow.db).
    """
    from mlxlab.tracking.mlflow import resolve_uri, sqlite_path

    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(
            f"no MLflow store at {db}: register a model first (scripts/register_model.py), run "
            "from the project folder, or set MLXLAB_ROOT / MLFLOW_TRACKING_URI"
        )
    model_uri = name if name.startswith("models:/") else f"models:/{name}"
    with pointed_at(uri):
        return mlflow.pyfunc.load_model(model_uri)
