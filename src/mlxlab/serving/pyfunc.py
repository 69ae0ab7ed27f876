"""The `mlflow.pyfunc` model of a finished mlxlab run (what `mlxlab register` logs and
`mlxlab serve` / `mlflow models serve` answer /invocations with).

The logged model holds the run's checkpoint, its tokenizer.json and `predictor.json` (the task
and, for CSV classifiers, what setup() learnt from the training CSV: label values, columns, pad
id), so predicting needs neither the training data nor the run folder. The code is not copied:
this class lives in the installed mlxlab package, which the loading process must have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

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
        from mlxlab.runs.inference import load_run

        meta = json.loads(Path(context.artifacts["predictor"]).read_text())
        self.run = load_run(context.artifacts["checkpoint"],
                            tokenizer_path=context.artifacts["tokenizer"],
                            encoding_state=meta.get("encoding"))

    def predict(self, context, model_input, params=None):  # no hints: MLflow parses them
        from mlxlab.runs.inference import predict_frame

        if self.run.task == "classification":
            out = predict_frame(self.run, _frame(model_input), probability=True)
            return out.rename(columns={self.run.encoding.label_column: "prediction"})
        max_new = int((params or {}).get("max_new_tokens", 32))
        return predict_frame(self.run, _prompt_frame(model_input), max_new_tokens=max_new)


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


def _prompt_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, str):
        return pd.DataFrame({"prompt": [model_input]})
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, list | tuple) and all(isinstance(x, str) for x in model_input):
        return pd.DataFrame({"prompt": list(model_input)})
    raise ValueError(f"pass prompts as a list of strings or a DataFrame, got {type(model_input)}")


def predictor_meta(run: Any) -> dict:
    """What predicting needs beyond the weights and tokenizer (`run` is an inference.LoadedRun):
    the task and, for classifiers, the row encoding (computed from the training CSV for
    checkpoints older than the saved one)."""
    meta: dict[str, Any] = {"task": run.task, "data": run.config.get("data")}
    if run.encoding is not None:
        meta["encoding"] = run.encoding.encoding_state()
    return meta


def log_kwargs(run: Any, tmp: Path) -> dict:
    """mlflow.pyfunc.log_model / save_model arguments for a loaded run (predictor.json is
    written to `tmp`, which must outlive the call)."""
    predictor = Path(tmp) / PREDICTOR_FILE
    predictor.write_text(json.dumps(predictor_meta(run), indent=2, default=str))
    return {
        "python_model": MlxlabPyfunc(),
        "artifacts": {
            "checkpoint": str(run.checkpoint),
            "tokenizer": str(run.tokenizer_path),
            "predictor": str(predictor),
        },
        "pip_requirements": PIP_REQUIREMENTS,
    }
