"""Predictions of a finished run on a frame: a classifier's label (and probability) per row,
a language model's greedy completion per prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlxlab.runs.generate import complete
from mlxlab.runs.loading import LoadedRun
from mlxlab.runtime.progress import Progress


def training_columns(run: LoadedRun, df: pd.DataFrame, with_label: bool = False) -> pd.DataFrame:
    """The training columns of `df` in training order (extra columns dropped, so the text the
    model sees is the training text), or an error naming the missing ones."""
    data = run.encoding
    needed = list(data.columns) + ([data.id_column] if data.id_column else [])
    if with_label:
        needed.append(data.label_column)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"the CSV lacks column(s) {missing} the run was trained on; it has "
            f"{list(df.columns)} (give a CSV with the training columns"
            f"{'' if with_label else '; the label may be absent'})"
        )
    return df[needed].reset_index(drop=True)


def class_probabilities(run: LoadedRun, rows: pd.DataFrame, batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
    """(N, num_labels) softmax probabilities for the rows of `rows`, in row order (`progress`:
    shown as a verb shows it, runtime/progress.py)."""
    import mlx.core as mx

    probs = []
    shown = Progress("predict", len(rows), "rows") if progress else None
    for batch in run.encoding.encode_frame(rows, batch_size=batch_size):
        logits = run.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        probs.append(np.array(mx.softmax(logits.astype(mx.float32), axis=-1)))
        if shown is not None:
            shown.add(len(probs[-1]))
    if shown is not None:
        shown.close()
    return np.concatenate(probs) if probs else np.zeros((0, run.encoding.num_labels), np.float32)


def predict_frame(
    run: LoadedRun, frame: pd.DataFrame, batch_size: int = 64, probability: bool = False,
    max_new_tokens: int = 32, progress: bool = False,
) -> pd.DataFrame:
    """Classifier: the submission frame (id column if any, the label column with the original
    label values; `probability` of the predicted label with probability=True) for the rows of
    `frame`, in row order. Language model: `prompt` and its greedy `completion` for a frame with
    a `prompt` (or `text`) column. `progress`: shown as a verb shows it (runtime/progress.py)."""
    if run.task == "lm":
        prompts = prompt_column(frame)
        shown = Progress("predict", len(prompts), "completions") if progress else None
        completions = []
        for prompt in prompts:
            completions.append(complete(run, prompt, max_new_tokens, temperature=0.0))
            if shown is not None:
                shown.add(1)
        if shown is not None:
            shown.close()
        return pd.DataFrame({"prompt": prompts, "completion": completions})
    rows = training_columns(run, frame)
    probs = class_probabilities(run, rows, batch_size, progress)
    out = run.encoding.submission(rows, probs.argmax(axis=-1)) if len(rows) else pd.DataFrame(
        {run.encoding.label_column: []}
    )
    if probability:
        out["probability"] = probs.max(axis=-1)
    return out


def prompt_column(frame: pd.DataFrame) -> list[str]:
    for column in ("prompt", "text"):
        if column in frame.columns:
            return [str(x) for x in frame[column]]
    raise ValueError(
        f"a language model predicts from a 'prompt' (or 'text') column, got columns "
        f"{list(frame.columns)}"
    )

