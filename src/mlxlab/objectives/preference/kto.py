"""KTO (`objective=kto`, Ethayarajh et al. 2024) on unpaired feedback (data=unpaired: a prompt, a
completion, a thumbs up or down), TRL's KTOTrainer loss (loss_type="kto") with its names.

Per row, with r = log π(y|x) - log π_ref(y|x) (summed over the completion's tokens) and z the
KL estimate:
  desirable:   desirable_weight   * (1 - σ(β (r - z)))
  undesirable: undesirable_weight * (1 - σ(β (z - r)))
the loss is their mean over the batch's rows. z is TRL's estimate from mismatched pairs: the
mean over the batch of log π(y'|x) - log π_ref(y'|x), y' the completion of another row of the
batch (data/unpaired.py builds them), clamped at 0 and without gradient. As in TRL, it is a
micro-batch's own estimate: a micro-batch of one row would estimate it from its own pair, so
trainer.batch_size and trainer.micro_batch must be above 1 (check_config). Under data
parallelism each rank estimates it from its own rows (TRL averages the ranks' estimates).

The reference is the policy with its LoRA adapters off (objective.reference=adapters, the
default with LoRA), or a frozen copy of the starting model (copy, for a full fine-tune), as
objective=dpo's (objectives/preference/preference.py `reference_model`). Metrics are TRL's: kl,
rewards/chosen and rewards/rejected (β r averaged over the desirable / undesirable rows),
logps/chosen and logps/rejected, and rewards/margin (TRL's rewards/margins: the two rewards'
difference). `aux["ntokens"]` is the number of rows (the loss is a mean over rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab.config.records import check_choice, check_number, record
from mlxlab.data.batching import Batching
from mlxlab.data.unpaired import UnpairedRows
from mlxlab.errors import ConfigError
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup
from mlxlab.objectives.preference.preference import reference_model
from mlxlab.objectives.validation import EmptyValidation
from mlxlab.runtime import distributed
from mlxlab.stats import LOG_PROB, LOSS, MetricDefinition

Batch = dict[str, mx.array]
REFERENCES = ("auto", "adapters", "copy")  # objective.reference
# What evaluate reports on unpaired rows (prefix "val/"), TRL's names, which way each improves.
METRICS = {"loss": LOSS, "kl": MetricDefinition("min", 0.0),
           "rewards/chosen": MetricDefinition("max"), "rewards/rejected": MetricDefinition("min"),
           "rewards/margin": MetricDefinition("max"), "logps/chosen": LOG_PROB,
           "logps/rejected": MetricDefinition("min", high=0.0)}


@dataclass(frozen=True)
class KTOConfig:
    """`objective=kto`, see conf/objective/kto.yaml (TRL's KTOConfig names)."""

    beta: float = 0.1                 # how far the policy may move from the reference
    desirable_weight: float = 1.0     # the desirable rows' loss weight
    undesirable_weight: float = 1.0   # the undesirable rows' loss weight
    reference: str = "auto"           # auto | adapters | copy

    def __post_init__(self) -> None:
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, key)
            check_number(f"objective.{key}", value, float, 0.0)
            if value <= 0:
                raise ConfigError(f"objective.{key} must be > 0, got {value}")
        check_choice("objective.reference", self.reference, REFERENCES)


