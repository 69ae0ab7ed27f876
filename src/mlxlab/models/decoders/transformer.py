"""Decoder-only transformer language model trained from scratch (the transformer_* presets;
Llama-style by default: RMSNorm, SwiGLU, RoPE), with a KV cache (mlx-lm's interface, so
mlx-lm's generate_step drives it) for generation.

Pretrained folders load through mlx-lm's own model code instead (models/decoders/mlx_lm_decoder.py);
this one stays for the presets because it is faster on them (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.kernels import causal_additive_mask
from mlxlab.models.adapters.lora import maybe_apply_lora
from mlxlab.models.base import Model
from mlxlab.models.decoders.packing import segment_mask, segment_positions
from mlxlab.models.layers.blocks import (
    Attention,
    Dropout,
    KVCache,
    causal_padding_mask,
    check_dropout,
    check_positive,
    init_normal_,
    make_mlp,
    make_norm,
)
from mlxlab.models.layers.rope import make_rope


@dataclass(frozen=True)
class DecoderArgs:
    """A Transformer's sizes and choices resolved (head_dim filled in): what its layers are
    built from, as mlx-lm's ModelArgs. The Transformer's own arguments are the `model.*` keys;
    see resolve_decoder_args."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None    # None: num_heads (no grouped-query attention)
    head_dim: int
    mlp_dim: int | None         # None: the MLP's own default width
    max_seq_len: int
    norm: str
    norm_eps: float
    mlp: str
    positions: str              # rope | learned
    rope_theta: float
    rope_scaling: Mapping | None
    tie_embeddings: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    dropout: float


