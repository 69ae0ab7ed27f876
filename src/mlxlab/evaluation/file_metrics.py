"""A finished run's metrics on new data, computed as training's validation computes them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batch
from mlxlab.objectives.losses import masked_sum, token_cross_entropy
from mlxlab.runs.loading import LoadedRun
from mlxlab.runs.predict import class_probabilities, training_columns


def evaluate(run: LoadedRun, data: str | Path, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of the run on new data: a labelled CSV for a classifier (loss, accuracy, f1,
    roc_auc as in training's val/ metrics, plus the confusion matrix and label names), a text
    file (or jsonl/parquet with a text column) for a language model (token-weighted loss and
    perplexity over the file packed into the run's windows, as training's validation does)."""
    data = Path(data).expanduser()
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: give a labelled CSV (classifier) or a text "
                                "file (language model)")
    if run.task == "lm":
        return _evaluate_text(run, data, batch_size)
    return _evaluate_csv(run, data, batch_size)


def _evaluate_csv(run: LoadedRun, path: Path, batch_size: int) -> dict[str, Any]:
    from mlxlab.data.tabular import read_csv
    from mlxlab.objectives.metrics import classification_metrics, confusion_matrix

    enc = run.encoding
    if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path} is not a CSV: a classifier is evaluated on a labelled CSV")
    df = read_csv(path)
    rows = training_columns(run, df, with_label=True)
    rows = rows[rows[enc.label_column].notna()].reset_index(drop=True)
    index = {v: i for i, v in enumerate(enc.label_values)}
    unknown = sorted({str(v) for v in rows[enc.label_column] if v not in index})
    if unknown:
        raise ValueError(
            f"{path}: label value(s) {unknown[:5]} in column {enc.label_column!r} were not in "
            f"the training data (known: {enc.label_names}); evaluate on rows with known labels"
        )
    if not len(rows):
        raise ValueError(f"{path} has no labelled rows to evaluate")
    y = rows[enc.label_column].map(index).to_numpy(np.int64)
    probs = class_probabilities(run, rows.drop(columns=[enc.label_column]), batch_size)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    metrics = {k.split("/", 1)[1]: v for k, v in classification_metrics(y, probs, loss).items()}
    return {"task": "classification", "checkpoint": str(run.checkpoint), "rows": len(y),
            **metrics, "labels": list(enc.label_names),
            "confusion": confusion_matrix(y, probs.argmax(axis=1), enc.num_labels).tolist()}


def _evaluate_text(run: LoadedRun, path: Path, batch_size: int) -> dict[str, Any]:
    from mlxlab.data.batching import Batching
    from mlxlab.data.streaming import StreamingText, regroup_flat_config

    saved = regroup_flat_config(run.config.get("data", {}))  # runs saved before the grouping too
    source, packing = saved.get("source") or {}, saved.get("packing") or {}
    seq_len = int(packing.get("seq_len") or run.model.max_seq_len)
    # The whole file is the "validation split": packed unshuffled into the run's windows with
    # its tokenizer, each document after BOS (if any) and before end-of-text, as in training.
    data = StreamingText(
        source={"data_files": str(path), "text_column": source.get("text_column", "text"),
                "sample_by": source.get("sample_by", "paragraph")},
        splits={"val_split": "train", "val_examples": 0}, packing={"seq_len": seq_len},
        shuffle_buffer=0, tokenizer={"path": str(run.tokenizer_path)},
    )
    data.setup(None)
    batches = list(data.val_batches(Batching(batch_size=max(1, min(batch_size, 8)))))
    if not batches:
        raise ValueError(f"{path} holds no text to evaluate")
    metrics = lm_metrics(run.model, batches)
    return {"task": "lm", "checkpoint": str(run.checkpoint), "tokens": int(metrics["tokens"]),
            "loss": metrics["loss"], "perplexity": metrics["perplexity"],
            "accuracy": metrics["accuracy"]}


def lm_metrics(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Token-weighted loss, perplexity and top-1 next-token accuracy over scored tokens (also
    what export measures before and after quantizing)."""
    model.eval()
    loss = correct = count = 0.0
    for batch in batches:
        logits = model(batch["input_ids"]).astype(mx.float32)
        ce_sum, n = masked_sum(token_cross_entropy(logits, batch["labels"]), batch)
        hits, _ = masked_sum((logits.argmax(-1) == batch["labels"]).astype(mx.float32), batch)
        mx.eval(ce_sum, n, hits)
        loss, correct, count = loss + ce_sum.item(), correct + hits.item(), count + n.item()
    mean = loss / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(mean), "accuracy": correct / max(count, 1.0),
            "tokens": count}
