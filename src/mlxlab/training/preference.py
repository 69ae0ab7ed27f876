"""Preference tuning as a loss of the one loop (trainer.preference, trainer=dpo | orpo): the
policy's log-probabilities of both sides of each pair in one forward pass, the reference
model's, and a loss of preference_losses.py.

The reference model (DPO, IPO) is, by trainer.preference.reference:
- adapters: the policy itself with its LoRA adapters switched off (models/lora.py
  `adapters_off`): the same arrays, no second copy in memory; at the start the two agree;
- copy: a frozen copy of the model as the run starts, for training without adapters (its arrays
  are the model's own until the optimizer replaces them, then the copy keeps the originals);
- cached: the reference's log-probs of every pair computed once before training (adapters off,
  or the model as it starts), kept in data.cache_dir under a key of the pairs' tokens, the
  batching and the reference weights, and handed to the data, whose batches then carry them:
  no reference forward in the step; a resumed run, or a new run on the same model and pairs,
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
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlxlab.data.batching import Batching
from mlxlab.data.preference import SIDES, PreferencePairs
from mlxlab.errors import ConfigError
from mlxlab.models.lora import adapters_off, has_adapters
from mlxlab.training import losses
from mlxlab.training.preference_losses import NEEDS_REFERENCE, PairLogps, pair_loss
from mlxlab.training.settings import PreferenceConfig

log = logging.getLogger(__name__)

Batch = dict[str, mx.array]
CACHE_FOLDER = "preference_reference"


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
                "trainer.preference.reference=adapters needs LoRA adapters: set "
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


def build_preference_loss(
    config: PreferenceConfig,
    data,
    batching: Batching,
    model: nn.Module | None,
    per_example: bool = False,
) -> losses.LossFn:
    """The run's loss on preference batches; with reference=cached the reference log-probs are
    computed (or read) here, before training, and stored with the data."""
    if not isinstance(data, PreferencePairs):
        raise ConfigError(
            f"trainer.preference trains on preference pairs, not on "
            f"{type(data).__name__}: set data=preference (or experiment=dpo_chat)"
        )
    needs_reference = config.loss in NEEDS_REFERENCE
    reference_of = None
    if needs_reference:
        if model is None:
            raise ConfigError(
                "a preference loss with a reference model needs the model: "
                "build_loss(..., model=model)"
            )
        ref, context = reference_model(model, config)
        if config.reference == "cached":
            cache_reference(data, batching, ref, context)
        else:

            def reference_of(batch: Batch) -> PairLogps:
                with context():
                    logps, _ = sequence_logps(ref, batch)
                return PairLogps(*(mx.stop_gradient(x) for x in logps))

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        policy, nll = sequence_logps(model, batch)
        reference = None
        if needs_reference:
            reference = (
                reference_of(batch)
                if reference_of is not None
                else PairLogps(
                    batch["ref_chosen_logps"],
                    batch["ref_rejected_logps"],
                    policy.chosen_tokens,
                    policy.rejected_tokens,
                )
            )
        loss, metrics, per_pair = pair_loss(
            config.loss,
            policy,
            reference,
            chosen_nll=nll,
            beta=config.beta,
            label_smoothing=config.label_smoothing,
            gamma=config.gamma,
        )
        # pairs with a reply to score: all of a batch's (the data drops pairs without), none of
        # the row a rank without rows trains on under data parallelism (World.shard_rows masks
        # it), so that rank's loss and gradient weigh 0
        pairs = (policy.chosen_tokens > 0).astype(mx.float32).sum()
        aux = {"ntokens": pairs, **metrics}
        if per_example:
            aux["example_loss"] = per_pair
        return loss, aux

    return loss_fn


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
) -> Path | None:
    """The reference log-probs of every pair, read from data.cache_dir or computed once (in
    order, the model in eval mode) and written there; handed to the data. Returns the file."""
    path = None
    if data.cache_dir:
        path = Path(data.cache_dir) / CACHE_FOLDER / f"{reference_key(data, batching, ref)}.npz"
    if path is not None and path.is_file():
        with np.load(path) as saved:
            tables = {
                split: {side: saved[f"{split}/{side}"] for side in SIDES}
                for split in ("train", "val")
            }
        log.info(
            "preference: reference log-probs of %d + %d pairs read from %s",
            len(tables["train"]["chosen"]),
            len(tables["val"]["chosen"]),
            path,
        )
        data.set_reference(tables)
        return path
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
    data.set_reference(tables)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp.npz")
        np.savez(partial, **{f"{s}/{side}": tables[s][side] for s in tables for side in SIDES})
        partial.replace(path)  # whole or absent: a killed write leaves no half file
        log.info(
            "preference: reference log-probs of %d + %d pairs computed, kept in %s",
            len(tables["train"]["chosen"]),
            len(tables["val"]["chosen"]),
            path,
        )
    return path