class DecoderBlock(nn.Module):
    """Pre-norm: x = x + attn(norm(x)); x = x + mlp(norm(x)). `rope`: None = no rotary positions
    (the model adds learned ones instead)."""

    def __init__(self, a: DecoderArgs, rope: nn.Module | None) -> None:
        super().__init__()
        self.attention = Attention(
            a.dim, a.num_heads, a.num_kv_heads, bias=a.qkv_bias, rope=rope, head_dim=a.head_dim,
            out_bias=a.out_bias,
        )
        self.attention_norm = make_norm(a.norm, a.dim, a.norm_eps)
        self.mlp = make_mlp(a.mlp, a.dim, a.mlp_dim, bias=a.mlp_bias)
        self.mlp_norm = make_norm(a.norm, a.dim, a.norm_eps)
        self.dropout = Dropout(a.dropout)

    def __call__(self, x: mx.array, mask, cache: KVCache | None = None) -> mx.array:
        x = x + self.dropout(self.attention(self.attention_norm(x), mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(Model):
    """`model(input_ids, attention_mask=None, cache=None) -> (B, T, vocab_size)` logits.

    With `cache` (from make_cache()) the new positions continue after what the cache holds;
    an `attention_mask`, if given, then covers all positions so far: (B, cached + T).
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int | None = None,  # accepted for the common constructor; unused
        dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp_dim: int | None = None,
        max_seq_len: int = 512,
        norm: str = "rmsnorm",
        mlp: str = "swiglu",
        positions: str = "rope",
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        rope_theta: float = 10000.0,
        lora: Mapping | None = None,
        head_dim: int | None = None,
        norm_eps: float = 1e-5,
        rope_scaling: Mapping | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        mlp_bias: bool = False,
    ):
        super().__init__()
        a = resolve_decoder_args(dict(
            vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
            max_seq_len=max_seq_len, norm=norm, norm_eps=norm_eps, mlp=mlp, positions=positions,
            rope_theta=rope_theta, rope_scaling=rope_scaling, tie_embeddings=tie_embeddings,
            qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias, dropout=dropout,
        ))
        self.vocab_size, self.max_seq_len = a.vocab_size, a.max_seq_len
        self.tie_embeddings = a.tie_embeddings
        self.build_layers(a)
        self._architecture = dict(
            {k: v for k, v in asdict(a).items() if k != "dropout"},
            num_kv_heads=a.num_kv_heads or a.num_heads,
            mlp_dim=int(self.layers[0].mlp.up.weight.shape[0]),
            rope_scaling=dict(a.rope_scaling) if a.rope_scaling else None,
        )
        maybe_apply_lora(self, lora)

    def build_layers(self, a: DecoderArgs) -> None:
        """Embeddings, decoder blocks, final norm and (untied) head, then their initial weights."""
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        if a.positions == "learned":
            self.pos_embed = nn.Embedding(a.max_seq_len, a.dim)
        self.dropout = Dropout(a.dropout)
        self.layers = [
            DecoderBlock(a, make_rope(a.head_dim, a.rope_theta, a.rope_scaling)
                         if a.positions == "rope" else None)
            for _ in range(a.num_layers)
        ]
        self.norm = make_norm(a.norm, a.dim, a.norm_eps)
        if not a.tie_embeddings:
            self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * num_layers)
        res = 0.02 / (2 * a.num_layers) ** 0.5
        init_normal_(self, 0.02, {"attention.out": res, "mlp.down": res})

    @classmethod
    def check_packing(cls, node: Mapping[str, Any]) -> None:
        """data.pack=true: always possible (segment_ids in __call__: rows masked apart, learned
        positions restarted)."""

    def blocks(self) -> list:
        return list(self.layers)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        segment_ids: mx.array | None = None,
    ) -> mx.array:
        """`segment_ids` (B, T): a packed batch's rows (models/decoders/packing.py), each attending
        only to itself, learned positions restarting at each row."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
        T = input_ids.shape[1]
        offset = cache[0].offset if cache else 0
        if offset + T > self.max_seq_len:
            raise ConfigError(
                f"sequence of {offset + T} positions exceeds max_seq_len={self.max_seq_len}; "
                "use shorter sequences (data.packing.seq_len) or raise model.max_seq_len"
            )
        h = self.embed_tokens(input_ids)
        if "pos_embed" in self:
            positions = (mx.arange(offset, offset + T) if segment_ids is None
                         else segment_positions(segment_ids))
            h = h + self.pos_embed(positions)
        h = self.dropout(h)
        if attention_mask is not None and attention_mask.shape != (input_ids.shape[0], offset + T):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}; with {offset} cached positions "
                f"it must cover all {offset + T}: (batch, cached + new)"
            )
        # No padding and nothing cached: "causal", which kernels.attention runs as the blocked
        # kernel's flag over long rows (no (T, T) array) and as the additive array elsewhere.
        # Padding and packed rows need their own arrays (the flag cannot say which keys are
        # padding or another row's); with positions cached the array pins the queries at
        # offset..offset + T (the flag would align them to however many keys the cache hands
        # back). One new token attends to everything cached, so it needs no mask at all.
        if segment_ids is not None:
            mask = segment_mask(segment_ids, h.dtype)
        elif attention_mask is not None:
            mask = causal_padding_mask(attention_mask, T)
        elif T == 1:
            mask = None
        else:
            mask = "causal" if offset == 0 else causal_additive_mask(T, offset + T, h.dtype)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, c)
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.tie_embeddings else self.lm_head(h)



def resolve_decoder_args(a: dict) -> DecoderArgs:
    """A Transformer's constructor arguments resolved: the sizes checked and head_dim filled."""
    a = dict(a)
    check_positive(**{k: a[k] for k in ("vocab_size", "dim", "num_layers", "num_heads",
                                        "max_seq_len")})
    check_dropout(a["dropout"])
    if a["positions"] not in ("rope", "learned"):
        raise ConfigError(f"unknown positions={a['positions']!r}; use 'rope' or 'learned'")
    dim, num_heads = a["dim"], a["num_heads"]
    if a["head_dim"] is None and dim % num_heads:
        raise ConfigError(
            f"dim={dim} is not divisible by num_heads={num_heads}; pick sizes so it is"
        )
    a["head_dim"] = a["head_dim"] or dim // num_heads
    if a["positions"] == "rope" and a["head_dim"] % 2:
        raise ConfigError(f"rope needs an even head size, got {a['head_dim']}")
    return DecoderArgs(**a)
