"""Preference tuning (`objective=dpo | orpo`, class `Preference`): the policy's log-probabilities
of both sides of each pair in one forward pass, the reference model's, and a loss of
preference_losses.py; evaluated by the same loss and its metrics over the validation pairs.

The reference model (DPO, IPO) is, by objective.reference:
- adapters: the policy itself with its LoRA adapters switched off (models/adapters/lora.py
  `adapters_off`): the same arrays, no second copy in memory; at the start the two agree;
- copy: a frozen copy of the model as the run starts, for training without adapters (its arrays
  are the model's own until the optimizer replaces them, then the copy keeps the originals);
- cached: the reference's log-probs of every pair computed once before training (adapters off,
  or the model as it starts), kept in data.cache_dir under a key of the pairs' tokens, the
  batching and the reference weights, and kept here, in the objective (a table per split, looked
  up by each batch's `index` inside the compiled loss): no reference forward in the step; a resumed run, or a new run on the same model and pairs,
  reads the same file (the step is then the same to the bit);
- auto: adapters when the model has LoRA layers, else copy.
The step's `aux["ntokens"]` is the number of pairs (the loss is a mean over pairs, and gradient
accumulation and data parallelism weight micro-batches by it; a masked padding row counts 0), so
the logged rate is pairs per second.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlxlab.config.records import check_choice, check_number, record
from mlxlab.data.batching import Batching
from mlxlab.data.preference import SIDES, PreferencePairs
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import adapters_off, has_adapters
from mlxlab.objectives import losses
from mlxlab.objectives.base import (
    Evaluation,
    MetricSpec,
    Objective,
    ObjectiveSetup,
    check_model_head,
    check_monitor,
)
from mlxlab.objectives.preference.preference_losses import (
    NEEDS_REFERENCE,
    PairLogps,
    check_loss_name,
    pair_loss,
)
from mlxlab.objectives.validation import evaluate_by_loss
from mlxlab.runtime.cluster import distributed
from mlxlab.stats import LOG_PROB, LOSS, UNIT, MetricDefinition

log = logging.getLogger(__name__)

Batch = dict[str, mx.array]
CACHE_FOLDER = "preference_reference"
REFERENCES = ("auto", "adapters", "copy", "cached")  # objective.reference
Tables = dict[str, dict[str, np.ndarray]]  # split -> side -> one reference log-prob a pair
# What evaluate reports on preference pairs (prefix "val/"), TRL's names (preference_losses.py),
# which way each improves and its range. The rewards are beta * log-ratios: the chosen's up and
# the rejected's down are what the loss asks for.
METRICS = {"loss": LOSS, "rewards/accuracy": UNIT, "rewards/margin": MetricDefinition("max"),
           "rewards/chosen": MetricDefinition("max"),
           "rewards/rejected": MetricDefinition("min"), "logps/chosen": LOG_PROB,
           "logps/rejected": MetricDefinition("min", high=0.0)}
# What loss=orpo reports besides (pair_loss's `extra`): its supervised term and odds ratio.
ORPO_METRICS = {"nll_loss": LOSS, "log_odds_ratio": LOG_PROB,
                "log_odds_chosen": MetricDefinition("max")}
# objective.gamma's default (conf/objective/dpo.yaml): another value is SimPO's
GAMMA = 0.5


@dataclass(frozen=True)
class PreferenceConfig:
    """`objective=dpo | orpo`: the preference loss and its reference model, see
    conf/objective/dpo.yaml."""

    loss: str = "sigmoid"         # sigmoid (DPO) | ipo | orpo | simpo (preference_losses.py)
    beta: float = 0.1             # DPO/IPO's beta, ORPO's lambda, SimPO's beta (TRL's names)
    label_smoothing: float = 0.0  # sigmoid and simpo: the chance a preference is flipped
    gamma: float = GAMMA          # simpo: the target reward margin
    reference: str = "auto"       # auto | adapters | copy | cached (sigmoid and ipo only)

    def __post_init__(self) -> None:
        check_loss_name(self.loss)
        check_number("objective.beta", self.beta, float, 0.0)
        if self.beta <= 0:
            raise ConfigError(f"objective.beta must be > 0, got {self.beta}")
        check_number("objective.label_smoothing", self.label_smoothing, float, 0.0)
        if self.label_smoothing >= 0.5:
            raise ConfigError("objective.label_smoothing must be below 0.5, got "
                              f"{self.label_smoothing}")
        check_number("objective.gamma", self.gamma, float)
        check_choice("objective.reference", self.reference, REFERENCES)
        # a setting the chosen loss would ignore is a mistake to say, not to swallow
        if self.label_smoothing > 0 and self.loss not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"objective.label_smoothing={self.label_smoothing} has no meaning for "
                f"loss={self.loss}: use loss=sigmoid or simpo, or label_smoothing=0")
        if self.gamma != GAMMA and self.loss != "simpo":
            raise ConfigError(
                f"objective.gamma={self.gamma} is SimPO's target margin and has no meaning "
                f"for loss={self.loss}: use objective.loss=simpo, or leave gamma at {GAMMA}")
        if self.reference != "auto" and self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(
                f"objective.reference={self.reference}: loss={self.loss} uses no "
                "reference model; leave reference=auto, or use loss=sigmoid or ipo")


def both_sides(batch: Batch) -> tuple[mx.array, mx.array, mx.array]:
    """(input_ids, labels, loss_mask) of the chosen rows then the rejected rows: one forward
    pass of 2B rows (TRL's concatenated forward)."""
    return tuple(
        mx.concatenate([batch[f"{side}_{key}"] for side in SIDES])
        for key in ("input_ids", "labels", "loss_mask")
    )


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[PairLogps, mx.array]:
    """The completions' summed log-probs and token counts under `model`, and the chosen
    completions' mean NLL per token (ORPO's supervised term)."""
    ids, labels, mask = both_sides(batch)
    ce = losses.token_cross_entropy(model(ids), labels) * mask  # right padding, causal
    sums, counts = -ce.sum(axis=-1), mask.sum(axis=-1)
    b = batch["index"].shape[0]
    nll = ce[:b].sum() / mx.maximum(counts[:b].sum(), 1.0)
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:]), nll


