"""Shared building blocks: attention (+ KV cache), MLPs, norms, masks, init."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels
from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError
from mlxlab.models.layers.unpadding import Unpadded


class KVCache:
    """Per-layer key/value cache for generation, filled in place; mlx-lm's KVCache interface
    (update_and_fetch, offset, state, is_trimmable, trim), so mlx-lm's generate_step drives it
    and its speculative decoding drops the tokens a draft proposed and the model rejected.

    Buffers grow in chunks of `step` positions (mlx-lm style) so decoding one token at a time
    does not reallocate on every step.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # number of positions already cached

    @property
    def state(self) -> list[mx.array]:
        """The arrays it holds (mlx-lm's cache interface: its generate_step evaluates them)."""
        return [] if self.keys is None else [self.keys, self.values]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most all of them); returns how many went. The
        buffers keep their size: the next update writes over them."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys/values (B, H_kv, T, D) and return everything cached so far."""
        prev = self.offset
        if self.keys is None or prev + keys.shape[2] > self.keys.shape[2]:
            n_new = (self.step + keys.shape[2] - 1) // self.step * self.step
            k_new = mx.zeros((*keys.shape[:2], n_new, keys.shape[3]), keys.dtype)
            v_new = mx.zeros((*values.shape[:2], n_new, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = k_new, v_new
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], k_new], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], v_new], axis=2)
        self.offset += keys.shape[2]
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def padding_mask(attention_mask: mx.array) -> mx.array:
    """(B, T_kv) 1 = real token -> boolean (B, 1, 1, T_kv) mask for SDPA (True = may attend)."""
    return attention_mask.astype(mx.bool_)[:, None, None, :]


def causal_padding_mask(attention_mask: mx.array, t_q: int) -> mx.array:
    """Causal (lower-right aligned, as SDPA's "causal") AND key padding: (B, 1, T_q, T_kv)."""
    t_kv = attention_mask.shape[1]
    q_pos = mx.arange(t_kv - t_q, t_kv)[:, None]
    causal = q_pos >= mx.arange(t_kv)[None, :]
    return causal[None, None] & padding_mask(attention_mask)


class Attention(nn.Module):
    """Multi-head attention (grouped-query when num_kv_heads < num_heads) over
    `mx.fast.scaled_dot_product_attention` (or mlxlab.kernels' fused softmax on CPU), with
    optional rotary positions and KV cache."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = False,
        rope: nn.Module | None = None,
        head_dim: int | None = None,
        out_bias: bool | None = None,
    ):
        """`head_dim` None = dim // num_heads (some checkpoints set it apart); `out_bias` None =
        `bias` (Qwen2 has q/k/v biases but none on the output projection)."""
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None and dim % num_heads:
            raise ConfigError(
                f"dim={dim} is not divisible by num_heads={num_heads}; pick sizes so it is"
            )
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}; "
                "use a divisor of num_heads"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.key = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.value = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        out_bias = bias if out_bias is None else out_bias
        self.out = nn.Linear(num_heads * self.head_dim, dim, bias=out_bias)
        self.rope = rope

    def __call__(
        self, x: mx.array, mask: mx.array | str | None = None, cache: KVCache | None = None
    ) -> mx.array:
        q, k, v = self.project(x, cache)
        o = kernels.attention(q, k, v, self.scale, mask)
        return self.out(kernels.merge_heads(o))

    def unpadded(self, x: mx.array, mask: mx.array | None, rows: Unpadded) -> mx.array:
        """__call__ on (N, dim) kept rows of a padded batch (models/layers/unpadding.py): the four
        projections on those rows only, the attention itself in the padded layout."""
        if self.rope is not None:
            raise ConfigError("unpadded attention takes no rotary positions")
        q, k, v = (kernels.split_heads(rows.pad(proj(x)).reshape(*rows.shape, heads, -1))
                   for proj, heads in ((self.query, self.num_heads), (self.key, self.num_kv_heads),
                                       (self.value, self.num_kv_heads)))
        o = kernels.attention(q, k, v, self.scale, mask)
        return self.out(rows.pack(kernels.merge_heads(o)))

    def project(
        self, x: mx.array, cache: KVCache | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values of `x` as (B, H, T, D) heads, rotary positions applied; with
        a cache, this step's keys and values are appended and all cached ones returned."""
        B, T, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.heads(self.query(x).reshape(B, T, self.num_heads, -1), offset)
        k = self.heads(self.key(x).reshape(B, T, self.num_kv_heads, -1), offset)
        v = kernels.split_heads(self.value(x).reshape(B, T, self.num_kv_heads, -1))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return q, k, v

    def weights(self, x: mx.array, mask: mx.array | str | None = None) -> mx.array:
        """The attention distributions (B, H, T, T) that a forward pass on `x` (no cache) mixes
        the values with: softmax(q k^T * scale + mask) over this layer's own projections and
        rotary positions, in float32, key heads repeated for grouped queries. The forward pass
        never forms them (kernels.attention may fuse them away); analyses ask for them here."""
        q, k, _ = self.project(x)
        k = mx.repeat(k, self.num_heads // self.num_kv_heads, axis=1)
        scores = (q * self.scale) @ k.swapaxes(-1, -2)
        if isinstance(mask, str):  # "causal", lower-right aligned as SDPA's
            t_q, t_kv = scores.shape[-2:]
            mask = mx.arange(t_kv - t_q, t_kv)[:, None] >= mx.arange(t_kv)[None, :]
        if mask is not None:
            scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
        return mx.softmax(scores.astype(mx.float32), axis=-1)

    def heads(self, x: mx.array, offset: int) -> mx.array:
        """(B, T, H, D) -> (B, H, T, D) with rotary positions applied, if any. Plain RoPE goes
        through mlxlab.kernels.rope (rotation and transpose fused on CPU)."""
        rope = self.rope
        if isinstance(rope, nn.RoPE) and not rope.traditional:
            return kernels.rope(x, rope.dims, rope.base, rope.scale, offset)
        x = kernels.split_heads(x)
        return x if rope is None else rope(x, offset=offset)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) -- the Llama MLP."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(kernels.swiglu(self.gate(x), self.up(x)))


