"""BERT encoder with a pooled classification head (Devlin et al. 2018).

Parameter names follow the Hugging Face layout closely enough that bert_hf.py maps them one to one:
encoder.embeddings.{word,position,token_type}_embeddings, encoder.embeddings.norm,
encoder.layers.N.{attention.{query,key,value,out}, attention_norm, mlp.{up,down}, mlp_norm},
pooler, classifier.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import maybe_apply_lora
from mlxlab.models.base import Model
from mlxlab.models.encoders.bert_hf import bert_config_from_hf, load_hf_bert_weights
from mlxlab.models.hf import check_vocab
from mlxlab.models.layers.blocks import (
    Attention,
    Dropout,
    GeluMLP,
    LayerNorm,
    check_dropout,
    check_positive,
    init_normal_,
    padding_mask,
)
from mlxlab.models.layers.unpadding import Unpadded
from mlxlab.models.sources import as_local, describe

log = logging.getLogger(__name__)

SCRATCH_DROPOUT = 0.3  # hidden dropout when training from scratch and none is given (Titanic's best)


class BertEmbeddings(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_position: int,
        type_vocab_size: int,
        dropout: float,
        eps: float,
        padding_idx: int | None = None,
    ):
        super().__init__()
        self.max_position = max_position
        # RoBERTa / XLM-R: a real token's position counts from padding_idx + 1, a pad's is
        # padding_idx (transformers' create_position_ids_from_input_ids); None: BERT's 0, 1, ...
        self.padding_idx = padding_idx
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position, hidden_size)
        if type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array | None = None) -> mx.array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        seq_len = input_ids.shape[1]
        if seq_len > self.max_length:
            raise ConfigError(
                f"sequence length {seq_len} exceeds the {self.max_length} positions the model "
                f"has (max_position={self.max_position}); truncate the data (max_length) or "
                "raise model.max_position"
            )
        h = self.word_embeddings(input_ids) + self.position_embeddings(self.positions(input_ids))
        if "token_type_embeddings" in self:
            if token_type_ids is None:
                h = h + self.token_type_embeddings.weight[0]
            else:
                h = h + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(h))

    @property
    def max_length(self) -> int:
        """The longest input the position table covers (RoBERTa's first padding_idx + 1 rows
        are never a real token's)."""
        return self.max_position - (0 if self.padding_idx is None else self.padding_idx + 1)

    def positions(self, input_ids: mx.array) -> mx.array:
        """(T,) BERT's positions, or (B, T) RoBERTa's: padding_idx + the count of non-pad
        tokens so far at a real token, padding_idx at a pad."""
        if self.padding_idx is None:
            return mx.arange(input_ids.shape[1])
        real = (input_ids != self.padding_idx).astype(mx.int32)
        return mx.cumsum(real, axis=1) * real + self.padding_idx


class EncoderBlock(nn.Module):
    """Post-LN (original BERT): x = norm(x + f(x)); pre-LN: x = x + f(norm(x))."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float,
        norm_position: str,
        eps: float,
    ):
        super().__init__()
        self.pre_norm = norm_position == "pre"
        self.attention = Attention(hidden_size, num_heads, bias=True)
        self.attention_norm = LayerNorm(hidden_size, eps=eps)
        self.mlp = GeluMLP(hidden_size, intermediate_size, bias=True)
        self.mlp_norm = LayerNorm(hidden_size, eps=eps)
        self.dropout = Dropout(dropout)

    def __call__(self, x: mx.array, mask: mx.array | None, rows: Unpadded | None = None
                 ) -> mx.array:
        """(B, T, hidden), or with `rows` the (N, hidden) kept rows of such a batch."""
        def attend(h: mx.array) -> mx.array:
            if rows is None:
                return self.attention(h, mask)
            return self.attention.unpadded(h, mask, rows)

        if self.pre_norm:
            x = x + self.dropout(attend(self.attention_norm(x)))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(attend(x)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class BertEncoder(nn.Module):
    """Embeddings + blocks (+ a final norm for pre-LN); returns (B, T, hidden)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        max_position: int,
        type_vocab_size: int,
        dropout: float,
        norm_position: str,
        eps: float,
        padding_idx: int | None = None,
    ):
        super().__init__()
        if norm_position not in ("post", "pre"):
            raise ConfigError(f"norm_position={norm_position!r}; use 'post' (BERT) or 'pre'")
        if hidden_size % num_heads:
            raise ConfigError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        self.embeddings = BertEmbeddings(
            vocab_size, hidden_size, max_position, type_vocab_size, dropout, eps, padding_idx
        )
        self.layers = [
            EncoderBlock(hidden_size, num_heads, intermediate_size, dropout, norm_position, eps)
            for _ in range(num_layers)
        ]
        if norm_position == "pre":
            self.final_norm = LayerNorm(hidden_size, eps=eps)

    @property
    def max_length(self) -> int:
        """The longest input it reads."""
        return self.embeddings.max_length

    @property
    def hidden_size(self) -> int:
        return self.embeddings.word_embeddings.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.embeddings.word_embeddings.weight.shape[0]

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        token_index: mx.array | None = None,
    ) -> mx.array:
        """(B, T, hidden); `token_index`: the flat positions whose states the caller reads
        (models/layers/unpadding.py), the only ones the dense layers compute (zeros elsewhere)."""
        h = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else padding_mask(attention_mask)
        rows = None if token_index is None else Unpadded(token_index, *input_ids.shape)
        if rows is not None:
            h = rows.pack(h)
        for layer in self.layers:
            h = layer(h, mask, rows)
        h = self.final_norm(h) if "final_norm" in self else h
        return h if rows is None else rows.pad(h)


