"""OpenAI's Whisper (tiny to large-v3 and turbo) in MLX, as transformers' WhisperForConditional-
Generation computes it, under its parameter names: `model.encoder.conv1`,
`model.encoder.layers.N.self_attn.q_proj`, ..., `model.decoder.embed_tokens`, with the output
projection `proj_out` tied to the token embedding (no parameter of its own, as transformers
ties it), so a transformers folder's weights load with no renaming and export writes them back
as they are. The convolutions keep transformers' (out, in, kernel) weights too.

- encoder: two convolutions (gelu; the second strides by 2) over the [B, n_mels, 3000] log-mel
  features, fixed sinusoidal positions (`model.encoder.embed_positions`, frozen as in
  transformers), pre-LN blocks, a final LayerNorm: [B, 1500, d_model];
- decoder: token embeddings plus learned positions, pre-LN blocks of causal self-attention,
  cross-attention to the encoder's states and a gelu MLP, a final LayerNorm, the tied
  projection to the vocabulary. Queries are scaled by head_dim ** -0.5 (transformers scales q,
  mlx-whisper q and k by its fourth root: the same product).

`model(input_features, decoder_input_ids) -> logits`; `encode` and `decode(ids, states,
cache)` are the two halves generation uses (decoding/transcription.py): the cache keeps each
layer's self-attention keys and values and its cross-attention ones, computed once per audio.

What trains (`model.lora`): adapters on the attention projections and fc1 / fc2 of the encoder
and the decoder (mlxlab's names `query`, `key`, `value`, `out`, and `fc1`, `fc2`), or with
`model.lora.modules: [decoder]` on the decoder's only; rank 0 trains every parameter but the
encoder's fixed positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab import kernels
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import apply_lora, check_lora, check_reach, targeted_linears
from mlxlab.models.base import PretrainedModel
from mlxlab.models.decoders.mlx_lm_decoder import lora_targets, prepare_for_training
from mlxlab.models.hf import read_config
from mlxlab.models.layers.blocks import Dropout, LayerNorm
from mlxlab.models.sources import model_folder
from mlxlab.models.speech.whisper_folder import (
    load_weights,
    read_generation,
    read_whisper,
    whisper_config,
)

# model.lora.modules: which halves get adapters
PARTS = ("encoder", "decoder")
DEFAULT_TARGETS = ["query", "key", "value", "out", "fc1", "fc2"]
# the encoder's positions are sinusoids (transformers keeps them frozen: requires_grad False)
FROZEN = "model.encoder.embed_positions"


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> mx.array:
    """Whisper's fixed encoder positions (transformers' and OpenAI's `sinusoids`), computed in
    float64 and rounded once: torch's and MLX's float32 sin of positions up to 1500 are each
    ~1e-4 off and differ from one another; a transformers folder stores torch's (loaded as
    they are), an mlx-whisper folder none."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv[None, :]
    return mx.array(np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32))


