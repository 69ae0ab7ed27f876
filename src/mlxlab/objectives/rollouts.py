"""Rollouts: G completions of each prompt sampled from the training model with a KV cache, and
the training batch they make.

Sampling: the G completions of every prompt of one length run as one batch of rows through
the model's `make_cache()` (mlxlab's decoders have one, as mlx-lm's models do): the prompts
once, then one token per step for every row until each row has sampled a stop token or
`max_new_tokens`. The rows of a batch have prompts of one length, so no row is padded and any
causal model (learned or rotary positions) samples as it would alone. Each token is drawn with
decoding.generation.sample_token (temperature, top-k, top-p) from a key split off the caller's:
the same key gives the same completions, so a generator whose key is checkpointed resumes to
the same bits.

The batch: row r is prompt r // G followed by its completion (up to and with its stop token),
right-padded to one width for the run (the longest prompt + max_new_tokens: one compiled
shape); `labels` are the inputs shifted by one and `loss_mask` marks the positions that predict
a completion token, so per-token arrays (log-probs, the old and reference log-probs) share the
(rows, width) layout and padding counts nothing.

`Sampler` is what an objective that completes data=prompts with the training model keeps (GRPO,
GKD): the sampling settings, the generator's key (checkpointed: a resumed run samples the same),
the batch width, the rollouts' metric sums since the last logged line and the sample completions
it logs at evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.config.records import check_number
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.prompts import PromptRows
from mlxlab.decoding.generation import sample_token
from mlxlab.errors import ConfigError, DataMismatch
from mlxlab.models.layers.blocks import KVCache
from mlxlab.objectives.base import ObjectiveSetup, pack_array, unpack_array


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (TRL's GRPOConfig names)."""

    max_new_tokens: int = 64       # max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: off

    @classmethod
    def checked(cls, length_key: str, max_new_tokens: int, temperature: float, top_p: float,
                top_k: int, eval_temperature: float) -> tuple[Sampling, Sampling]:
        """(training, evaluation) sampling from an objective's keys, or one ConfigError line
        naming the bad one (`length_key`: the objective's name for max_new_tokens)."""
        check_number(f"objective.{length_key}", max_new_tokens, int, 1)
        if temperature <= 0 or eval_temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError(f"objective: need temperature > 0 (got {temperature}), "
                              f"eval_temperature >= 0 ({eval_temperature}), 0 < top_p <= 1 "
                              f"({top_p}), top_k >= 0 ({top_k})")
        return (cls(int(max_new_tokens), float(temperature), float(top_p), int(top_k)),
                cls(int(max_new_tokens), float(eval_temperature), float(top_p), int(top_k)))


def check_sampling_config(objective: type, cfg: Any, kind: str | None) -> None:
    """What an objective that completes data=prompts with the training model asks of the config:
    prompts, not another kind of rows."""
    if kind is not None and kind != "prompts":
        data = str(cfg.data._target_).rsplit(".", 1)[-1]
        raise DataMismatch(f"objective {objective.__name__} samples completions of prompts "
                           f"(data=prompts), not of {data}'s rows")


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
    """`group_size` completions of each prompt, in prompt order (a group's rows together): one
    turn of every prompt repeated `group_size` times (sample_turn)."""
    rows = [p for p in prompts for _ in range(group_size)]
    return sample_turn(model, rows, [sampling.max_new_tokens] * len(rows), sampling, stop_ids,
                       key)


