"""Token-by-token generation for any mlxlab decoder through mlx-lm's `generate_step`: its KV
cache (the model's `make_cache()`: mlx-lm's prompt cache, rotating where an architecture has a
sliding window), prompt prefill and sampler (temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx

from mlxlab.errors import ConfigError
from mlxlab.models.base import Model


def generate_tokens(
    model: Model,
    prompt_ids: Sequence[int] | mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[int]:
    """Yield sampled token ids one at a time; the same seed gives the same tokens. Stops when
    the context (model.max_seq_len) is full; the caller stops earlier (max tokens, end-of-text).
    temperature 0 = greedy; top_k 0 / top_p 1 = off. Puts the model in eval mode."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    prompt = mx.array(prompt_ids, dtype=mx.int32).reshape(-1)
    if prompt.size == 0:
        raise ConfigError("prompt_ids is empty; start from at least one token (e.g. BOS/EOS)")
    room = model.max_seq_len - prompt.size  # mlx-lm feeds each token it yields, the last too
    if room <= 0:
        return
    model.eval()
    if temperature > 0:  # mlx-lm's sampler draws from the global generator; greedy draws nothing
        mx.random.seed(seed)
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=top_k)
    for token, _ in generate_step(prompt, model, max_tokens=room, sampler=sampler):
        yield int(token)