class Conv1d(nn.Module):
    """A 1-d convolution whose weight is stored as transformers' (out, in, kernel); inputs and
    outputs are MLX's channels-last (B, T, C)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        scale = math.sqrt(1 / (in_channels * 3))
        self.weight = mx.random.uniform(-scale, scale, (out_channels, in_channels, 3))
        self.bias = mx.zeros((out_channels,))
        self.stride = stride

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.transpose(0, 2, 1).astype(x.dtype)
        return mx.conv1d(x, w, stride=self.stride, padding=1) + self.bias.astype(x.dtype)


class WhisperAttention(nn.Module):
    """Multi-head attention: self-attention (causal in the decoder) or cross-attention to the
    encoder's states; k_proj has no bias, as in Whisper."""

    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def split(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return kernels.split_heads(x.reshape(b, t, self.heads, -1))

    def keys_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.split(self.k_proj(x)), self.split(self.v_proj(x))

    def __call__(self, x: mx.array, keys: mx.array, values: mx.array,
                 mask: mx.array | str | None = None) -> mx.array:
        q = self.split(self.q_proj(x))
        return self.out_proj(kernels.merge_heads(kernels.attention(q, keys, values, self.scale, mask)))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, dims: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = WhisperAttention(dims, heads)
        self.self_attn_layer_norm = LayerNorm(dims)
        self.fc1 = nn.Linear(dims, ffn)
        self.fc2 = nn.Linear(ffn, dims)
        self.final_layer_norm = LayerNorm(dims)
        self.dropout = Dropout(dropout)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.self_attn_layer_norm(x)
        x = x + self.dropout(self.self_attn(h, *self.self_attn.keys_values(h)))
        h = self.fc2(kernels.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(h)


class LayerCache:
    """One decoder layer's keys and values: its self-attention's, grown token by token, and its
    cross-attention's, computed from the encoder's states once."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.cross: tuple[mx.array, mx.array] | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values

    def select(self, rows: mx.array) -> None:
        """Keep the rows `rows` names, in that order (beam search's reordering)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]
        if self.cross is not None:
            self.cross = (self.cross[0][rows], self.cross[1][rows])


class WhisperDecoderLayer(WhisperEncoderLayer):
    """An encoder block's parts with cross-attention to the encoder's states between its
    (causal, cached) self-attention and its MLP."""

    def __init__(self, dims: int, heads: int, ffn: int, dropout: float):
        super().__init__(dims, heads, ffn, dropout)
        self.encoder_attn = WhisperAttention(dims, heads)
        self.encoder_attn_layer_norm = LayerNorm(dims)

    def __call__(self, x: mx.array, states: mx.array, cache: LayerCache,
                 mask: mx.array | str | None) -> mx.array:
        h = self.self_attn_layer_norm(x)
        keys, values = cache.update(*self.self_attn.keys_values(h))
        x = x + self.dropout(self.self_attn(h, keys, values, mask))
        if cache.cross is None:
            cache.cross = self.encoder_attn.keys_values(states)
        h = self.encoder_attn(self.encoder_attn_layer_norm(x), *cache.cross)
        x = x + self.dropout(h)
        h = self.fc2(kernels.gelu(self.fc1(self.final_layer_norm(x))))
        return x + self.dropout(h)


class WhisperEncoder(nn.Module):
    def __init__(self, config: Mapping, dropout: float):
        super().__init__()
        dims = config["d_model"]
        self.conv1 = Conv1d(config["num_mel_bins"], dims)
        self.conv2 = Conv1d(dims, dims, stride=2)
        self.embed_positions = nn.Embedding(config.get("max_source_positions", 1500), dims)
        self.embed_positions.weight = sinusoids(*self.embed_positions.weight.shape)
        self.layers = [WhisperEncoderLayer(dims, config["encoder_attention_heads"],
                                           config.get("encoder_ffn_dim", 4 * dims), dropout)
                       for _ in range(config["encoder_layers"])]
        self.layer_norm = LayerNorm(dims)

    def __call__(self, input_features: mx.array) -> mx.array:
        positions = self.embed_positions.weight
        frames = 2 * positions.shape[0]
        if input_features.ndim != 3 or input_features.shape[-1] != frames:
            raise ValueError(f"Whisper takes input_features of shape [batch, n_mels, {frames}] "
                             f"(30 s of log-mel frames), got {tuple(input_features.shape)}")
        dtype = self.conv1.weight.dtype
        x = kernels.gelu(self.conv1(input_features.transpose(0, 2, 1).astype(dtype)))
        x = kernels.gelu(self.conv2(x))
        x = x + positions.astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, config: Mapping, dropout: float):
        super().__init__()
        dims = config["d_model"]
        self.embed_tokens = nn.Embedding(config["vocab_size"], dims)
        self.embed_positions = nn.Embedding(config.get("max_target_positions", 448), dims)
        self.layers = [WhisperDecoderLayer(dims, config["decoder_attention_heads"],
                                           config.get("decoder_ffn_dim", 4 * dims), dropout)
                       for _ in range(config["decoder_layers"])]
        self.layer_norm = LayerNorm(dims)

    def __call__(self, ids: mx.array, states: mx.array, cache: list[LayerCache]) -> mx.array:
        offset, t = cache[0].offset, ids.shape[1]
        if offset + t > self.embed_positions.weight.shape[0]:
            raise ValueError(f"{offset + t} decoder positions: this Whisper has "
                             f"{self.embed_positions.weight.shape[0]}")
        x = self.embed_tokens(ids) + self.embed_positions.weight[offset:offset + t]
        mask = None
        if t > 1:  # the new tokens see the cached ones and those before them
            mask = mx.arange(offset, offset + t)[:, None] >= mx.arange(offset + t)[None, :]
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x = layer(x, states, layer_cache, mask)
        return self.layer_norm(x)


class WhisperBody(nn.Module):
    """transformers' WhisperModel: the encoder and decoder under `model.`."""

    def __init__(self, config: Mapping, dropout: float):
        super().__init__()
        self.encoder = WhisperEncoder(config, dropout)
        self.decoder = WhisperDecoder(config, dropout)


def check_modules(modules: Any) -> tuple[str, ...]:
    if modules is None:
        return PARTS
    if isinstance(modules, str) or not modules or not all(m in PARTS for m in modules):
        raise ConfigError(f"model.lora.modules={modules!r}: a list of {list(PARTS)} (the halves "
                          "whose projections get adapters; default both)")
    return tuple(modules)


def check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout}: a fraction in [0, 1) (Whisper's "
                          "fine-tuning recipes use 0)")
    return float(dropout)


def whisper_source(source: str | Path, revision: str | None = None) -> tuple[Path, dict]:
    """The local folder `model.pretrained` names and its config as transformers' keys, checked
    (whisper_folder.read_whisper) before anything is built."""
    folder = model_folder(source, revision)
    config, folder = read_whisper(folder)
    return folder, config


class WhisperModel(PretrainedModel):
    """`model(input_features, decoder_input_ids) -> (B, T, vocab)` logits of a Whisper loaded
    from `pretrained` (a transformers, mlx-whisper or CTranslate2 folder), or built from
    `hf_config` when a checkpoint supplies the weights."""

    def __init__(
        self,
        vocab_size: int = 0,
        num_labels: int | None = None,  # accepted for the common constructor; unused
        pretrained: str | None = None,
        revision: str | None = None,
        lora: Mapping | None = None,
        quantize: int | None = None,
        dropout: float = 0.0,
        hf_config: Mapping | None = None,
        generation_config: Mapping | None = None,
    ):
        super().__init__()
        check_no_quantize(quantize)
        dropout = self._dropout = check_dropout(dropout)
        if pretrained:
            folder, config = whisper_source(pretrained, revision)
            self._base = {"pretrained": str(pretrained), "revision": revision,
                          "folder": str(folder)}
        elif hf_config:
            folder, config = None, whisper_config(hf_config, "the checkpoint's config")
        else:
            raise ConfigError("model.pretrained=??? : name the Whisper model: a transformers, "
                              "mlx-whisper or CTranslate2 folder (or a hub id ORG/NAME)")
        self._hf_config = dict(config)
        # the folder's decoding settings (suppressed tokens, ...): decoding/transcription.py
        self._generation = read_generation(folder) if folder else dict(generation_config or {})
        self.vocab_size = int(config["vocab_size"])
        if vocab_size and vocab_size > self.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens and the model's "
                              f"embedding {self.vocab_size}: give the model's own tokenizer")
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.model = WhisperBody(config, dropout)
        if not self.tied:
            self.proj_out = nn.Linear(config["d_model"], self.vocab_size, bias=False)
        if folder is not None:
            self._load(folder)
        self.max_seq_len = int(config.get("max_target_positions", 448))
        self._architecture = {
            "model_type": "whisper", "vocab_size": self.vocab_size,
            "num_mel_bins": int(config["num_mel_bins"]), "hidden_size": int(config["d_model"]),
            "encoder_layers": int(config["encoder_layers"]),
            "decoder_layers": int(config["decoder_layers"]), "max_seq_len": self.max_seq_len}
        prepare_for_training(self, None, lora, rebuilt=not pretrained)

    def _load(self, folder: Path) -> None:
        """The folder's weights under transformers' names (whisper_folder.load_weights), every
        parameter of the model accounted for; the tied projection's copy is dropped and the
        encoder's sinusoids are computed where a folder does not store them."""
        weights = load_weights(folder, read_config(folder))
        if not any(k.startswith("model.") for k in weights):  # a headless WhisperModel's save
            weights = {f"model.{k}": v for k, v in weights.items()}
        if self.tied:
            weights.pop("proj_out.weight", None)
        own = dict(tree_flatten(self.parameters()))
        weights.setdefault(f"{FROZEN}.weight", own[f"{FROZEN}.weight"])
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ConfigError(f"{folder}: its weights do not fit Whisper of its config.json "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]}); the "
                              "folder's config and weights are not one model's")
        wrong = [k for k, v in weights.items() if v.shape != own[k].shape]
        if wrong:
            raise ConfigError(f"{folder}: {wrong[0]} is {tuple(weights[wrong[0]].shape)} where "
                              f"its config.json makes it {tuple(own[wrong[0]].shape)}")
        self.update(tree_unflatten(list(weights.items())))
        mx.eval(self.parameters())

    @property
    def config(self) -> dict:
        """The folder's config.json as transformers' WhisperConfig keys."""
        return dict(self._hf_config)

    @property
    def generation_config(self) -> dict:
        """What decoding reads of the folder's generation_config.json."""
        return dict(self._generation)

    # the steps mlx_lm_decoder.prepare_for_training takes the loaded model through

    def quantize_at_load(self, bits: int | None) -> None:
        check_no_quantize(bits)

    def adapt(self, lora: Mapping | None, rebuilt: bool) -> str:
        """Adapters on model.lora.targets in the halves model.lora.modules names (module
        docstring), or every parameter but the encoder's fixed positions (rank 0); what trains,
        in words."""
        if lora is None:  # a model to score or transcribe with
            return "nothing"
        lora = dict(lora)
        parts = check_modules(lora.pop("modules", None))
        check_whisper_lora(lora)
        rank = int(lora.get("rank", 0))
        if rank == 0:
            self.unfreeze()
            self.model.encoder.embed_positions.freeze()
            return "every parameter but the encoder's fixed positions (full fine-tuning)"
        targets = lora_targets({"targets": lora.get("targets") or DEFAULT_TARGETS})["targets"]
        root = self.model if parts == PARTS else getattr(self.model, parts[0])
        self.freeze()
        apply_lora(root, rank=rank, alpha=float(lora.get("alpha", 16.0)),
                   dropout=float(lora.get("dropout", 0.0)), targets=targets,
                   extra_trainable=lora.get("extra_trainable") or (),
                   kind=str(lora.get("kind", "lora")))
        if not rebuilt:
            check_reach(root, targets)
        return f"{lora.get('kind', 'lora')} adapters (rank {rank}) on the {' and '.join(parts)}"

    @property
    def frozen_encoder(self) -> bool:
        """The encoder neither trains nor drops out: its states are a function of the audio
        alone (objectives/supervised/encoder_states.py computes them once per utterance)."""
        encoder = self.model.encoder
        return not self._dropout and not tree_flatten(encoder.trainable_parameters())

    def use_cpu_kernels(self) -> None:
        """Nothing to switch: Whisper's layers are float, its attention MLX's."""

    @property
    def described(self) -> str:
        a = self._architecture
        return (f"whisper ({a['encoder_layers']}+{a['decoder_layers']} layers, width "
                f"{a['hidden_size']}, {a['num_mel_bins']} mel bins)")

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """The model node before anything is created: quantize, dropout, the lora node, the
        folder a Whisper one, and that the targets name projections of it."""
        check_no_quantize(node.get("quantize"))
        check_dropout(node.get("dropout", 0.0))
        lora = dict(node.get("lora") or {})
        parts = check_modules(lora.pop("modules", None))
        check_whisper_lora(lora)
        if not node.get("pretrained"):
            return
        _, config = whisper_source(node["pretrained"], node.get("revision"))
        if lora.get("rank") and lora.get("targets"):
            body = WhisperBody({**config, "vocab_size": 8, "max_source_positions": 2,
                                "max_target_positions": 2}, 0.0)
            for part in parts:
                targeted_linears(getattr(body, part), lora_targets(lora)["targets"])

    @classmethod
    def check_packing(cls, node: Mapping[str, Any]) -> None:
        raise ConfigError("data.pack=true: each Whisper row carries its own audio, which one "
                          "packed sequence cannot keep apart; set data.pack=false")

    def blocks(self) -> list:
        """The encoder's blocks (what trainer.grad_checkpoint recomputes): their 1500 frames a
        row hold most of a step's activations, and each takes one array; a decoder block also
        takes its layer's cache, which a checkpointed call cannot carry."""
        return list(self.model.encoder.layers)

    @property
    def checkpoint_init(self) -> dict[str, Any]:
        return {"hf_config": dict(self._hf_config), "generation_config": dict(self._generation)}

    @property
    def processor_folder(self) -> str | None:
        """The pretrained folder whose tokenizer and feature extractor go with the model."""
        return (self._base or {}).get("folder")

    def encode(self, input_features: mx.array) -> mx.array:
        """[B, n_mels, frames] log-mel features -> [B, frames / 2, d_model] encoder states."""
        return self.model.encoder(input_features)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.tied:
            return self.model.decoder.embed_tokens.as_linear(hidden)
        return self.proj_out(hidden)

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.model.decoder.layers]

    def decode(self, decoder_input_ids: mx.array, encoder_states: mx.array,
               cache: list[LayerCache] | None = None) -> tuple[mx.array, list[LayerCache]]:
        """Logits of the decoder's next tokens after those `cache` holds (a fresh cache:
        from the first position), and the cache grown by them."""
        cache = self.new_cache() if cache is None else cache
        hidden = self.model.decoder(decoder_input_ids, encoder_states, cache)
        return self.logits(hidden), cache

    def __call__(self, input_features: mx.array, decoder_input_ids: mx.array,
                 **_: mx.array) -> mx.array:
        """Teacher-forced logits [B, T, vocab] of `decoder_input_ids` [B, T] given the audio's
        features [B, n_mels, frames] (other batch keys, such as labels, are not the model's)."""
        return self.decode(decoder_input_ids, self.encode(input_features))[0]


def check_no_quantize(quantize: Any) -> None:
    if quantize is not None:
        raise ConfigError(f"model.quantize={quantize}: Whisper loads and trains in float here; "
                          "leave model.quantize=null")


def check_whisper_lora(lora: Mapping) -> None:
    check_lora(lora)
    if lora.get("qat_bits"):
        raise ConfigError(f"model.lora.qat_bits={lora['qat_bits']}: Whisper trains plain LoRA; "
                          "set model.lora.qat_bits=0")
