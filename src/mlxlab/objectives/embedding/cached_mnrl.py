"""CachedMultipleNegativesRankingLoss (`objective=cached_mnrl`): MultipleNegativesRankingLoss
over a batch whose texts are embedded `mini_batch_size` rows at a time, each mini-batch's
forward pass recomputed in the backward (GradCache, Gao et al. 2021: a large batch's in-batch
negatives in the memory of a small one). MLX's gradient checkpointing is the cache: only the
embeddings of the mini-batches are kept, and the loss and its gradients are those of the uncached
loss. With dropout on, a mini-batch's recompute draws the masks its forward drew (a key per
mini-batch, as sentence-transformers' RandContext restores the random state): the gradients are
those of the loss the forward computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxlab.config.records import check_number
from mlxlab.data.batching import Batch
from mlxlab.data.sentence_pairs import column_keys, text_columns
from mlxlab.models.layers.grad_checkpoint import recomputed
from mlxlab.objectives.embedding.embedding import embed_columns
from mlxlab.objectives.embedding.mnrl import MultipleNegativesRankingLoss


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss with its embeddings computed in mini-batches (the module)."""

    def __init__(self, scale: float = 20.0, mini_batch_size: int = 32,
                 directions: Sequence[str] = ("query_to_doc",),
                 partition_mode: str = "joint") -> None:
        super().__init__(scale, directions, partition_mode)
        check_number("objective.mini_batch_size", mini_batch_size, int, 1)
        self.mini_batch_size = int(mini_batch_size)

    def embed(self, model: nn.Module, batch: Batch) -> list[mx.array]:
        columns = text_columns(batch)
        rows = columns[0][0].shape[0]
        step = self.mini_batch_size

        def chunk(start: int):  # the token arrays are constants of the recomputed pass
            part = {}
            for c, arrays in enumerate(columns):
                part.update({k: a[start:start + step] for k, a in zip(column_keys(c), arrays)})

            def embedded(params):
                model.update(params)
                return embed_columns(model, part)

            return embedded

        # gradient checkpointing of the model's parameters: recomputed in the backward
        parts = [recomputed(chunk(i), model)(model.trainable_parameters())
                 for i in range(0, rows, step)]
        return [mx.concatenate([p[c] for p in parts], axis=0) for c in range(len(parts[0]))]
