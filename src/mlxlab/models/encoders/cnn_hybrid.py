"""CNN hybrid classifier (Kim 2014 text CNN over BERT-style features).

tokens -> BERT embeddings (-> optional encoder blocks) -> one Conv1d per kernel size -> ReLU ->
max over real positions; concatenated with the pooled [CLS] encoder output -> classifier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import maybe_apply_lora
from mlxlab.models.base import Model
from mlxlab.models.encoders.bert import BertEncoder
from mlxlab.models.layers.blocks import Dropout, check_dropout, check_positive, init_normal_


class CNNHybrid(Model):
    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        hidden_size: int = 128,
        cnn_kernels: Sequence[int] = (2, 3, 4),
        cnn_filters: int = 128,
        use_encoder: bool = True,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.1,
        max_position: int = 512,
        lora: Mapping | None = None,
    ):
        super().__init__()
        kernels = [int(k) for k in cnn_kernels]
        if not kernels or min(kernels) < 1:
            raise ConfigError(
                f"cnn_kernels={list(cnn_kernels)} must be a non-empty list of sizes >= 1"
            )
        check_positive(
            vocab_size=vocab_size,
            num_labels=num_labels,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            cnn_filters=cnn_filters,
            max_position=max_position,
        )
        check_dropout(dropout)
        if num_labels < 2:
            raise ConfigError(f"num_labels={num_labels}; a classifier needs at least 2 labels")
        # BertEncoder with 0 layers is exactly the BERT embedding stage (word+position+norm)
        self.encoder = BertEncoder(
            vocab_size,
            hidden_size,
            num_layers if use_encoder else 0,
            num_heads,
            4 * hidden_size,
            max_position,
            type_vocab_size=0,
            dropout=dropout,
            norm_position="post",
            eps=1e-12,
        )
        self.convs = [nn.Conv1d(hidden_size, cnn_filters, k) for k in kernels]
        features = len(kernels) * cnn_filters
        if use_encoder:
            self.pooler = nn.Linear(hidden_size, hidden_size)
            features += hidden_size
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(features, num_labels)
        init_normal_(self)
        maybe_apply_lora(self, lora, default_extra_trainable=("classifier", "convs"))

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.bool_)
        real = attention_mask.astype(mx.bool_)[..., None]  # (B, T, 1)
        h = self.encoder(input_ids, attention_mask)
        # zero padded positions so pad tokens never reach a convolution window
        x = mx.where(real, h, 0)
        pooled = []
        for conv in self.convs:
            k = conv.weight.shape[1]
            # right-pad by k-1 so every real token starts a window (short sequences too)
            y = nn.relu(conv(mx.pad(x, [(0, 0), (0, k - 1), (0, 0)])))
            # windows starting at padding are dropped; 0 is a neutral floor since ReLU >= 0
            pooled.append(mx.where(real, y, 0).max(axis=1))
        if "pooler" in self:
            pooled.append(mx.tanh(self.pooler(h[:, 0])))
        return self.classifier(self.dropout(mx.concatenate(pooled, axis=-1)))
