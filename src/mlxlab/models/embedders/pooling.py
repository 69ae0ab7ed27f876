"""Token vectors -> one vector per text: the pooling modes of sentence-transformers' Pooling.

Each mode reads the (B, T, H) hidden states and the (B, T) attention mask (1 = real token) and
returns (B, H); several modes concatenate in the order given, as sentence-transformers does.
The masks may be right- or left-padded; every mode ignores the padded positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import mlx.core as mx

from mlxlab.errors import ConfigError

# sentence-transformers' legacy 1_Pooling/config.json flags, in its concatenation order
LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _first_real(mask: mx.array) -> mx.array:
    """(B,) index of each row's first real token (the number of left pads)."""
    return mx.argmax(mask.astype(mx.int32), axis=1)


def _cls(h: mx.array, mask: mx.array) -> mx.array:
    return mx.take_along_axis(h, _first_real(mask)[:, None, None], axis=1)[:, 0]


def _max(h: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask[..., None].astype(mx.bool_), h, -mx.inf).max(axis=1)


def _mean_parts(h: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(axis=1), mx.maximum(m.sum(axis=1), 1e-9)


def _mean(h: mx.array, mask: mx.array) -> mx.array:
    total, count = _mean_parts(h, mask)
    return total / count


def _mean_sqrt_len(h: mx.array, mask: mx.array) -> mx.array:
    total, count = _mean_parts(h, mask)
    return total / mx.sqrt(count)


def _weighted_mean(h: mx.array, mask: mx.array) -> mx.array:
    """Token i of a text (counted from its first real token, from 1) weighs i."""
    positions = mx.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :]
    weights = mask.astype(h.dtype) * (positions - _first_real(mask)[:, None].astype(h.dtype))
    total = (h * weights[..., None]).sum(axis=1)
    return total / mx.maximum(weights.sum(axis=1, keepdims=True), 1e-9)


def _last_token(h: mx.array, mask: mx.array) -> mx.array:
    """Each row's last real token (zeros for a row with none)."""
    seq_len = h.shape[1]
    flipped = mask[:, ::-1].astype(mx.int32)
    from_end = mx.where(flipped.max(axis=1) == 0, 0, mx.argmax(flipped, axis=1))
    index = seq_len - 1 - from_end
    masked = h * mask[..., None].astype(h.dtype)
    return mx.take_along_axis(masked, index[:, None, None], axis=1)[:, 0]


POOLERS: dict[str, Callable[[mx.array, mx.array], mx.array]] = {
    "cls": _cls,
    "max": _max,
    "mean": _mean,
    "mean_sqrt_len_tokens": _mean_sqrt_len,
    "weightedmean": _weighted_mean,
    "lasttoken": _last_token,
}


def pool(hidden: mx.array, attention_mask: mx.array, modes: Sequence[str]) -> mx.array:
    """(B, T, H) hidden states -> (B, H * len(modes)): each mode's vector, concatenated."""
    return mx.concatenate([POOLERS[mode](hidden, attention_mask) for mode in modes], axis=-1)


def pooling_modes(config: Mapping, source: str = "the pooling config") -> tuple[str, ...]:
    """The modes a sentence-transformers Pooling config names: `pooling_mode` (a mode or a list)
    as sentence-transformers 5+ writes it, else the legacy `pooling_mode_*` flags (none set =
    mean, as sentence-transformers reads them)."""
    if "pooling_mode" in config:
        named = config["pooling_mode"]
        modes = (named,) if isinstance(named, str) else tuple(named)
    else:
        modes = tuple(mode for key, mode in LEGACY_FLAGS.items() if config.get(key)) or ("mean",)
    unknown = [m for m in modes if m not in POOLERS]
    if unknown or not modes:
        raise ConfigError(f"{source} names pooling mode(s) {unknown or modes}; mlxlab pools with "
                          f"{', '.join(POOLERS)}")
    return modes