def sample_turn(model: nn.Module, prefixes: Sequence[np.ndarray], budgets: Sequence[int],
                sampling: Sampling, stop_ids: Sequence[int], key: mx.array) -> list[np.ndarray]:
    """The next turn of each row: up to `budgets[r]` tokens after `prefixes[r]` (a prompt, or a
    trajectory so far: objectives/rl/agent.py samples every turn here). The rows of one prefix
    length and budget sample as one batch (no padding), in increasing order of (length,
    budget), each batch from its own key split off `key`; the model in eval mode meanwhile."""
    training = model.training
    model.eval()
    try:
        batches: dict[tuple[int, int], list[int]] = {}
        for r, (prefix, budget) in enumerate(zip(prefixes, budgets)):
            batches.setdefault((len(prefix), int(budget)), []).append(r)
        out: list[np.ndarray | None] = [None] * len(prefixes)
        keys = mx.random.split(key, len(batches))
        for k, (length, budget) in enumerate(sorted(batches)):
            members = batches[(length, budget)]
            rows = np.stack([prefixes[r] for r in members])
            sampled = sample_rows(model, rows, replace(sampling, max_new_tokens=budget),
                                  stop_ids, keys[k])
            for r, tokens in zip(members, sampled):
                out[r] = tokens
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
                  group_size: int, width: int, pad_id: int,
                  masks: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """input_ids, labels (rows, width) int32 and loss_mask (rows, width) float32 of the
    prompt + completion rows (module docstring). `masks[r]`, one value per completion token
    (a trajectory's: 1 where the model wrote the token, 0 where the environment did), zeroes
    the positions that predict an environment's token."""
    rows = len(completions)
    tokens = np.full((rows, width + 1), pad_id, np.int32)
    mask = np.zeros((rows, width), np.float32)
    for r, completion in enumerate(completions):
        prompt = prompts[r // group_size]
        seq = np.concatenate([prompt, completion])
        tokens[r, : len(seq)] = seq
        # position t predicts token t + 1
        mask[r, len(prompt) - 1 : len(seq) - 1] = 1.0 if masks is None else masks[r]
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def completion_metrics(completions: Sequence[np.ndarray], stop_ids: Sequence[int]
                       ) -> dict[str, float]:
    """TRL's completions/ metrics of sampled completions (token counts)."""
    lengths = np.asarray([len(c) for c in completions], np.float32)
    stops = set(stop_ids)
    return {"completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            # the completions that ended without a stop token (cut at the length limit)
            "completions/clipped_ratio": float(np.mean([not (len(c) and int(c[-1]) in stops)
                                                        for c in completions]))}


class Sampler:
    """Completions of data=prompts sampled from the training model for an objective (module
    docstring): `sample` draws with the training settings from the next key, `sample_eval` with
    the evaluation's from the seed's key (every evaluation alike); `add_logs` sums a
    generation's metrics, `logs` hands their means out once; `state_dict` holds the key and the
    sums."""

    def __init__(self, sampling: Sampling, eval_sampling: Sampling, seed: int,
                 log_completions: int, samples_folder: str) -> None:
        check_number("objective.log_completions", log_completions, int, 0)
        self.sampling, self.eval_sampling, self.seed = sampling, eval_sampling, int(seed)
        self.log_completions, self.samples_folder = int(log_completions), samples_folder
        self.key = mx.random.key(self.seed)
        self.sums: dict[str, float] = {}
        self.fills = 0
        self.width, self.pad_id, self.stop_ids = 0, 0, [0]
        self.tracker: Any = None
        self.decode: Any = None
        self.prompts: Callable | None = None
        self.max_seq_len: int | None = None

    def setup(self, setup: ObjectiveSetup, objective: str) -> PromptRows:
        """The run's prompts (data=prompts, else one line), stop tokens and batch width."""
        data, model = setup.data, setup.model
        if not isinstance(data, PromptRows):
            raise ConfigError(f"objective={objective} samples completions of prompts, not of "
                              f"{type(data).__name__}: set data=prompts (or "
                              f"experiment={objective}_*)")
        self.width = batch_width(data.longest_prompt(), self.sampling.max_new_tokens,
                                 model.max_seq_len)
        self.stop_ids, self.pad_id = data.stop_ids(), data.pad_id
        self.decode = data.tokenizer.decode
        self.tracker = setup.tracker
        self.prompts = data.prompts
        self.max_seq_len = model.max_seq_len
        return data

    def use_prompts(self, prompts: Callable, longest: int) -> None:
        """Prompts rendered otherwise than the data module's (with tools: objectives/rl/agent.py):
        `prompts(split, index)` as PromptRows.prompts, the longest `longest` tokens."""
        self.prompts = prompts
        self.width = batch_width(longest, self.sampling.max_new_tokens, self.max_seq_len)

    def next_key(self) -> mx.array:
        self.key, key = mx.random.split(self.key)
        return key

    def sample(self, model: nn.Module, prompts: Sequence[np.ndarray], group: int
               ) -> list[np.ndarray]:
        return sample_completions(model, prompts, group, self.sampling, self.stop_ids,
                                  self.next_key())

    def sample_eval(self, model: nn.Module, prompts: Sequence[np.ndarray]) -> list[np.ndarray]:
        return sample_completions(model, prompts, 1, self.eval_sampling, self.stop_ids,
                                  mx.random.key(self.seed))

    def texts(self, completions: Sequence[np.ndarray]) -> list[str]:
        """The completions as text, their stop tokens left out."""
        stops = set(self.stop_ids)
        return [self.decode([t for t in c.tolist() if t not in stops], skip_special_tokens=True)
                for c in completions]

    def batch(self, prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray],
              group: int, masks: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        return rollout_batch(prompts, completions, group, self.width, self.pad_id, masks)

    def probe_batch(self, data: PromptRows, batching: Batching, group: int) -> Batch:
        """The batch of the first `batching.batch_size` training prompts, each completed `group`
        times, as long as a completion may be (max_new_tokens of the pad token: every array at
        the run's width), for measuring a step's memory; nothing is sampled, no key is drawn."""
        index = np.array(next(iter(data.train_batches(batching, 0)))["index"])
        _, ids, _ = self.prompts("train", index)
        filler = np.full(self.sampling.max_new_tokens, self.pad_id, np.int32)
        return {k: mx.array(v) for k, v in
                self.batch(ids, [filler] * (len(ids) * group), group).items()}

    def add_logs(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.fills += 1

    def logs(self) -> dict[str, float]:
        """The metrics averaged over the generations since the last call."""
        if not self.fills:
            return {}
        out = {k: v / self.fills for k, v in self.sums.items()}
        self.sums, self.fills = {}, 0
        return out

    def log_samples(self, rows: list[dict], step: int | None) -> None:
        """The first log_completions rows as the artifact <samples_folder>/step_<step>.jsonl
        (an evaluation outside a fit, step None, logs none)."""
        if self.tracker is not None and self.log_completions and step is not None:
            self.tracker.log_text("".join(json.dumps(r) + "\n"
                                          for r in rows[: self.log_completions]),
                                  f"{self.samples_folder}/step_{step:08d}.jsonl")

    def state_dict(self) -> dict:
        return {"key": pack_array(np.array(self.key)), "sums": dict(self.sums),
                "fills": self.fills}

    def load_state_dict(self, state: dict) -> None:
        self.key = mx.array(unpack_array(state["key"]))
        self.fills = int(state["fills"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
