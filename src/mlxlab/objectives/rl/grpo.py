"""GRPO (Shao et al. 2024) as an objective of the one loop: online RL with verifiable rewards,
the first objective that makes its own batches (objective=grpo, data=prompts).

Per batch of prompts the data module hands out (data/prompts.py): G = num_generations completions of
each are sampled from the training model (objectives/rollouts.py: KV cache, temperature, top-p,
top-k, the objective's own mx.random key), scored by the rewards (rewards.py: weighted `(prompts,
completions, **columns)` callables), turned into group-normalised advantages, and the rollout batch
is kept in a buffer that `num_iterations` (mu) optimizer steps read, as TRL's GRPOTrainer buffers a
generation for mu passes. With mu > 1 the buffer holds the log-probs at generation time (the old
policy of the clipped ratio); with beta > 0 the reference's (the policy with its LoRA adapters off:
models/adapters/lora.py `adapters_off`, no second copy), computed once per generation outside the
step. The loss (grpo_loss.py) is TRL's: grpo, dr_grpo or dapo.

With `tools` (or an `environment`) each completion is a multi-turn trajectory (agent.py): the
model calls tools, their answers come back as tool turns (loss mask 0), the rewards judge the
final answer and the advantage is the trajectory's; `max_turns`, `tool_timeout_s`,
`tool_workers`, `tool_max_chars`, `tool_format` and `tagged_format` say how
(conf/objective/grpo.yaml).

Everything that decides the next batch is in `state_dict`: the generator's key, the buffer and
how many of its passes are done, the metric sums since the last logged line. A run SIGKILLed between two steps resumes to the same bits (tests/test_grpo.py).

Metrics are TRL's names: per step (train/...) reward, reward_std, rewards/<fn>/mean and /std,
frac_reward_zero_std, completions/mean_length, /min_length, /max_length, /clipped_ratio (from
the rollouts, objective.logs) and kl, entropy, clip_ratio/low_mean, /high_mean, /region_mean
(from the loss); at each evaluation val/reward, val/rewards/<fn>/mean, ... on one completion
of every validation prompt (eval_temperature 0: greedy), with sample completions logged as the
artifact grpo_samples/step_<step>.jsonl.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from mlxlab.config.records import check_number
from mlxlab.data.batching import Batch, Batching
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import adapters_off, has_adapters
from mlxlab.objectives.base import (
    Evaluation,
    MetricSpec,
    Objective,
    ObjectiveSetup,
    pack_array,
    unpack_array,
)
from mlxlab.objectives.rl.agent import (
    Agent,
    AgentSettings,
    check_chat_prompts,
    reward_columns,
    trajectory_rows,
)
from mlxlab.objectives.rl.environments import environment_factory
from mlxlab.objectives.rl.grpo_loss import (
    check_loss_settings,
    group_advantages,
    policy_loss,
    token_logps,
)
from mlxlab.objectives.rl.rewards import ModelReward, Reward, build_rewards, score, total
from mlxlab.objectives.rl.tool_format import FORMATS, TAGGED_KEYS
from mlxlab.objectives.rl.tools import check_tool_specs
from mlxlab.objectives.rollouts import (
    Sampler,
    Sampling,
    check_sampling_config,
    completion_metrics,
    sample_completions,
)
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import MetricDefinition

log = logging.getLogger(__name__)

SAMPLES = "grpo_samples"
BUILTIN_REWARDS = ("exact_answer", "numeric_answer", "regex_format", "length")


class GRPO(Objective):
    """Group relative policy optimization on data=prompts (module docstring); the arguments
    are TRL's GRPOConfig names (epsilon: the lower clip, epsilon_high: the upper, default
    epsilon)."""

    def __init__(self, rewards: Sequence[Mapping], num_generations: int = 8,
                 num_iterations: int = 1, loss_type: str = "dapo", beta: float = 0.0,
                 epsilon: float = 0.2, epsilon_high: float | None = None,
                 scale_rewards: str = "group", max_completion_length: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 eval_temperature: float = 0.0, log_completions: int = 8, seed: int = 0,
                 tools: Sequence[Mapping] | None = None, environment: Mapping | None = None,
                 max_turns: int = 4, tool_timeout_s: float | None = 10.0,
                 tool_format: str = "auto", tagged_format: Mapping | None = None,
                 tool_workers: int = 4, tool_max_chars: int | None = 4096) -> None:
        check_number("objective.num_generations", num_generations, int, 2)
        check_number("objective.num_iterations", num_iterations, int, 1)
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        check_loss_settings(loss_type, scale_rewards, epsilon, epsilon_high, beta)
        sampling, eval_sampling = Sampling.checked("max_completion_length", max_completion_length,
                                                   temperature, top_p, top_k, eval_temperature)
        if isinstance(rewards, DictConfig | ListConfig):
            rewards = OmegaConf.to_container(rewards, resolve=True)
        self.rewards = build_rewards(rewards)
        self.agent = multi_turn(tools, environment, max_turns, tool_timeout_s, tool_format,
                                tagged_format, tool_workers, tool_max_chars)
        if self.agent is not None and environment is not None:  # its rewards: one more reward
            self.rewards.append(Reward("environment", environment_reward, 1.0))
        self.group, self.mu, self.loss_type = int(num_generations), int(num_iterations), loss_type
        self.beta, self.eps_low, self.eps_high = float(beta), float(epsilon), float(epsilon_high)
        self.scale_rewards, self.temperature = scale_rewards, float(temperature)
        self.sampler = Sampler(sampling, eval_sampling, seed, log_completions, SAMPLES)
        self.sampling = sampling
        self._buffer: dict[str, np.ndarray] | None = None
        self._passes = 0

    # --- setup and state ------------------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """data=prompts; the tools importable functions with type hints and docstrings, the
        environment a class with reset and step (nothing is called or made)."""
        check_sampling_config(cls, cfg, kind)
        super().check_config(cfg, kind)
        node = cfg.objective
        check_tool_specs(_plain(node.get("tools")))
        if node.get("environment") is not None:
            environment_factory(_plain(node.get("environment")))
        if (node.get("tools") or node.get("environment") is not None) and kind == "prompts":
            check_chat_prompts(cfg.data)

    def setup(self, setup: ObjectiveSetup) -> None:
        data = self.sampler.setup(setup, "grpo")
        if self.agent is not None:
            self.agent.setup(data, self.sampler.stop_ids)
            self.sampler.use_prompts(self.agent.prompts, self.agent.longest_prompt())
        if self.beta and not has_adapters(setup.model):
            raise ConfigError(f"objective.beta={self.beta} measures the KL to the reference, the "
                              "model with its LoRA adapters off: set model.lora.rank > 0, or "
                              "objective.beta=0")
        for reward in self.rewards:  # a learned reward's model, resident before memory fitting
            if isinstance(reward.fn, ModelReward):
                reward.fn.load()

    def memory_beside_step(self, batching: Batching) -> int:
        """A learned reward's scoring batch: a generation's completions (trainer.batch_size
        prompts x num_generations) at the rollout's width, in its batches."""
        rows = batching.batch_size * self.group
        return sum(int(r.fn.scoring_memory(rows, self.sampler.width)) for r in self.rewards
                   if isinstance(r.fn, ModelReward))

    def state_dict(self) -> dict:
        buffer = None if self._buffer is None else {
            k: pack_array(v) for k, v in self._buffer.items()}
        return {**self.sampler.state_dict(), "buffer": buffer, "passes": self._passes}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        buffer = state.get("buffer")
        self._buffer = None if buffer is None else {k: unpack_array(v) for k, v in buffer.items()}
        self._passes = int(state["passes"])

    # --- the batches it makes -------------------------------------------------------------------

    def plan(self, grad_accum: int) -> int:
        """mu batches per batch of prompts, one optimizer step each."""
        # The mu passes over one generation are meant as mu optimizer steps. Accumulated, they
        # would meet in one step at unchanged weights (ratio 1: the update of num_iterations=1).
        if self.mu > 1 and grad_accum > 1:
            raise ConfigError(
                f"objective.num_iterations={self.mu} takes {self.mu} optimizer steps per "
                f"generation, and trainer.grad_accum={grad_accum} would sum those passes into "
                "one step (the update of num_iterations=1): set trainer.grad_accum=1 (a larger "
                "data.batch_size makes a larger generation; a trainer.micro_batch below "
                "trainer.batch_size accumulates too) or objective.num_iterations=1")
        return self.mu

    def probe_batch(self, data: Any, batching: Batching) -> Batch:
        """The rollout batch of the run's first prompts at its largest (every completion
        max_completion_length long), with the arrays the loss reads beside the tokens."""
        batch = self.sampler.probe_batch(data, batching, self.group)
        rows, width = batch["input_ids"].shape
        batch["advantages"] = mx.zeros((rows,), mx.float32)
        for key, needed in (("old_logps", self.mu > 1), ("ref_logps", self.beta)):
            if needed:
                batch[key] = mx.zeros((rows, width), mx.float32)
        return batch

    def probe_loss(self) -> None:
        return None  # it trains on rollouts it makes, not on the data's rows

    def train_batches(self, data: Any, batching: Batching, epoch: int,
                      model: nn.Module) -> Iterator[Batch]:
        """The buffer's passes left (a resumed run's first), then per batch of prompts: a
        generation and its mu passes."""
        yield from self._drain()
        for prompt_batch in data.train_batches(batching, epoch):
            self._fill(model, data, np.array(prompt_batch["index"]))
            yield from self._drain()

    def _drain(self) -> Iterator[Batch]:
        while self._buffer is not None and self._passes < self.mu:
            self._passes += 1  # counted when handed out, as the data module counts its batches
            yield {k: mx.array(v) for k, v in self._buffer.items()}

    def _fill(self, model: nn.Module, data: Any, index: np.ndarray) -> None:
        """One generation: completions (trajectories, with tools) sampled, scored, the rollout
        batch buffered."""
        prompts, ids, columns = self.sampler.prompts("train", index)
        rollout = self._rollout(model, prompts, ids, columns, self.group, self.sampling,
                                self.sampler.next_key)
        table, rewards = self._score(prompts, rollout, columns, self.group)
        advantages, std_zero = group_advantages(rewards, self.group, self.scale_rewards)
        batch = self.sampler.batch(ids, rollout.completions, self.group, rollout.masks)
        batch["advantages"] = advantages
        if self.mu > 1:  # the old policy of the clipped ratio: the model at generation time
            batch["old_logps"] = self._logps(model, batch)
        if self.beta:
            with adapters_off(model):
                batch["ref_logps"] = self._logps(model, batch)
        self._buffer, self._passes = batch, 0
        self.sampler.add_logs({**rollout_metrics(table, rewards, self.rewards,
                                                 rollout.model_tokens, self.sampler.stop_ids),
                               **rollout.metrics,
                               "frac_reward_zero_std": float(std_zero.mean())})

    def _rollout(self, model: nn.Module, prompts: list, ids: list[np.ndarray],
                 columns: dict[str, list], group: int, sampling: Sampling,
                 next_key: Callable[[], mx.array]) -> Rollout:
        """`group` completions of each prompt: one turn each, or with tools the agent's
        trajectories."""
        if self.agent is None:
            completions = sample_completions(model, ids, group, sampling, self.sampler.stop_ids,
                                             next_key())
            return Rollout(completions, None, completions, self.sampler.texts(completions), {},
                           {})
        trajectories = self.agent.rollout(model, prompts, ids, columns, group, sampling,
                                          next_key)
        tokens, masks = trajectory_rows(trajectories)
        return Rollout(tokens, masks, [t.model_tokens() for t in trajectories],
                       [t.answer for t in trajectories], reward_columns(trajectories),
                       self.agent.metrics(trajectories))

    def _score(self, prompts: list, rollout: Rollout, columns: dict[str, list],
               group: int) -> tuple[np.ndarray, np.ndarray]:
        """(each reward of each completion, their weighted sum)."""
        repeated = {k: [v for v in values for _ in range(group)] for k, values in columns.items()}
        prompts = [p for p in prompts for _ in range(group)]
        table = score(self.rewards, prompts, rollout.texts, repeated | rollout.columns)
        return table, total(table, self.rewards)

    def _logps(self, model: nn.Module, batch: dict[str, np.ndarray], rows: int = 16
               ) -> np.ndarray:
        """The model's log-prob of each label token (eval mode, no gradient), `rows` at a time."""
        training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(batch["input_ids"]), rows):
                logits = model(mx.array(batch["input_ids"][start:start + rows]))
                logps, _ = token_logps(logits, mx.array(batch["labels"][start:start + rows]),
                                       self.temperature)
                parts.append(np.array(logps, np.float32))
            return np.concatenate(parts)
        finally:
            model.train(training)

    # --- the loss (compiled by the step) --------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        mask = batch["loss_mask"]
        logps, entropy = token_logps(model(batch["input_ids"]), batch["labels"],
                                     self.temperature)
        loss, metrics, (tokens, completions) = policy_loss(
            self.loss_type, logps, batch["advantages"], mask, batch.get("old_logps"),
            batch.get("ref_logps"), self.beta, self.eps_low, self.eps_high,
            self.sampling.max_new_tokens)
        metrics["entropy"] = mx.stop_gradient((entropy * mask).sum() / mx.maximum(tokens, 1.0))
        # what the loss is a mean over: tokens (dapo), else completions (a padding row: none)
        return loss, {"ntokens": tokens if self.loss_type == "dapo" else completions, **metrics}

    # --- logs and evaluation --------------------------------------------------------------------

    def logs(self) -> dict[str, float]:
        """The rollouts' metrics averaged over the generations since the last logged line."""
        return self.sampler.logs()

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """One completion of every validation prompt (eval_temperature; 0 is greedy), scored by
        the rewards; sample completions logged as the artifact grpo_samples/step_<step>.jsonl
        (an evaluation outside a fit, step None, logs none)."""
        n = len(data.val)
        prompts, ids, columns = self.sampler.prompts("val", np.arange(n))
        key = mx.random.key(self.sampler.seed)  # every evaluation samples alike

        def next_key() -> mx.array:
            nonlocal key
            key, sub = mx.random.split(key)
            return sub

        first = mx.random.key(self.sampler.seed)
        rollout = self._rollout(model, prompts, ids, columns, 1, self.sampler.eval_sampling,
                                (lambda: first) if self.agent is None else next_key)
        table, rewards = self._score(prompts, rollout, columns, 1)
        metrics = rollout_metrics(table, rewards, self.rewards, rollout.model_tokens,
                                  self.sampler.stop_ids) | rollout.metrics
        shown = (self.sampler.texts(rollout.completions) if self.agent is None else
                 [self.sampler.decode(c.tolist(), skip_special_tokens=False)
                  for c in rollout.completions])
        self.sampler.log_samples([{"prompt": p, "completion": t, "reward": float(r),
                                   **{rw.name: float(v) for rw, v in zip(self.rewards, line)}}
                                  for p, t, r, line in zip(prompts, shown, rewards, table)], step)
        return Evaluation({f"{prefix}/{k}": v for k, v in metrics.items()})

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        if kind != "prompts":  # prompts for a language model (data=prompts) only
            return MetricSpec()
        out = {"reward": MetricDefinition("max"), "reward_std": MetricDefinition("min", 0.0),
               "completions/mean_length": MetricDefinition("min", 0.0)}
        return MetricSpec(out | {f"rewards/{name}/mean": MetricDefinition("max")
                                 for name in BUILTIN_REWARDS})