def kto_loss(policy: mx.array, policy_kl: mx.array, reference: mx.array, reference_kl: mx.array,
             desirable: mx.array, counted: mx.array, beta: float = 0.1,
             desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[mx.array, dict[str, mx.array], mx.array]:
    """(loss, metrics, per-row losses) of TRL's KTO loss (module docstring) from per-row summed
    log-probs (B,): the completions' under the policy and the reference, the mismatched pairs'
    (`*_kl`) under both; `desirable` 1/0 a row, `counted` 1 for a row that counts (0: a masked
    padding row). The metrics are means over the counted rows of each kind (0 with none)."""
    n = mx.maximum(counted.sum(), 1.0)
    kl = mx.maximum(mx.stop_gradient(((policy_kl - reference_kl) * counted).sum() / n), 0.0)
    ratio = policy - reference
    chosen = 1.0 - mx.sigmoid(beta * (ratio - kl))
    rejected = 1.0 - mx.sigmoid(beta * (kl - ratio))
    per_row = mx.where(desirable > 0, desirable_weight * chosen, undesirable_weight * rejected)
    loss = (per_row * counted).sum() / n
    rewards, logps = mx.stop_gradient(beta * ratio), mx.stop_gradient(policy)
    good, bad = desirable * counted, (1.0 - desirable) * counted
    n_good, n_bad = mx.maximum(good.sum(), 1.0), mx.maximum(bad.sum(), 1.0)
    metrics = {"kl": kl, "rewards/chosen": (rewards * good).sum() / n_good,
               "rewards/rejected": (rewards * bad).sum() / n_bad,
               "logps/chosen": (logps * good).sum() / n_good,
               "logps/rejected": (logps * bad).sum() / n_bad}
    metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics, mx.stop_gradient(per_row)


def completion_logps(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """The summed log-probs of each row's completion and of its mismatched pair's, in one
    forward pass of 2B rows."""
    ids = mx.concatenate([batch["input_ids"], batch["kl_input_ids"]])
    labels = mx.concatenate([batch["labels"], batch["kl_labels"]])
    mask = mx.concatenate([batch["loss_mask"], batch["kl_loss_mask"]])
    sums = -(losses.token_cross_entropy(model(ids), labels) * mask).sum(axis=-1)
    b = batch["input_ids"].shape[0]
    return sums[:b], sums[b:]


class KTO(Objective):
    """KTO on unpaired feedback (see the module)."""

    def __init__(self, **settings: Any) -> None:
        self.config: KTOConfig = record(KTOConfig, settings, "objective", "objective=kto")
        self._reference = None
        self._per_example = False

    def setup(self, setup: ObjectiveSetup) -> None:
        if not isinstance(setup.data, UnpairedRows):
            raise ConfigError(f"objective=kto trains on rated completions, not on "
                              f"{type(setup.data).__name__}: set data=unpaired (or "
                              "experiment=kto_chat)")
        self._per_example = setup.per_example
        self._reference = reference_model(setup.model, self.config)

    def _reference_logps(self, batch: Batch) -> tuple[mx.array, mx.array]:
        if self._reference is None:
            raise RuntimeError("KTO.loss before setup()")
        ref, context = self._reference
        with context():
            logps, kl = completion_logps(ref, batch)
        return mx.stop_gradient(logps), mx.stop_gradient(kl)

    def _terms(self, model: nn.Module, batch: Batch):
        policy, policy_kl = completion_logps(model, batch)
        reference, reference_kl = self._reference_logps(batch)
        counted = (batch["loss_mask"].sum(axis=-1) > 0).astype(mx.float32)
        config = self.config
        loss, metrics, per_row = kto_loss(
            policy, mx.stop_gradient(policy_kl), reference, reference_kl, batch["desirable"],
            counted, config.beta, config.desirable_weight, config.undesirable_weight)
        return loss, metrics, per_row, counted, policy - reference, policy

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        loss, metrics, per_row, counted, _, _ = self._terms(model, batch)
        aux = {"ntokens": losses.rows_counted(batch["loss_mask"]), **metrics}
        if self._per_example:
            aux["example_loss"] = per_row
        return loss, aux

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The loss, the KL estimate (each batch's, weighted by its rows) and the rewards and
        log-probs averaged over the validation split's desirable and undesirable rows."""
        world = world or distributed.World()
        model.eval()
        names = ("loss", "kl", "rows", "good", "bad", "reward_good", "reward_bad", "logp_good",
                 "logp_bad")
        sums = dict.fromkeys(names, 0.0)
        for k, batch in enumerate(data.val_batches(batching)):
            if k % world.size != world.rank:
                continue
            loss, metrics, _, counted, ratio, logps = self._terms(model, batch)
            good = batch["desirable"] * counted
            bad = (1.0 - batch["desirable"]) * counted
            rows = counted.sum()
            values = {"loss": loss * rows, "kl": metrics["kl"] * rows, "rows": rows,
                      "good": good.sum(), "bad": bad.sum(),
                      "reward_good": (self.config.beta * ratio * good).sum(),
                      "reward_bad": (self.config.beta * ratio * bad).sum(),
                      "logp_good": (logps * good).sum(), "logp_bad": (logps * bad).sum()}
            mx.eval(values)
            for name, value in values.items():
                sums[name] += float(value)
        model.train()
        if world.enabled:
            sums = dict(zip(names, world.sum_numbers([sums[n] for n in names], "evaluation")))
        if sums["rows"] == 0:
            raise EmptyValidation("the validation split is empty: set data.val_file or raise "
                                  "data.val_fraction")
        good, bad = max(sums["good"], 1.0), max(sums["bad"], 1.0)
        out = {"loss": sums["loss"] / sums["rows"], "kl": sums["kl"] / sums["rows"],
               "rewards/chosen": sums["reward_good"] / good,
               "rewards/rejected": sums["reward_bad"] / bad,
               "logps/chosen": sums["logp_good"] / good, "logps/rejected": sums["logp_bad"] / bad}
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return Evaluation({f"{prefix}/{k}": v for k, v in out.items()})

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        return MetricSpec(dict(METRICS) if kind == "unpaired" else {})

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """Unpaired rows, and micro-batches of more than one row: the KL estimate is the
        micro-batch's mismatched pairs (a row alone is paired with itself)."""
        super().check_config(cfg, kind)
        trainer = cfg.get("trainer") or {}
        for key in ("batch_size", "micro_batch"):
            if trainer.get(key) == 1:
                raise ConfigError(f"trainer.{key}=1: objective=kto estimates its KL term from "
                                  "the other rows of a micro-batch; use 2 or more rows")
