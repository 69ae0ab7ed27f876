"""Evaluation on the validation split: one function, `evaluate`, whose result (state.py
`Evaluation`) carries both the metrics and, for classifiers, each row's label and probabilities
(the confusion matrix and the predictions file of the best evaluation are drawn from them,
artifacts.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batching
from mlxlab.runtime import distributed
from mlxlab.training import losses, metrics
from mlxlab.training.state import Evaluation, TrainingError


def evaluate(model: nn.Module, data, batching: Batching, world: distributed.World | None = None,
             prefix: str = "val") -> Evaluation:
    """`model` on `data`'s validation batches, as `data.task` scores them. Under data parallelism
    (`world`) each rank evaluates every N-th batch and the sums (and, for classifiers, the labels
    and probabilities) are reduced over ranks."""
    model.eval()
    total, count, probs, labels = 0.0, 0.0, [], []
    world = world or distributed.World()
    classifier = data.task == "classification"
    for k, batch in enumerate(data.val_batches(batching)):
        if k % world.size != world.rank:
            continue
        logits = losses.forward(model, batch).astype(mx.float32)
        ce_sum, n = losses.masked_sum(losses.token_cross_entropy(logits, batch["labels"]), batch)
        if classifier:
            p = mx.softmax(logits, axis=-1)
            mx.eval(ce_sum, n, p)
            probs.append(np.array(p))
            labels.append(np.array(batch["labels"]))
        else:
            mx.eval(ce_sum, n)
        total += float(ce_sum)
        count += float(n)
    model.train()
    if world.enabled:
        total, count = world.sum_numbers([total, count], "evaluation")
        if classifier:
            width = data.num_labels
            labels = [world.gather_rows(np.concatenate(labels) if labels else np.zeros(0, np.int32))]
            probs = [world.gather_rows(
                np.concatenate(probs) if probs else np.zeros((0, width), np.float32))]
    if count == 0:
        raise TrainingError(
            "the validation split is empty: hold out more (data.val_fraction for tables, "
            "data.splits.val_examples for streamed text) or add data"
        )
    mean = total / count
    if not classifier:
        return Evaluation(metrics.lm_metrics(mean, prefix=prefix))
    all_labels, all_probs = np.concatenate(labels), np.concatenate(probs)
    return Evaluation(metrics.classification_metrics(all_labels, all_probs, loss=mean, prefix=prefix),
                      all_labels, all_probs)
