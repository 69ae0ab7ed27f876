"""Token-by-token generation for any mlxlab decoder through mlx-lm's `generate_step`: its KV
cache (the model's `make_cache()`: mlx-lm's prompt cache, rotating where an architecture has a
sliding window), prompt prefill and sampler (temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import mlx.core as mx

from mlxlab.decoding.speculative import speculative_tokens
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model


def generate_tokens(
    model: Model,
    prompt_ids: Sequence[int] | mx.array,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    inputs: Mapping[str, mx.array] | None = None,
    draft: Model | None = None,
    num_draft_tokens: int = 3,
    accepted: list[int] | None = None,
) -> Iterator[int]:
    """Yield sampled token ids one at a time; the same seed gives the same tokens. Stops when
    the context (model.max_seq_len) is full; the caller stops earlier (max tokens, end-of-text).
    temperature 0 = greedy; top_k 0 / top_p 1 = off. Puts the model in eval mode. `inputs`:
    what the prompt's forward pass also reads (a vision-language model's pixel arrays).
    `draft`: a smaller model of the same tokenizer (speculative.py: `check_draft`) that proposes
    `num_draft_tokens` tokens the model checks in one pass; `accepted` gets one 0/1 a token
    (whether the draft proposed it), for the acceptance rate."""
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
    if inputs:
        yield from _with_inputs(model, prompt, sampler, room, inputs)
        return
    if draft is not None:
        yield from speculative_tokens(model, draft, prompt, sampler, room, num_draft_tokens,
                                      accepted)
        return
    for token, _ in generate_step(prompt, model, max_tokens=room, sampler=sampler):
        yield int(token)


def _with_inputs(model: Model, prompt: mx.array, sampler, room: int,
                 inputs: Mapping[str, mx.array]) -> Iterator[int]:
    """The prompt in one forward pass with `inputs` (mlx-lm's step takes ids only), then a
    token at a time on the model's cache, sampled as mlx-lm samples (log-probabilities)."""
    cache = model.make_cache()
    logits = model(prompt[None], cache=cache, **inputs)[:, -1, :]
    for _ in range(room):
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        yield int(token.item())
        logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]


def sample_token(
    logits: mx.array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, key=None
) -> mx.array:
    """(B, V) logits -> (B,) token ids from an explicit key (mlx-lm's sampler draws from the
    global generator; GRPO's rollouts need their own key to resume bitwise). temperature 0 =
    greedy; top_k 0 / top_p 1 = off."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p < 1:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(mass_before >= top_p, -mx.inf, sorted_logits)
        logits = mx.put_along_axis(logits, order, sorted_logits, axis=-1)
    return mx.random.categorical(logits, key=key)
