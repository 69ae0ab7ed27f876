"""Rollouts: G completions of each prompt sampled from the training model with a KV cache, and
the training batch they make.

Sampling: the G completions of every prompt of one length run as one batch of rows through
the model's `make_cache()` (mlxlab's decoders have one, as mlx-lm's models do): the prompts
once, then one token per step for every row until each row has sampled a stop token or
`max_new_tokens`. The rows of a batch have prompts of one length, so no row is padded and any
causal model (learned or rotary positions) samples as it would alone. Each token is drawn with
models.generation.sample_token (temperature, top-k, top-p) from a key split off the caller's:
the same key gives the same completions, so a generator whose key is checkpointed resumes to
the same bits.

The batch: row r is prompt r // G followed by its completion (up to and with its stop token),
right-padded to one width for the run (the longest prompt + max_new_tokens: one compiled
shape); `labels` are the inputs shifted by one and `loss_mask` marks the positions that predict
a completion token, so per-token arrays (log-probs, the old and reference log-probs) share the
(rows, width) layout and padding counts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.errors import ConfigError
from mlxlab.models.generation import sample_token
from mlxlab.models.layers import KVCache


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (TRL's GRPOConfig names)."""

    max_new_tokens: int = 64       # max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: off


def make_cache(model: nn.Module) -> list:
    """The model's KV cache (models/base.py `Model.make_cache`); a model without one (None)
    cannot sample completions."""
    cache = model.make_cache()
    if cache is None:
        raise ConfigError(f"{type(model).__name__} has no KV cache (make_cache) to sample "
                          "completions with: objective=grpo trains a decoder (model=hf_decoder "
                          "or transformer)")
    return cache


def sample_rows(model: nn.Module, prompts: np.ndarray, sampling: Sampling,
                stop_ids: Sequence[int], key: mx.array) -> list[np.ndarray]:
    """A completion of each row of `prompts` (rows, length): token ids, each ending with its
    stop token when it sampled one. The model runs as it is (the caller sets eval mode)."""
    rows = prompts.shape[0]
    cache = make_cache(model)
    for layer_cache in cache:  # one buffer of the positions this batch needs, not 256-chunks
        if isinstance(layer_cache, KVCache):
            layer_cache.step = prompts.shape[1] + sampling.max_new_tokens
    logits = model(mx.array(prompts.astype(np.int32)), cache=cache)[:, -1]
    out = np.zeros((rows, sampling.max_new_tokens), np.int32)
    lengths = np.full(rows, sampling.max_new_tokens)
    done = np.zeros(rows, bool)
    stops = np.asarray(list(stop_ids), np.int32)
    for t in range(sampling.max_new_tokens):
        key, sub = mx.random.split(key)
        token = sample_token(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                             key=sub)
        picked = np.array(token, np.int32)
        out[:, t] = picked
        ended = ~done & np.isin(picked, stops)
        lengths[ended] = t + 1
        done |= ended
        if done.all() or t + 1 == sampling.max_new_tokens:
            break
        logits = model(token[:, None].astype(mx.int32), cache=cache)[:, -1]
    return [out[r, : lengths[r]] for r in range(rows)]


def sample_completions(model: nn.Module, prompts: Sequence[np.ndarray], group_size: int,
                       sampling: Sampling, stop_ids: Sequence[int], key: mx.array
                       ) -> list[np.ndarray]:
    """`group_size` completions of each prompt, in prompt order (a group's rows together). The
    prompts of one length sample as one batch (no padding), lengths in increasing order, each
    from its own key split off `key`; the model in eval mode while it samples."""
    training = model.training
    model.eval()
    try:
        by_length: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(i)
        out: list[np.ndarray | None] = [None] * (len(prompts) * group_size)
        keys = mx.random.split(key, len(by_length))
        for k, length in enumerate(sorted(by_length)):
            members = by_length[length]
            rows = np.repeat(np.stack([prompts[i] for i in members]), group_size, axis=0)
            sampled = sample_rows(model, rows, sampling, stop_ids, keys[k])
            for j, i in enumerate(members):
                out[i * group_size:(i + 1) * group_size] = sampled[j * group_size:
                                                                   (j + 1) * group_size]
        return out
    finally:
        model.train(training)


def batch_width(longest_prompt: int, max_new_tokens: int, max_seq_len: int | None) -> int:
    """The input width of every rollout batch of a run: the longest prompt and completion."""
    width = longest_prompt + max_new_tokens - 1
    if max_seq_len is not None and width > max_seq_len:
        raise ConfigError(f"prompts of up to {longest_prompt} tokens plus "
                          f"objective.max_completion_length={max_new_tokens} need "
                          f"{width} positions, more than the model's {max_seq_len}: lower "
                          "objective.max_completion_length or data.max_length")
    return width


def rollout_batch(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray],
                  group_size: int, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, labels (rows, width) int32 and loss_mask (rows, width) float32 of the
    prompt + completion rows (module docstring)."""
    rows = len(completions)
    tokens = np.full((rows, width + 1), pad_id, np.int32)
    mask = np.zeros((rows, width), np.float32)
    for r, completion in enumerate(completions):
        prompt = prompts[r // group_size]
        seq = np.concatenate([prompt, completion])
        tokens[r, : len(seq)] = seq
        mask[r, len(prompt) - 1 : len(seq) - 1] = 1.0  # position t predicts token t + 1
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