class BertClassifier(Model):
    """BERT encoder -> [CLS] (position 0) -> pooler (dense + tanh) -> dropout -> classifier.

    Position 0 is read as the sequence summary, so batches must be right-padded and should
    start with a [CLS] token. `pretrained` is a local Hugging Face BERT directory (config.json,
    model.safetensors): its sizes override the ones given here. Attention-probability dropout
    is not applied (the fused SDPA kernel has none); hidden dropout is.
    """

    # the fewest outputs the head may have (a reranker's single score:
    # models/embedders/cross_encoder.py)
    min_labels = 2

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        max_position: int = 512,
        type_vocab_size: int = 2,
        dropout: float | None = None,
        norm_position: str = "post",
        pooler: bool | None = None,
        layer_norm_eps: float = 1e-12,
        pretrained: str | None = None,
        lora: Mapping | None = None,
    ):
        super().__init__()
        pretrained = as_local(pretrained) if pretrained else None  # a hub id as its folder
        sizes = dict(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position=max_position,
            type_vocab_size=type_vocab_size,
            dropout=dropout,
            layer_norm_eps=layer_norm_eps,
            norm_position=norm_position,
        )
        vocab_size, sizes, pooler, self._checkpoint_init = resolve_bert_sizes(
            vocab_size, num_labels, sizes, pooler, pretrained, self.min_labels)
        self.build_layers(vocab_size, num_labels, sizes, pooler)
        self._architecture = {**sizes, "vocab_size": vocab_size, "num_labels": num_labels,
                              "pooler": pooler}
        if pretrained:
            report = load_hf_bert_weights(self, pretrained)
            log.info(
                "loaded %d tensors from %s; kept the fresh init for %s",
                len(report["loaded"]),
                pretrained,
                report["missing"] or "nothing",
            )
        maybe_apply_lora(self, lora, default_extra_trainable=("classifier",))

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """A pretrained source that is not a BERT (a GGUF file, a decoder's folder) is refused
        before anything is created, naming the model config that loads it."""
        pretrained = node.get("pretrained")
        if not pretrained:
            return
        kind = describe(pretrained)
        if kind in ("gguf", "ollama"):
            raise ConfigError(f"model.pretrained={pretrained} is a decoder (GGUF holds decoders) "
                              "and model=bert loads BERT folders only; add model=hf_decoder")
        if kind == "folder":
            config = Path(pretrained).expanduser() / "config.json"
            model_type = json.loads(config.read_text()).get("model_type", "bert") \
                if config.is_file() else "bert"
            if model_type != "bert":
                raise ConfigError(f"model.pretrained={pretrained} has model_type={model_type!r} "
                                  "and model=bert loads BERT folders only; add model=hf_decoder "
                                  "for a decoder")

    def build_layers(self, vocab_size: int, num_labels: int, sizes: dict, pooler: bool) -> None:
        """Encoder, optional pooler, dropout and classifier, then their initial weights."""
        self.encoder = BertEncoder(
            vocab_size,
            sizes["hidden_size"],
            sizes["num_layers"],
            sizes["num_heads"],
            sizes["intermediate_size"],
            sizes["max_position"],
            sizes["type_vocab_size"],
            sizes["dropout"],
            sizes["norm_position"],
            sizes["layer_norm_eps"],
        )
        if pooler:
            self.pooler = nn.Linear(sizes["hidden_size"], sizes["hidden_size"])
        self.dropout = Dropout(sizes["dropout"])
        self.classifier = nn.Linear(sizes["hidden_size"], num_labels)
        init_normal_(self)

    @property
    def checkpoint_init(self) -> dict:
        """Sizes a checkpoint keeps besides the config (a pretrained folder's), see Model."""
        return dict(self._checkpoint_init)

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
        token_index: mx.array | None = None,
    ) -> mx.array:
        """Logits (B, num_labels); `token_index` as BertEncoder's (the real tokens alone)."""
        h = self.encoder(input_ids, attention_mask, token_type_ids, token_index)[:, 0]
        if "pooler" in self:
            h = mx.tanh(self.pooler(h))
        return self.classifier(self.dropout(h))


