"""A decoder in an embedder's encoder seat (Qwen3-Embedding and its kind): mlx-lm's decoder
stack (its embeddings, blocks and final norm, no language-model head) returns the token vectors
that pooling (usually the last token's) turns into one vector per text.

The stack is mlx-lm's own module for the config.json's model_type (`Model.model`: Qwen3Model,
LlamaModel, ...), so its parameter names are the Hugging Face base model's (embed_tokens,
layers.N.self_attn.q_proj, norm) behind the `decoder.` prefix. Causal attention keeps a
right-padded batch's pads out of every real token's view; a left-padded batch (as
sentence-transformers pads a decoder's) is shifted to the right-padded layout for the pass and
back, and since rotary positions are relative, a text's vectors are the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.encoders.config_sizes import ConfigSizes
from mlxlab.models.mlx_lm_classes import model_classes, rope_keys


class DecoderEncoder(ConfigSizes, nn.Module):
    """(input_ids, attention_mask) -> (B, T, hidden) of the decoder stack `hf_config` describes
    (its weights assigned afterwards: load_weights with `decoder.`-prefixed HF names)."""

    def __init__(self, hf_config: Mapping):
        super().__init__()
        config = dict(hf_config)
        model_class, args_class = model_classes(config, "the embedder's Transformer module")
        lm = model_class(args_class.from_dict({**config, **rope_keys(config, args_class)}))
        if "model" not in lm:
            raise ConfigError(f"model_type={config.get('model_type')!r}: mlx-lm's model has no "
                              "`model` stack returning hidden states; an embedder reads a "
                              "Llama-like decoder's (llama, qwen2, qwen3, mistral, ...)")
        self.decoder = lm.model
        self.hf_config = config

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 token_type_ids: mx.array | None = None) -> mx.array:
        """`token_type_ids` is accepted for the encoders' common call; a decoder has none."""
        if attention_mask is None:
            return self.decoder(input_ids)
        seq_len = input_ids.shape[1]
        # each row's left pads (0 for a right-padded row): the row rolled left by that many is
        # right-padded, and the hidden states rolled back line up with the input again
        left = mx.argmax(attention_mask.astype(mx.int32), axis=1)[:, None]
        steps = mx.arange(seq_len)[None, :]
        rolled = mx.take_along_axis(input_ids, (steps + left) % seq_len, axis=1)
        hidden = self.decoder(rolled)
        back = ((steps - left) % seq_len)[..., None]
        return mx.take_along_axis(hidden, back, axis=1)
