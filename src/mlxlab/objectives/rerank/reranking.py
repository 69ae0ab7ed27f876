"""A cross-encoder reranker's objective: one of sentence-transformers' reranker losses over the
model's logits of (query, passage) pairs (data=rerank_pairs) or lists (data=rerank_lists).

    objective.loss: BinaryCrossEntropyLoss (pairs; objective.pos_weight) | ListNetLoss (lists)
                    | LambdaLoss (lists; its default NDCGLoss2++ weighting)

Validation reports the loss and, for pairs, the accuracy of the logit's side (relevant when
above 0, as a sigmoid above 0.5) against the label's (at least 0.5); for lists, MRR (the
reciprocal rank of the first relevant passage) and nDCG (ranking_metrics.py: tied logits
averaged over their orders), each a mean over
queries (LambdaLoss's: batch means weighted by the pairs its loss counts, the count that
weighs its micro-batches).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.config.records import check_choice, check_number
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.fixed_rows import check_batching
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective
from mlxlab.objectives.rerank.binary_cross_entropy import binary_cross_entropy
from mlxlab.objectives.rerank.lambda_loss import lambda_loss
from mlxlab.objectives.rerank.list_net import list_net
from mlxlab.objectives.rerank.ranking_metrics import ndcg, reciprocal_rank
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS, UNIT

# loss -> the kind of data it trains on
LOSSES = {"BinaryCrossEntropyLoss": "rerank_pairs", "ListNetLoss": "rerank_lists",
          "LambdaLoss": "rerank_lists"}
METRICS = {"rerank_pairs": {"loss": LOSS, "accuracy": UNIT},
           "rerank_lists": {"loss": LOSS, "mrr": UNIT, "ndcg": UNIT}}


def pair_logits(model: nn.Module, batch: Batch) -> mx.array:
    """The model's one logit of each pair: (B,) for a pairs batch, (B, K) for a lists batch."""
    shape = batch["input_ids"].shape
    flat = {k: batch[k].reshape(-1, shape[-1])
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(flat["input_ids"], flat["attention_mask"], flat["token_type_ids"],
                   token_index=batch.get("token_index"))  # the pairs' real tokens alone
    return logits[:, 0].reshape(shape[:-1])


class Reranking(Objective):
    """sentence-transformers' reranker loss named by `loss` (the module), `pos_weight` the
    positive pairs' weight of BinaryCrossEntropyLoss (None: 1)."""

    def __init__(self, loss: str = "BinaryCrossEntropyLoss", pos_weight: float | None = None):
        check_choice("objective.loss", loss, tuple(LOSSES))
        if pos_weight is not None:
            check_number("objective.pos_weight", pos_weight, float, 0.0)
            if loss != "BinaryCrossEntropyLoss":
                raise ConfigError(f"objective.pos_weight weighs BinaryCrossEntropyLoss's "
                                  f"positives; {loss} has none: leave it null")
        self.loss_name, self.pos_weight = loss, pos_weight

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        logits = pair_logits(model, batch)
        labels = batch["labels"]
        if self.loss_name in ("ListNetLoss", "LambdaLoss"):
            valid = batch["doc_mask"] > 0
            if self.loss_name == "ListNetLoss":
                per_list = list_net(logits, labels, batch["doc_mask"])
                loss, count = per_list.mean(), mx.array(per_list.shape[0], mx.float32)
            else:  # a mean over the pairs it counts, however the lists split them
                total, count = lambda_loss(logits, labels, batch["doc_mask"])
                loss = total / mx.maximum(count, 1.0)
            scores = mx.stop_gradient(logits)
            return loss, {"ntokens": count,
                          "mrr": reciprocal_rank(scores, labels, valid).mean(),
                          "ndcg": ndcg(scores, labels, valid).mean()}
        per_pair = binary_cross_entropy(logits, labels, self.pos_weight)
        right = (mx.stop_gradient(logits) > 0) == (labels >= 0.5)
        return per_pair.mean(), {"ntokens": mx.array(per_pair.shape[0], mx.float32),
                                 "accuracy": right.astype(mx.float32).mean()}

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        return evaluate_by_loss(model, data.val_batches(batching), self.loss, world, prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec(dict(METRICS.get(kind, {})))

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        loss = (cfg.get("objective") or {}).get("loss", "BinaryCrossEntropyLoss")
        if kind in METRICS and LOSSES.get(loss, kind) != kind:
            raise DataMismatch(f"objective.loss={loss} trains on {LOSSES[loss]} data, not "
                               f"{kind}: set data={LOSSES[loss]} or objective.loss="
                               f"{next(k for k, v in LOSSES.items() if v == kind)}")
        super().check_config(cfg, kind)
        check_batching(cfg, "data=rerank_pairs / rerank_lists")
