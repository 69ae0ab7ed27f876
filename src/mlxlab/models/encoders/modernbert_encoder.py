"""ModernBERT in an embedder's encoder seat (ModernBERT-based sentence-transformers models such
as gte-modernbert and modernbert-embed): mlx-embeddings' MLX ModernBertModel (its embeddings,
its layers of global and sliding-window attention with rotary positions, its final norm),
subclassed for the encoders' common call, with each layer's attention kind, rotary base and GELU
set from the Hugging Face config (modernbert_config.py). The parameter names are transformers'
ModernBertModel's (embeddings.tok_embeddings, layers.N.attn.Wqkv, final_norm) behind the
`encoder.` prefix. The attention mask is additive and float32: a padded query row whose window
holds only padding still attends somewhere (no NaN), and pooling leaves pads out. Imported only
for a ModernBERT folder (mlx-embeddings is the `modernbert` extra).
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx_embeddings.models.modernbert import ModelArgs, ModernBertModel

from mlxlab.models.encoders.config_sizes import ConfigSizes
from mlxlab.models.encoders.modernbert_config import (
    GELU_APPROX,
    SLIDING,
    check_modernbert_config,
    layer_types,
    rope_bases,
)


class ModernBertEncoder(ConfigSizes, ModernBertModel):
    """(input_ids, attention_mask) -> (B, T, hidden) of the ModernBERT `hf_config` describes
    (its weights assigned afterwards); `dropout` overrides the config's embedding, attention
    and MLP dropout."""

    default_max_length = 8192  # transformers' ModernBertConfig default

    def __init__(self, hf_config: Mapping, dropout: float | None = None) -> None:
        config = dict(hf_config)
        check_modernbert_config(config, "the ModernBERT config")
        if dropout is not None:
            config.update(embedding_dropout=dropout, attention_dropout=dropout,
                          mlp_dropout=dropout)
        super().__init__(ModelArgs.from_dict(config))
        half = int(config.get("local_attention", 128)) // 2
        bases = rope_bases(config)
        # mlx-embeddings' MLP has GELU's tanh approximation; the config names the GELU it has
        act = GELU_APPROX[config.get("hidden_activation", "gelu")]
        for layer, kind in zip(self.layers, layer_types(config)):
            layer.mlp.act = nn.GELU(approx=act)
            attn = layer.attn
            attn.local_attention = (half, half) if kind == SLIDING else (-1, -1)
            attn.rotary_emb = nn.RoPE(dims=attn.head_dim, base=bases[kind])
        self.hf_config = config

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None) -> mx.array:
        """`token_type_ids` is accepted for the encoders' common call; ModernBERT has none."""
        if attention_mask is None:
            attention_mask = mx.ones(input_ids.shape, dtype=mx.int32)
        return super().__call__(input_ids, attention_mask.astype(mx.float32))["last_hidden_state"]