def resolve_bert_sizes(vocab_size: int, num_labels: int, sizes: dict, pooler: bool | None,
                       pretrained: str | None, min_labels: int = 2) -> tuple[int, dict, bool, dict]:
    """(vocab_size, sizes, pooler, checkpoint_init) of a BertClassifier: a pretrained folder's
    config overrides the given sizes, None picks dropout and pooler, and every size is checked."""
    # None = the choice that trains best where the model comes from: a pretrained
    # checkpoint keeps its own dropout and pooler (its weights load); from scratch,
    # dropout 0.3 and no pooler (Titanic: the pooler's tanh makes 3 of 8 seeds stop on the
    # 80.3 % "women survive" plateau; 0.3 beats 0.1 and 0.2 over 8 seeds).
    auto = {"dropout": SCRATCH_DROPOUT, "pooler": False}
    sizes, checkpoint_init = dict(sizes), {}
    if pretrained:
        hf = bert_config_from_hf(pretrained)
        check_vocab(vocab_size, hf["vocab_size"], pretrained)
        vocab_size = hf.pop("vocab_size")
        # dropout is a training choice, not a size: a given one wins over the checkpoint's
        auto = {"dropout": hf.pop("dropout"), "pooler": True}
        pooler = auto["pooler"] if pooler is None else pooler
        # a finished run is rebuilt with these when the folder is no longer given
        checkpoint_init = {**hf, "vocab_size": vocab_size, "pooler": pooler}
        changed = {k: (sizes[k], v) for k, v in hf.items() if sizes[k] != v}
        if changed:
            log.info("pretrained %s overrides %s", pretrained, changed)
        sizes.update(hf)
    if sizes["dropout"] is None:
        sizes["dropout"] = auto["dropout"]
    pooler = auto["pooler"] if pooler is None else pooler
    check_positive(
        vocab_size=vocab_size,
        num_labels=num_labels,
        **{k: sizes[k] for k in ("hidden_size", "num_layers", "num_heads")},
        **{k: sizes[k] for k in ("intermediate_size", "max_position")},
    )
    check_dropout(sizes["dropout"])
    if sizes["type_vocab_size"] < 0:
        raise ConfigError(f"type_vocab_size={sizes['type_vocab_size']} must be >= 0 (0 = no "
                          "token types)")
    if num_labels < min_labels:
        raise ConfigError(f"num_labels={num_labels}; a classifier needs at least {min_labels} "
                          "labels")
    return vocab_size, sizes, pooler, checkpoint_init
