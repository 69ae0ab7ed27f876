"""A reward model (`objective=reward`): a scalar head on the decoder (model.head=score, a linear
`score` layer on the last hidden states, as transformers' *ForSequenceClassification) trained
with TRL's RewardTrainer loss on preference pairs (data=preference).

A sequence's reward is its score at the reply's last token: the last token the pair's loss mask
marks, the end-of-turn token the chat template closes the reply with (transformers reads its
sequence classifier at the last token that is not padding: the same token, for a sequence that
ends there). Both sides of a batch's pairs run in one forward pass of 2B rows. The loss is
Bradley-Terry, TRL's:
  -log σ(r_chosen - r_rejected - margin)   (margin: the pairs' optional `margin` column, else 0)
  + center_rewards_coefficient * (r_chosen + r_rejected)²   (when set: Eisenstein et al. 2023)
averaged over the pairs. Metrics, TRL's names: accuracy (the share of pairs whose chosen reply
scores higher), margin (the mean of r_chosen - r_rejected) and mean_reward. LoRA trains the
adapters and the head; model.lora.rank=0 trains every weight. `aux["ntokens"]` is the number of
pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.config.records import check_number, record
from mlxlab.data.batching import Batching
from mlxlab.data.preference import SIDES, PreferencePairs
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOSS, UNIT, MetricDefinition

Batch = dict[str, mx.array]
# What evaluate reports on preference pairs (prefix "val/"), TRL's names, which way each
# improves (mean_reward, reported too, has no better direction: only the differences count).
METRICS = {"loss": LOSS, "accuracy": UNIT, "margin": MetricDefinition("max")}


@dataclass(frozen=True)
class RewardConfig:
    """`objective=reward`, see conf/objective/reward.yaml (TRL's RewardConfig names)."""

    center_rewards_coefficient: float | None = None  # null: off

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None:
            check_number("objective.center_rewards_coefficient",
                         self.center_rewards_coefficient, float, 0.0)


def bradley_terry(chosen: mx.array, rejected: mx.array, margin: mx.array | None = None,
                  center_rewards_coefficient: float | None = None,
                  counted: mx.array | None = None) -> tuple[mx.array, dict[str, mx.array],
                                                            mx.array]:
    """(loss, metrics, per-pair losses) of TRL's RewardTrainer from the rewards of each pair's
    two sides (B,); `counted` 1 for a pair that counts (0: a masked padding row)."""
    counted = mx.ones_like(chosen) if counted is None else counted
    n = mx.maximum(counted.sum(), 1.0)
    diff = chosen - rejected
    per_pair = -nn.log_sigmoid(diff - margin if margin is not None else diff)
    if center_rewards_coefficient is not None:
        per_pair = per_pair + center_rewards_coefficient * mx.square(chosen + rejected)
    loss = (per_pair * counted).sum() / n
    diff = mx.stop_gradient(diff)
    metrics = {"accuracy": ((diff > 0) * counted).sum() / n, "margin": (diff * counted).sum() / n,
               "mean_reward": (mx.stop_gradient(chosen + rejected) * counted).sum() / (2 * n)}
    return loss, metrics, mx.stop_gradient(per_pair)


def last_token_scores(model: nn.Module, ids: mx.array, labels: mx.array,
                      mask: mx.array) -> mx.array:
    """Each row's score at its last learnt token: `ids`/`labels`/`mask` are an lm batch's
    (labels = ids shifted by one), so the whole sequence is ids[:, :1] + labels and the token
    mask[t] marks is at position t + 1 of it."""
    tokens = mx.concatenate([ids[:, :1], labels], axis=1)
    positions = mx.arange(mask.shape[1])
    last = mx.max(mx.where(mask > 0, positions, -1), axis=1) + 1  # (a masked row: 0)
    scores = model(tokens)[..., 0].astype(mx.float32)
    return mx.take_along_axis(scores, last[:, None], axis=1)[:, 0]


def pair_rewards(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """The rewards of the chosen and the rejected side of each pair, one forward pass."""
    ids, labels, mask = (mx.concatenate([batch[f"{side}_{key}"] for side in SIDES])
                         for key in ("input_ids", "labels", "loss_mask"))
    rewards = last_token_scores(model, ids, labels, mask)
    b = batch["index"].shape[0]
    return rewards[:b], rewards[b:]


class Reward(Objective):
    """A Bradley-Terry reward model on preference pairs (see the module)."""

    model_head = "score"

    def __init__(self, **settings: Any) -> None:
        self.config: RewardConfig = record(RewardConfig, settings, "objective", "objective=reward")
        self._per_example = False

    def setup(self, setup: ObjectiveSetup) -> None:
        if not isinstance(setup.data, PreferencePairs):
            raise ConfigError(f"objective=reward trains on preference pairs, not on "
                              f"{type(setup.data).__name__}: set data=preference (or "
                              "experiment=reward_chat)")
        model = setup.model
        if not (isinstance(model, MLXLMDecoder) and model.head == "score"):
            raise ConfigError("objective=reward trains a scalar head on a pretrained decoder: "
                              "set model=hf_decoder model.head=score (or experiment=reward_chat)")
        self._per_example = setup.per_example

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        chosen, rejected = pair_rewards(model, batch)
        counted = (batch["chosen_loss_mask"].sum(axis=-1) > 0).astype(mx.float32)
        loss, metrics, per_pair = bradley_terry(
            chosen, rejected, batch.get("margin"), self.config.center_rewards_coefficient,
            counted)
        aux = {"ntokens": losses.rows_counted(batch["chosen_loss_mask"]), **metrics}
        if self._per_example:
            aux["example_loss"] = per_pair
        return loss, aux

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The loss, the pairwise accuracy, the mean margin and reward over the validation
        pairs."""
        return evaluate_by_loss(model, data.val_batches(batching), self.loss, world, prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec(dict(METRICS) if kind == "preference" else {})