@dataclass(frozen=True)
class Rollout:
    """A generation's completions: the tokens after each prompt and their loss masks (None:
    all the model's), the model's tokens alone (what the length metrics count), the text the
    rewards judge, the columns rewards get beside the prompt's, and the agent's metrics."""

    completions: list[np.ndarray]
    masks: list[np.ndarray] | None
    model_tokens: list[np.ndarray]
    texts: list[str]
    columns: dict[str, list]
    metrics: dict[str, float]


def multi_turn(tools: Sequence[Mapping] | None, environment: Mapping | None, max_turns: int,
               tool_timeout_s: float | None, tool_format: str,
               tagged_format: Mapping | None, tool_workers: int = 4,
               tool_max_chars: int | None = 4096) -> Agent | None:
    """The agent of objective.tools / objective.environment (None: single-turn GRPO)."""
    tools, environment = _plain(tools) or [], _plain(environment)
    check_number("objective.max_turns", max_turns, int, 1)
    if tool_timeout_s is not None:
        check_number("objective.tool_timeout_s", tool_timeout_s, (int, float), 0.001)
    check_number("objective.tool_workers", tool_workers, int, 1)
    if tool_max_chars is not None:
        check_number("objective.tool_max_chars", tool_max_chars, int, 1)
    if tool_format not in FORMATS:
        raise ConfigError(f"objective.tool_format={tool_format!r} is not one of {list(FORMATS)}")
    unknown = sorted(set(_plain(tagged_format) or {}) - TAGGED_KEYS)
    if unknown:
        raise ConfigError(f"objective.tagged_format has no key {', '.join(unknown)}: its keys are "
                          f"{sorted(TAGGED_KEYS)}")
    if not tools and environment is None:
        return None
    return Agent(AgentSettings(tools, environment, int(max_turns), tool_timeout_s, tool_format,
                               _plain(tagged_format) or {}, int(tool_workers), tool_max_chars))


def environment_reward(prompts: Sequence, completions: Sequence[str],
                       environment_reward: Sequence[float], **_: Any) -> list[float]:
    """The reward the environments gave each trajectory (the sum of their steps')."""
    return [float(r) for r in environment_reward]


def _plain(node: Any) -> Any:
    """An OmegaConf node as plain Python (None stays None)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def rollout_metrics(table: np.ndarray, rewards: np.ndarray, specs: Sequence,
                    completions: list[np.ndarray], stop_ids: Sequence[int]) -> dict[str, float]:
    """TRL's per-generation metrics of scored completions (NaN-aware: a reward's None left out)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a reward that judged nothing: NaN
        out = {"reward": float(np.nanmean(rewards)),
               "reward_std": float(np.nanstd(rewards, ddof=1)) if len(rewards) > 1 else 0.0}
        for k, spec in enumerate(specs):
            out[f"rewards/{spec.name}/mean"] = float(np.nanmean(table[:, k]))
            out[f"rewards/{spec.name}/std"] = (float(np.nanstd(table[:, k], ddof=1))
                                               if len(table) > 1 else 0.0)
    return out | completion_metrics(completions, stop_ids)
