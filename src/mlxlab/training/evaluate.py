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
             prefix: str = "val", loss_fn: losses.LossFn | None = None) -> Evaluation:
    """`model` on `data`'s validation batches, as `data.task` scores them. Under data parallelism
    (`world`) each rank evaluates every N-th batch and the sums (and, for classifiers, the labels
    and probabilities) are reduced over ranks. Preference pairs are scored by the run's
    `loss_fn`: its loss and metrics (rewards/accuracy, ...) averaged over the pairs."""
    world = world or distributed.World()
    if data.task == "preference":
        return evaluate_loss(model, data.val_batches(batching), loss_fn, world, prefix)
    model.eval()
    total, count, probs, labels = 0.0, 0.0, [], []
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


def evaluate_loss(model: nn.Module, batches, loss_fn: losses.LossFn | None,
                  world: distributed.World, prefix: str = "val") -> Evaluation:
    """The loss and its aux metrics over `batches`, each batch weighted by its aux["ntokens"]
    (the count its means are over: pairs for a preference loss), reduced over ranks."""
    if loss_fn is None:
        raise TrainingError("evaluating preference pairs needs the run's loss: "
                            "evaluate(..., loss_fn=...)")
    model.eval()
    sums: dict[str, float] = {}
    for k, batch in enumerate(batches):
        if k % world.size != world.rank:
            continue
        loss, aux = loss_fn(model, batch)
        losses.pop_example_outputs(aux)
        n = aux.pop("ntokens")
        mx.eval(loss, n, aux)
        weight = float(n)
        for key, value in {"loss": loss, **aux}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * weight
        sums["ntokens"] = sums.get("ntokens", 0.0) + weight
    model.train()
    keys = sorted(sums)
    if world.enabled:  # every rank holds every key (a rank without batches: none, see below)
        keys = sorted(set(keys) | {"loss", "ntokens"})
        sums = dict(zip(keys, world.sum_numbers([sums.get(k, 0.0) for k in keys], "evaluation")))
    count = sums.pop("ntokens", 0.0)
    if count == 0:
        raise TrainingError("the validation split is empty: set data.val_file or raise "
                            "data.val_fraction")
    return Evaluation({f"{prefix}/{k}": v / count for k, v in sums.items()})
