"""Evaluation on the validation split, two ways an objective's `evaluate` uses: by the
cross-entropy of the data's task (`evaluate_cross_entropy`: classification metrics with each
row's label and probabilities, from which training/artifacts.py draws the confusion matrix and the
predictions file of the best evaluation; perplexity for language models), and by the objective's
own loss and its aux metrics (`evaluate_by_loss`: preference pairs, anything whose quality its
loss terms describe)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.batching import Batching
from mlxlab.errors import UserError
from mlxlab.objectives import losses, metrics
from mlxlab.objectives.base import Evaluation, LossFn
from mlxlab.runtime import distributed


class EmptyValidation(UserError, RuntimeError):
    """The validation split holds nothing to score; the message says how to hold some out."""


def evaluate_cross_entropy(model: nn.Module, data, batching: Batching,
                           world: distributed.World | None = None,
                           prefix: str = "val") -> Evaluation:
    """`model` on `data`'s validation batches, as `data.task` (classification | lm) scores them.
    Under data parallelism (`world`) each rank evaluates every N-th batch and the sums (and, for
    classifiers, the labels and probabilities) are reduced over ranks."""
    world = world or distributed.World()
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
        raise EmptyValidation(
            "the validation split is empty: hold out more (data.val_fraction for tables, "
            "data.splits.val_examples for streamed text) or add data"
        )
    mean = total / count
    if not classifier:
        return Evaluation(metrics.lm_metrics(mean, prefix=prefix))
    all_labels, all_probs = np.concatenate(labels), np.concatenate(probs)
    return Evaluation(metrics.classification_metrics(all_labels, all_probs, loss=mean, prefix=prefix),
                      all_labels, all_probs)


def evaluate_by_loss(model: nn.Module, batches, loss_fn: LossFn,
                     world: distributed.World | None = None, prefix: str = "val") -> Evaluation:
    """The loss and its aux metrics over `batches`, each batch weighted by its aux["ntokens"]
    (the count its means are over: pairs for a preference loss), reduced over ranks."""
    world = world or distributed.World()
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
        raise EmptyValidation("the validation split is empty: set data.val_file or raise "
                            "data.val_fraction")
    return Evaluation({f"{prefix}/{k}": v / count for k, v in sums.items()})
