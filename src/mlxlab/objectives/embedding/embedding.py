"""What every embedding loss shares: its columns embedded (one pass a width), the validation loss
and the retrieval metrics of an evaluation, the checks of a composed config.

A batch of text columns (data/sentence_pairs.py) holds each column's token ids and attention
mask (rows, positions), each padded to its own length: column 0 is the anchor (a query), 1 the
positive, the rest negatives, and `labels` where the rows carry a score (CoSENT's similarity,
MarginMSE's margins, DistillKLDiv's teacher scores). The columns of one width run through the
model in one pass (a short question is not padded to its document's length); a loss is a pure
function of the column embeddings and the labels (`from_embeddings`), so a wrapper
(MatryoshkaLoss) hands it other embeddings. An evaluation reports the loss on the
validation pairs and, with a BEIR folder (data.eval_dir), each query's retrieval scores
(retrieval.py): their means as `val/ndcg_at_10`, ..., and the rows per query in the
Evaluation's `tasks`, which evaluation/in_training.py keeps as the run's eval_tasks/ for
`mlxlab runs compare`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.config.compose import instantiate, unwrapped
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.fixed_rows import check_batching
from mlxlab.data.sentence_pairs import (
    first_row_columns,
    text_columns,
    token_index_key,
)
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup
from mlxlab.objectives.embedding.retrieval import DEFINITIONS, score_retrieval
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS

KIND = "embedding"  # the data kind these objectives train on (a data module's task)
METRICS = {"loss": LOSS, **DEFINITIONS}


def cos_sim(a: mx.array, b: mx.array) -> mx.array:
    """(n, m) cosine similarities of every row of `a` with every row of `b` (sentence-
    transformers' util.cos_sim: each row over max(its length, 1e-12))."""
    return normalize(a) @ normalize(b).T


def normalize(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pairwise_cos_sim(a: mx.array, b: mx.array) -> mx.array:
    """(n,) cosine similarity of row i of `a` with row i of `b`."""
    return (normalize(a) * normalize(b)).sum(axis=-1)


def pairwise_dot(a: mx.array, b: mx.array) -> mx.array:
    """(n,) dot product of row i of `a` with row i of `b`."""
    return (a * b).sum(axis=-1)


def embed_columns(model: nn.Module, batch: Batch) -> list[mx.array]:
    """One (rows, dim) float32 embedding per text column of the batch: one forward pass per
    padded width, the columns of that width stacked in it, on their real tokens only where the
    batch names them (token_index_key) and the encoder unpads."""
    columns = text_columns(batch)
    by_width: dict[int, list[int]] = {}
    for c, (ids, _) in enumerate(columns):
        by_width.setdefault(ids.shape[1], []).append(c)
    found: dict[int, mx.array] = {}
    for group in by_width.values():
        rows, width = columns[group[0]][0].shape
        index = None
        if all(token_index_key(c) in batch for c in group):  # each column's, shifted to its place
            index = mx.concatenate([batch[token_index_key(c)] + k * rows * width
                                    for k, c in enumerate(group)])
        flat = model(mx.concatenate([columns[c][0] for c in group]),
                     mx.concatenate([columns[c][1] for c in group]),
                     token_index=index).astype(mx.float32)
        found.update({c: flat[k * rows:(k + 1) * rows] for k, c in enumerate(group)})
    return [found[c] for c in range(len(columns))]


def check_columns(name: str, columns: int, least: int) -> None:
    """A loss's need of text columns a row: one ConfigError line when the data has fewer."""
    if columns < least:
        raise ConfigError(f"objective {name} needs at least {least} text columns a row (anchor, "
                          f"positive{', negatives' if least > 2 else ''}); the data has {columns}: "
                          "add negative columns to the rows (negative or negative_1..n)")


class EmbeddingObjective(Objective):
    """A loss over the embeddings of a batch's text columns (see the module). A subclass sets
    `least_columns` and `needs_labels` and implements `from_embeddings`."""

    least_columns = 2
    needs_labels = False

    def setup(self, setup: ObjectiveSetup) -> None:
        data = setup.data
        if data.task != KIND:
            raise ConfigError(f"objective {type(self).__name__} trains embedders on text "
                              f"columns, not on {type(data).__name__}: set data=sentence_pairs")
        self.check_data(data.columns, data.has_labels)

    def check_data(self, columns: int, has_labels: bool) -> None:
        """The data's columns and labels fit this loss: one ConfigError line if not."""
        name = type(self).__name__
        check_columns(name, columns, self.least_columns)
        if self.needs_labels and not has_labels:
            raise ConfigError(f"objective {name} reads a score per row (a 'score' or 'label' "
                              "column) and the data has none: add it to the rows")
        if has_labels and not self.needs_labels:
            raise ConfigError(f"objective {name} reads no score, and the rows carry one "
                              "('score' or 'label'): drop it, or use a loss that reads it "
                              "(objective=cosent, margin_mse, distill_kl_div)")

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        """The scalar loss of the column embeddings (and the rows' labels)."""
        raise NotImplementedError(f"{type(self).__name__}.from_embeddings")

    def embed(self, model: nn.Module, batch: Batch) -> list[mx.array]:
        """The batch's column embeddings (a cached loss embeds in mini-batches)."""
        return embed_columns(model, batch)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        value = self.from_embeddings(self.embed(model, batch), batch.get("labels"))
        return value, {"ntokens": losses.rows_counted(text_columns(batch)[0][1])}

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The loss over the validation pairs; with a retrieval set, its per-query scores."""
        metrics = dict(evaluate_by_loss(model, data.val_batches(batching), self.loss, world,
                                        prefix).metrics)
        if data.retrieval is None:
            return Evaluation(metrics)
        scores = retrieval_scores(model, data, batching.batch_size)
        metrics.update({f"{prefix}/{name}": value for name, value in scores.metrics.items()})
        return Evaluation(metrics, tasks=(scores,))

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec(dict(METRICS) if kind == KIND else {})

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """Embedding data in fixed batches, and a retrieval metric only where a BEIR folder is
        evaluated."""
        if kind != KIND:
            raise DataMismatch(f"objective {cls.__name__} trains embedders on text columns "
                               f"(data=sentence_pairs), not on {kind} data")
        super().check_config(cfg, kind)
        check_batching(cfg, "data=sentence_pairs")
        with unwrapped():  # the node built here (its own checks; a wrapper's inner loss)
            objective = instantiate(cfg.objective)
        found = first_row_columns((cfg.get("data") or {}).get("train_file"))
        if found is not None:
            with unwrapped():
                objective.check_data(*found)
        check_whole_batch(cfg.get("trainer") or {}, objective)
        monitor = str(cfg.get("optimized_metric"))
        if monitor != "val/loss" and not (cfg.get("data") or {}).get("eval_dir"):
            raise ConfigError(f"optimized_metric={monitor} is a retrieval score, and the data "
                              "has no retrieval set: set data.eval_dir=<a BEIR folder> or "
                              "optimized_metric=val/loss")


def check_whole_batch(trainer: Any, objective: Objective) -> None:
    """A loss whose rows are each other's negatives (couples_rows) computes on the whole batch:
    one ConfigError line where the trainer would split it (accumulation, a micro-batch,
    data-parallel ranks; tensor parallel computes the whole batch on every rank), each part
    seeing only its own rows as negatives."""
    if not objective.couples_rows:
        return
    batch, accum = trainer.get("batch_size"), trainer.get("grad_accum") or 1
    micro, mode = trainer.get("micro_batch"), (trainer.get("distributed") or {}).get("mode")
    split = None
    if accum > 1:
        split = f"trainer.grad_accum={accum} splits each step's batch into {accum} passes"
    elif micro is not None and micro != batch:
        split = f"trainer.micro_batch={micro} computes the batch of {batch} in parts"
    elif distributed.launched() and mode not in ("off", False, "tensor"):
        split = "data-parallel ranks each compute their share of the batch"
    if split:
        raise ConfigError(
            f"objective {type(objective).__name__} ranks each row against the batch's other rows, "
            f"and {split}, each seeing only its own rows as negatives: put the whole batch in "
            "trainer.batch_size with grad_accum=1, micro_batch=null and one process; for a "
            "batch larger than memory use objective=cached_mnrl (objective.mini_batch_size "
            "rows in memory at a time, every row's negatives)")


def encode(model: nn.Module, batches: Any) -> np.ndarray:
    """(texts, dim) float32 vectors of (positions, input_ids, attention_mask) batches, each
    text's vector at its position."""
    places, out = [], []
    for positions, ids, mask in batches:
        vectors = model(ids, mask).astype(mx.float32)
        mx.eval(vectors)
        places.append(positions)
        out.append(np.array(vectors))
    vectors = np.concatenate(out)
    ordered = np.empty_like(vectors)
    ordered[np.concatenate(places)] = vectors
    return ordered


def retrieval_scores(model: nn.Module, data: Any, batch_size: int):
    """The data's retrieval set scored with `model` (eval mode), each query's scores kept."""
    model.eval()
    try:
        found = data.retrieval
        queries = encode(model, data.text_batches("queries", batch_size))
        documents = encode(model, data.text_batches("corpus", batch_size))
    finally:
        model.train()
    return score_retrieval(found.name, queries, found.query_ids, documents, found.corpus_ids,
                           found.relevant)
