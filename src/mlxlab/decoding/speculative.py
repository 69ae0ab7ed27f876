"""Speculative decoding: a small draft model proposes tokens its target checks in one pass. What
mlxlab knows of it is here; `mlxlab generate --draft`, `mlxlab serve --draft`, `mlxlab export
--format gguf --draft` and GKD's draft metrics call it:

- `same_tokenizer`: the one comparison of a draft's tokenizer with its target's;
- `check_draft`: a draft the target can use, else one ConfigError line (the same tokenizer and
  vocabulary, fewer weights, caches that roll back);
- `speculative_tokens`: the tokens of mlx-lm's `speculative_generate_step` (the target's own
  tokens under greedy decoding, its own distribution when sampling), each marked whether the
  draft proposed it;
- `draft_metrics`: a draft's expected speed-up from its acceptance rate (GKD's val/ metrics).

A draft is loaded by name as any model a verb names (runs/named_model.py `load_draft`; the
server's targets through serving/openai/served.py `attach_draft`); a draft trained from a
pretrained folder's first layers is the decoder's `model.keep_layers`
(models/decoders/draft_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx
from tokenizers import Tokenizer

from mlxlab.errors import ConfigError
from mlxlab.models.base import Model


def same_tokenizer(target: Tokenizer, draft: Tokenizer) -> bool:
    """Whether the draft reads text as its target does: the same tokenizer.json, entry for
    entry (a draft proposes ids the target checks)."""
    return draft.to_str() == target.to_str()


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


def speculative_tokens(model: Model, draft: Model, prompt: mx.array, sampler: Callable,
                       room: int, num_draft_tokens: int,
                       accepted: list[int] | None = None) -> Iterator[int]:
    """Up to `room` tokens after `prompt` from mlx-lm's speculative decoding, `draft` proposing
    `num_draft_tokens` a step; `accepted` gets one 0/1 a token (whether the draft proposed it)."""
    from mlx_lm.generate import speculative_generate_step

    draft.eval()
    for token, _, from_draft in speculative_generate_step(
            prompt, model, draft, num_draft_tokens=num_draft_tokens, max_tokens=room,
            sampler=sampler):
        if accepted is not None:
            accepted.append(int(from_draft))
        yield int(token)


def draft_metrics(acceptance: float, k: int, cost: float, prefix: str = "val") -> dict:
    """A draft's figures under greedy speculative decoding with `k` draft tokens a step:
    `acceptance` (a) is the share of tokens whose most likely next token the draft and its
    target agree on; a step then yields (1 - a^(k+1)) / (1 - a) tokens for one pass of the
    target and k of the draft, each `cost` of the target's (Leviathan et al. 2023), so the
    expected speed-up over the target alone is that over 1 + k * cost."""
    a = min(max(acceptance, 0.0), 1.0)
    tokens = k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    return {f"{prefix}/acceptance": a, f"{prefix}/tokens_per_target_pass": tokens,
            f"{prefix}/expected_speedup": tokens / (1.0 + k * cost)}
