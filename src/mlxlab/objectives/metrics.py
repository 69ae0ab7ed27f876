"""Validation metrics, computed on the host once per evaluation (NumPy)."""

from __future__ import annotations

import math

import numpy as np

# What these report for each data task, with which way each improves:
# objectives/supervised/supervised.py METRICS (optimized_metric's choices).


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Binary F1 of the positive class for 2 labels; macro F1 otherwise."""
    classes = [1] if num_labels == 2 else range(num_labels)
    scores = []
    for c in classes:
        tp = float(((y_pred == c) & (y_true == c)).sum())
        fp = float(((y_pred == c) & (y_true != c)).sum())
        fn = float(((y_pred != c) & (y_true == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, with average ranks for ties."""
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC on P(class 1); macro one-vs-rest AUC for more classes."""
    if probs.shape[1] == 2:
        return _binary_auc(y_true, probs[:, 1])
    aucs = [_binary_auc((y_true == c).astype(int), probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, loss: float, prefix: str = "val"
) -> dict[str, float]:
    y_pred = probs.argmax(axis=1)
    n = probs.shape[1]
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/accuracy": accuracy(y_true, y_pred),
        f"{prefix}/f1": f1(y_true, y_pred, n),
        f"{prefix}/roc_auc": roc_auc(y_true, probs),
    }


def lm_metrics(loss: float, prefix: str = "val") -> dict[str, float]:
    return {f"{prefix}/loss": loss, f"{prefix}/perplexity": float(math.exp(min(loss, 50.0)))}
