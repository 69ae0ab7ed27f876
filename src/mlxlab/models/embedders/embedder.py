"""A text embedder: an encoder, pooling, optional dense layers and L2 normalization.

The layout of a sentence-transformers model (Transformer -> Pooling -> Dense* -> Normalize).
The Transformer is mlxlab's BertEncoder (BERT, and RoBERTa / XLM-R with their position offset),
whose parameter names are the BERT classifier's (encoder.*), a decoder's stack through mlx-lm
(encoders/decoder_encoder.py: encoder.decoder.*), or ModernBERT through mlx-embeddings
(encoders/modernbert_encoder.py: encoder.* in transformers' ModernBertModel names); then
dense.N.linear.* (and dense.N.residual.* where a Dense adds a projected residual). sentence_folder.py reads such a folder into one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.embedders.pooling import POOLERS, pool
from mlxlab.models.encoders.bert import BertEncoder
from mlxlab.models.encoders.decoder_encoder import DecoderEncoder
from mlxlab.models.encoders.modernbert_config import require_mlx_embeddings

# the activations a Dense layer may name (torch's class names), as MLX functions
ACTIVATIONS = {
    "Tanh": mx.tanh,
    "Identity": lambda x: x,
    "ReLU": nn.relu,
    "GELU": nn.gelu,
    "Sigmoid": mx.sigmoid,
    "SiLU": nn.silu,
}


class Dense(nn.Module):
    """activation(linear(x)) (+ x, or + residual(x) where the sizes differ, with `residual`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str = "Tanh", residual: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"Dense activation {activation!r}; mlxlab has {', '.join(ACTIVATIONS)}")
        self.activation_name = activation
        self.use_residual = residual
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        if residual and in_features != out_features:
            self.residual = nn.Linear(in_features, out_features, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        out = ACTIVATIONS[self.activation_name](self.linear(x))
        if not self.use_residual:
            return out
        return out + (self.residual(x) if "residual" in self else x)


def _encoder(settings: Mapping) -> nn.Module:
    """The encoder `settings` describe (SentenceEmbedder's `encoder`)."""
    if "hf_config" in settings:
        return DecoderEncoder(settings["hf_config"])
    if "modernbert" in settings:
        require_mlx_embeddings()  # one line naming the install, before the import below
        from mlxlab.models.encoders.modernbert_encoder import ModernBertEncoder

        return ModernBertEncoder(settings["modernbert"], settings.get("dropout"))
    return BertEncoder(**settings)


class SentenceEmbedder(nn.Module):
    """(input_ids, attention_mask) -> (B, dim) text vectors, unit length where `normalize`.

    `encoder` holds BertEncoder's keyword arguments (bert_config_from_hf's sizes, and
    `padding_idx` for RoBERTa's positions), {"hf_config": a decoder's config.json} for a
    decoder's stack, or {"modernbert": its config.json, "dropout": None or an override} for
    ModernBERT (encoders/modernbert_encoder.py, on mlx-embeddings); `pooling` the modes of
    pooling.py, concatenated in order; `dense` one Dense's keyword arguments per layer, applied in
    order after pooling. Batches may be right-
    or left-padded.
    """

    def __init__(self, encoder: Mapping, pooling: Sequence[str], dense: Sequence[Mapping] = (),
                 normalize: bool = False):
        super().__init__()
        unknown = [mode for mode in pooling if mode not in POOLERS]
        if unknown or not pooling:
            raise ConfigError(f"pooling {list(pooling)}; give one or more of {', '.join(POOLERS)}")
        self.encoder = _encoder(encoder)
        self.pooling = tuple(pooling)
        self.dense = [Dense(**layer) for layer in dense]
        self.normalize = normalize

    @property
    def dimension(self) -> int:
        """The length of one output vector."""
        if self.dense:
            return self.dense[-1].linear.weight.shape[0]
        return self.encoder.hidden_size * len(self.pooling)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None,
                 normalize: bool | None = None, token_index: mx.array | None = None) -> mx.array:
        """One vector per row; `normalize` overrides the model's own choice for this call;
        `token_index` (the flat positions of the real tokens, models/layers/unpadding.py) lets a
        BERT encoder compute those alone (the others compute every position)."""
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.int32)
        if token_index is not None and isinstance(self.encoder, BertEncoder):
            hidden = self.encoder(input_ids, attention_mask, token_type_ids, token_index)
        else:
            hidden = self.encoder(input_ids, attention_mask, token_type_ids)
        x = pool(hidden, attention_mask, self.pooling)
        for layer in self.dense:
            x = layer(x)
        if self.normalize if normalize is None else normalize:
            # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            x = x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x