class GeGLU(SwiGLU):
    """down(gelu(gate(x)) * up(x)) with the exact GELU (Shazeer 2020; Gemma uses the tanh form):
    SwiGLU's weights and names, so HF exports it as a Llama with hidden_act=gelu."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(kernels.gelu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) with the exact (erf) GELU, as in BERT and GPT-2."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(self.activation(self.up(x)))

    @staticmethod
    def activation(x: mx.array) -> mx.array:
        return kernels.gelu(x)


class ReluMLP(GeluMLP):
    """down(relu(up(x))), the original transformer's MLP."""

    @staticmethod
    def activation(x: mx.array) -> mx.array:
        return nn.relu(x)


class SiluMLP(GeluMLP):
    """down(silu(up(x))): SwiGLU's activation without the gate."""

    @staticmethod
    def activation(x: mx.array) -> mx.array:
        return nn.silu(x)


# model.mlp: gated kinds have gate/up/down projections, plain ones up/down.
GATED_MLPS = {"swiglu": SwiGLU, "geglu": GeGLU}
PLAIN_MLPS = {"gelu": GeluMLP, "relu": ReluMLP, "silu": SiluMLP}
MLP_KINDS = (*GATED_MLPS, *PLAIN_MLPS)


def make_mlp(kind: str, dim: int, hidden_dim: int | None, bias: bool) -> nn.Module:
    """Gated MLPs (swiglu, geglu) default to a hidden 8/3*dim rounded up to a multiple of 64,
    plain ones (gelu, relu, silu) to 4*dim: all give ~8*dim^2 parameters, so switching `mlp`
    keeps the model size."""
    if kind in GATED_MLPS:
        return GATED_MLPS[kind](dim, hidden_dim or (int(8 * dim / 3) + 63) // 64 * 64, bias)
    if kind in PLAIN_MLPS:
        return PLAIN_MLPS[kind](dim, hidden_dim or 4 * dim, bias)
    raise ConfigError(f"unknown mlp={kind!r}; use one of {list(MLP_KINDS)}")


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same weight and eps) over mlxlab.kernels.rms_norm: the fused CPU kernel
    where it applies, mx.fast.rms_norm otherwise."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self["weight"], self.eps)


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same training switch) over mlxlab.kernels.dropout: the fused CPU
    kernel where it applies, MLX's Bernoulli draw otherwise."""

    def __call__(self, x: mx.array) -> mx.array:
        if self._p_1 == 1 or not self.training:
            return x
        return kernels.dropout(x, 1.0 - self._p_1)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same weight, bias and eps) over mlxlab.kernels.layer_norm: the fused CPU
    kernel where it applies, mx.fast.layer_norm otherwise."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" not in self:  # affine=False
            return super().__call__(x)
        return kernels.layer_norm(x, self["weight"], self.get("bias"), self.eps)


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    raise ConfigError(f"unknown norm={kind!r}; use 'rmsnorm' or 'layernorm'")


def init_normal_(model: nn.Module, std: float = 0.02, residual_std: dict[str, float] | None = None):
    """BERT/GPT-2 init: Linear and Embedding weights ~ N(0, std), biases 0.

    `residual_std` maps a module-name suffix (e.g. "attention.out") to its own std, for the
    GPT-2 trick of shrinking the projections that write into the residual stream.
    Arrays stay lazy: nothing is allocated until the first mx.eval.
    """
    residual_std = residual_std or {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        s = next((v for k, v in residual_std.items() if name.endswith(k)), std)
        module.weight = s * mx.random.normal(module.weight.shape)
        if "bias" in module:
            module.bias = mx.zeros_like(module.bias)


def check_dropout(p: float) -> None:
    check_number("model.dropout", p, float)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout={p} must be in [0, 1)")


def check_positive(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}={v!r} must be a positive integer")