def reference_model(
    model: nn.Module, config: PreferenceConfig
) -> tuple[nn.Module, Callable[[], object]]:
    """(the module the reference runs as, a context it runs in) for reference adapters or
    copy; auto picks adapters when the model has them."""
    kind = config.reference
    if kind in ("auto", "cached"):
        kind = "adapters" if has_adapters(model) else "copy"
    if kind == "copy" and config.reference == "cached":  # used once, before any update
        return model, nullcontext
    if kind == "adapters":
        if not has_adapters(model):
            raise ConfigError(
                "objective.reference=adapters needs LoRA adapters: set "
                "model.lora.rank > 0, or reference=copy for a full fine-tune"
            )
        return model, lambda: adapters_off(model)
    frozen = copy.deepcopy(model)
    frozen.freeze()
    frozen.eval()
    # Arrays of their own, computed now: the compiled step reads them as constants. The arrays
    # deepcopy gives (even evaluated) made mx.compile refuse the step ("uncaptured inputs").
    frozen.update(tree_map(mx.array, frozen.parameters()))
    mx.eval(frozen.parameters())
    return frozen, nullcontext


class Preference(Objective):
    """DPO, IPO, ORPO or SimPO on preference pairs (see the module)."""

    def __init__(self, **settings: Any) -> None:
        self.config: PreferenceConfig = record(PreferenceConfig, settings, "objective",
                                               "objective=dpo | orpo")
        self.tables: Tables | None = None  # reference=cached: the reference log-probs
        self._lookup: dict[str, dict[str, mx.array]] = {}  # the tables, as arrays
        self._reference_of: Callable[[Batch], PairLogps] | None = None
        self._per_example = False

    def setup(self, setup: ObjectiveSetup) -> None:
        """The reference: a module to run in each step, or (reference=cached) its log-probs of
        every pair, computed (or read from data.cache_dir) here, before training."""
        data, config = setup.data, self.config
        if not isinstance(data, PreferencePairs):
            raise ConfigError(
                f"objective={'orpo' if config.loss == 'orpo' else 'dpo'} trains on preference "
                f"pairs, not on {type(data).__name__}: set data=preference (or "
                "experiment=dpo_chat)")
        self._per_example = setup.per_example
        if config.loss not in NEEDS_REFERENCE:
            return
        ref, context = reference_model(setup.model, config)
        if config.reference == "cached":
            self.tables = cache_reference(data, setup.batching, ref, context)
            self._lookup = {split: {side: mx.array(table[side]) for side in SIDES}
                            for split, table in self.tables.items()}
            return

        def reference_of(batch: Batch) -> PairLogps:
            with context():
                logps, _ = sequence_logps(ref, batch)
            return PairLogps(*(mx.stop_gradient(x) for x in logps))

        self._reference_of = reference_of

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        """The loss of a training batch."""
        return self._pair_loss(model, batch, "train")

    def loss_on(self, split: str) -> losses.LossFn:
        """The loss of a batch of `split` ("train" | "val"): a cached reference's table is per
        split (a batch's `index` is its pairs' places in their split)."""
        return lambda model, batch: self._pair_loss(model, batch, split)

    def _pair_loss(self, model: nn.Module, batch: Batch,
                   split: str) -> tuple[mx.array, dict[str, mx.array]]:
        config = self.config
        policy, nll = sequence_logps(model, batch)
        reference = None
        if config.loss in NEEDS_REFERENCE:
            reference = (self._reference_of(batch) if self._reference_of is not None
                         else self._cached(batch, policy, split))
        loss, metrics, per_pair = pair_loss(
            config.loss, policy, reference, chosen_nll=nll, beta=config.beta,
            label_smoothing=config.label_smoothing, gamma=config.gamma)
        # pairs with a reply to score: all of a batch's (the data drops pairs without), none of
        # the row a rank without rows trains on under data parallelism (World.shard_rows masks
        # it), so that rank's loss and gradient weigh 0
        pairs = (policy.chosen_tokens > 0).astype(mx.float32).sum()
        aux = {"ntokens": pairs, **metrics}
        if self._per_example:
            aux["example_loss"] = per_pair
        return loss, aux

    def _cached(self, batch: Batch, policy: PairLogps, split: str) -> PairLogps:
        """The cached reference log-probs of the batch's pairs (looked up by `index`)."""
        if not self._lookup:
            raise RuntimeError("Preference.loss before setup()")
        table, index = self._lookup[split], batch["index"]
        return PairLogps(table["chosen"][index], table["rejected"][index],
                         policy.chosen_tokens, policy.rejected_tokens)

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The loss and its metrics (rewards/accuracy, ...) averaged over the validation pairs."""
        return evaluate_by_loss(model, data.val_batches(batching), self.loss_on("val"), world,
                                prefix)

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        """Every preference loss's metrics, ORPO's own among them (check_config: this one's)."""
        return MetricSpec({**METRICS, **ORPO_METRICS} if kind == "preference" else {})

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """Preference pairs, and an optimized_metric the configured loss logs (ORPO's
        nll_loss is not DPO's: a monitor never logged keeps no best checkpoint)."""
        if kind != "preference":
            super().check_config(cfg, kind)
            return
        check_model_head(cfg, cls)
        loss = cfg.objective.get("loss") or PreferenceConfig.loss
        reported = METRICS if loss != "orpo" else {**METRICS, **ORPO_METRICS}
        check_monitor(cfg, kind, reported, f"Preference(loss={loss})")


def reference_key(data: PreferencePairs, batching: Batching, ref: nn.Module) -> str:
    """The cache file's key: the pairs' tokens, the batches they are scored in (padding changes
    the last bits of a sum) and the weights the reference computes with (a LoRA model's base
    weights: its adapters are off)."""
    digest = hashlib.sha256(f"{data.fingerprint()}|{batching}".encode())
    for name, value in sorted(tree_flatten(ref.parameters())):
        if not name.endswith((".lora_a", ".lora_b")):
            digest.update(name.encode())
            digest.update(
                np.array(
                    value.astype(mx.float32) if value.dtype == mx.bfloat16 else value
                ).tobytes()
            )
    return digest.hexdigest()[:20]


def cache_reference(
    data: PreferencePairs, batching: Batching, ref: nn.Module, context: Callable[[], object]
) -> Tables:
    """The reference log-probs of every pair of each split, read from data.cache_dir or computed
    once (in order, the model in eval mode) and written there."""
    path = None
    if data.cache_dir:
        path = Path(data.cache_dir) / CACHE_FOLDER / f"{reference_key(data, batching, ref)}.npz"
    if path is not None and path.is_file():
        with np.load(path) as saved:
            tables = {
                split: {side: saved[f"{split}/{side}"] for side in SIDES}
                for split in ("train", "val")
            }
        return said(tables, "read from", path)
    training = ref.training
    ref.eval()
    tables = {}
    with context():
        for split, batches in data.splits_in_order(batching).items():
            table = {side: np.zeros(0, np.float32) for side in SIDES}
            if batches:
                n = max(int(np.array(b["index"]).max()) for b in batches) + 1
                table = {side: np.zeros(n, np.float32) for side in SIDES}
            for batch in batches:
                logps, _ = sequence_logps(ref, batch)
                mx.eval(logps)
                index = np.array(batch["index"])
                table["chosen"][index] = np.array(logps.chosen)
                table["rejected"][index] = np.array(logps.rejected)
            tables[split] = table
    ref.train(training)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npz")  # parallel jobs: their own
        np.savez(partial, **{f"{s}/{side}": tables[s][side] for s in tables for side in SIDES})
        partial.replace(path)  # whole or absent: a killed write leaves no half file
        said(tables, "computed, kept in", path)
    return tables


def said(tables: Tables, how: str, path: Path) -> Tables:
    """One log line for the reference log-probs read or written at `path`."""
    log.info("preference: reference log-probs of %d + %d pairs %s %s",
             len(tables["train"]["chosen"]), len(tables["val"]["chosen"]), how, path)
    return tables
