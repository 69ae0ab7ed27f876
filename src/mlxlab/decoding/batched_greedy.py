"""Greedy decoding of many prompts at once, each answer the one the prompt gets alone.

A decoder whose per-layer caches merge into batch caches (mlx-lm's: `KVCache.merge` ->
`BatchKVCache`, rotating and state-space caches alike) decodes prompts of any lengths together,
as mlx-lm's own batched generation (`mlx_lm.generate.BatchGenerator`) lays them out: each
prompt but its last token is prefilled right-padded (`prepare(lengths=, right_padding=)`, then
`finalize()` rolls the padding to the left, where the caches' masks hide it and each row's
positions start at 0), and every step feeds each row's newest token. Rows that end leave the
batch (`filter`). The token is the argmax of the raw logits, as one-at-a-time greedy decoding
takes it (mlx-lm's greedy sampler takes it of log-probabilities, which rounding can tie).

A decoder with caches of its own (mlxlab's Transformer) batches prompts of equal length only:
no row is padded, so learned and rotary positions alike stay those of the prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import mlx.core as mx

from mlxlab.models.base import Model


def _never(ids: list[int]) -> bool:
    return False


def merges(cache: list | None) -> bool:
    """Whether every layer's cache merges into a batch cache: mlx-lm's full, rotating
    (sliding-window), state-space and per-layer-list caches do; its quantized and chunked
    ones, and mlxlab's own, do not."""
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

    return bool(cache) and all(
        isinstance(c, (KVCache, RotatingKVCache, ArraysCache, CacheList)) for c in cache)


def greedy_batch(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stops: Collection[int], done: Callable[[list[int]], bool] = _never,
                 batch_size: int = 16,
                 on_group: Callable[[int], None] | None = None) -> list[list[int]]:
    """The greedy continuation of every prompt, in the prompts' order: at most
    `max_new_tokens`, ending before any of `stops` or once `done(ids)`, and at the model's
    context (`max_seq_len`; a prompt keeps its last `max_seq_len - max_new_tokens` tokens).
    At most `batch_size` prompts decode at once, shortest first. The model runs as it is (the
    caller sets eval mode); it must have a KV cache (`make_cache()`). `on_group(n)` is called
    after each group of n prompts is decoded (progress)."""
    limit = int(model.max_seq_len)
    kept = [list(p)[-max(1, limit - max_new_tokens):] for p in prompts]
    if any(not p for p in kept):
        raise ValueError("a prompt has no tokens: start it from at least one (BOS)")
    out: list[list[int]] = [[] for _ in kept]
    if max_new_tokens < 1:
        return out
    batched = merges(model.make_cache())
    order = sorted(range(len(kept)), key=lambda i: len(kept[i]))
    groups: list[list[int]] = []
    if batched:
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    else:
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(kept[i]), []).append(i)
        for same in by_length.values():
            groups += [same[s:s + batch_size] for s in range(0, len(same), batch_size)]
    for rows in groups:
        answers = _decode(model, [kept[i] for i in rows], max_new_tokens, set(stops), done,
                          limit, batched)
        for i, answer in zip(rows, answers):
            out[i] = answer
        if on_group is not None:
            on_group(len(rows))
    return out


def _decode(model: Model, prompts: list[list[int]], max_new_tokens: int, stops: set[int],
            done: Callable[[list[int]], bool], limit: int, batched: bool) -> list[list[int]]:
    """One batch of rows decoded together (greedy_batch)."""
    if batched:
        rows = [model.make_cache() for _ in prompts]
        cache = [layer[0].merge(list(layer)) for layer in zip(*rows)]
    else:  # equal lengths: the model's own cache holds the whole batch
        cache = model.make_cache()
    heads = [p[:-1] for p in prompts]
    width = max(len(h) for h in heads)
    if width:
        padding = [width - len(h) for h in heads]
        if any(padding):
            for c in cache:
                c.prepare(lengths=[len(h) for h in heads], right_padding=padding)
        model(mx.array([h + [0] * (width - len(h)) for h in heads], dtype=mx.int32), cache=cache)
        if any(padding):
            for c in cache:
                c.finalize()
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # rows still decoding, in the batch's row order
    feed = [p[-1] for p in prompts]  # every row of the batch (finished rows too, unbatched)
    while active:
        logits = model(mx.array(feed, dtype=mx.int32)[:, None], cache=cache)[:, -1]
        picked = logits.argmax(axis=-1).tolist()
        live = active if batched else range(len(prompts))
        token_of = dict(zip(live, picked))
        still = []
        for row in active:
            token = token_of[row]
            if token in stops:
                continue
            answers[row].append(token)
            if done(answers[row]) or len(answers[row]) >= max_new_tokens \
                    or len(prompts[row]) + len(answers[row]) >= limit:
                continue
            still.append(row)
        if batched:
            if len(still) < len(active):
                keep = [active.index(row) for row in still]
                if keep:
                    for c in cache:
                        c.filter(keep)
            feed = [token_of[row] for row in still]
        else:
            feed = [token_of[row] for row in range(len(prompts))]
        active = still
    return answers
