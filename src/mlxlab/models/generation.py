"""Token-by-token generation for any mlxlab decoder through mlx-lm's `generate_step`: its KV
cache (the model's `make_cache()`: mlx-lm's prompt cache, rotating where an architecture has a
sliding window), prompt prefill and sampler (temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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
    inputs: Mapping[str, mx.array] | None = None,
    draft: Model | None = None,
    num_draft_tokens: int = 3,
    accepted: list[int] | None = None,
) -> Iterator[int]:
    """Yield sampled token ids one at a time; the same seed gives the same tokens. Stops when
    the context (model.max_seq_len) is full; the caller stops earlier (max tokens, end-of-text).
    temperature 0 = greedy; top_k 0 / top_p 1 = off. Puts the model in eval mode. `inputs`:
    what the prompt's forward pass also reads (a vision-language model's pixel arrays).
    `draft`: a smaller model of the same tokenizer that proposes `num_draft_tokens` tokens the
    model checks in one pass (mlx-lm's speculative decoding: the model's own tokens under
    greedy decoding, its own distribution when sampling); `accepted` gets one 0/1 a token
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
        from mlx_lm.generate import speculative_generate_step

        draft.eval()
        for token, _, from_draft in speculative_generate_step(
                prompt, model, draft, num_draft_tokens=num_draft_tokens, max_tokens=room,
                sampler=sampler):
            if accepted is not None:
                accepted.append(int(from_draft))
            yield int(token)
        return
    for token, _ in generate_step(prompt, model, max_tokens=room, sampler=sampler):
        yield int(token)


def check_draft(model: Model, draft: Model, same_tokenizer: bool) -> None:
    """A draft model speculative decoding can use with `model`, else one ConfigError line: the
    same tokenizer and vocabulary, fewer weights than the model (a quantized layer counted by the
    weights it packs), and caches that roll back (a rejected draft token is trimmed off both
    caches)."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    from mlxlab.models.parameters import num_parameters

    if not same_tokenizer:
        raise ConfigError("--draft: the draft's tokenizer is not the model's; a draft proposes "
                          "token ids the model checks, so it needs the same tokenizer.json")
    sizes = [m.architecture.get("vocab_size") for m in (model, draft)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise ConfigError(f"--draft: the draft's vocabulary has {sizes[1]} ids and the model's "
                          f"{sizes[0]}; use a draft of the same vocabulary")
    count = [num_parameters(m) for m in (model, draft)]  # a quantized layer by its weights
    if count[1] >= count[0]:
        raise ConfigError(f"--draft: the draft ({count[1]:,} parameters) is not smaller than "
                          f"the model ({count[0]:,}); a draft only saves time when it is")
    for name, m in (("model", model), ("draft", draft)):
        cache = m.make_cache()
        if cache is None or not can_trim_prompt_cache(cache):
            kind = m.architecture.get("model_type", type(m).__name__)
            raise ConfigError(f"--draft: the {name}'s cache ({kind}) cannot be rolled back, "
                              "which speculative decoding needs to drop rejected tokens; "
                              "generate without --draft")


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
