"""Periodic model analyses off the training thread (`callbacks=analysis`).

Every `every_steps` steps the training thread takes a snapshot of the weights: a reference to
the parameter tree, nothing copied (MLX arrays are immutable and the optimizer replaces them, so
the tree keeps the values of that step), and hands it to one background worker. The worker loads
it into its own copy of the model (a `deepcopy` made once) and computes, on a fixed probe batch
from the validation data:

    analysis/weight_norm/<layer>      L2 norm of each layer's weights
    analysis/grad_norm/<layer>        L2 norm of each layer's gradient on the probe batch
    analysis/attention_entropy/<layer> mean entropy (nats) of its attention distributions
    analysis/embedding/*              row-norm mean/std, mean cosine to the mean row, effective rank
    samples/step_NNNNNN.txt           language models: a short generation (an artifact)

and logs them at the snapshot's step. A snapshot that comes due while the worker is still busy is
skipped (counted in analysis/skipped): the step never waits for an analysis. The run's end waits
for the one in flight, so its results land before the run is closed.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model
from mlxlab.models.layers.blocks import Attention
from mlxlab.objectives import losses
from mlxlab.training.callbacks import Callback

log = logging.getLogger(__name__)


class BackgroundAnalysis(Callback):
    """Weight/gradient norms per layer, attention entropy, embedding statistics and an LM sample
    every `every_steps` steps, computed by a background worker on a snapshot of the weights."""

    def __init__(
        self,
        every_steps: int = 50,
        weight_norms: bool = True,
        grad_norms: bool = True,
        attention_entropy: bool = True,
        embedding_stats: bool = True,
        sample_tokens: int = 32,
        probe_batch_size: int = 8,
        end_wait_s: float = 120.0,
    ) -> None:
        if every_steps < 1:
            raise ValueError(f"callbacks.analysis.every_steps must be >= 1, got {every_steps}")
        self.every_steps = every_steps
        self.weight_norms, self.grad_norms = weight_norms, grad_norms
        self.attention_entropy, self.embedding_stats = attention_entropy, embedding_stats
        self.sample_tokens, self.probe_batch_size = sample_tokens, probe_batch_size
        self.end_wait_s = end_wait_s
        self.model = self.shadow = self.tracker = self.probe = self.tokenizer = None
        self.loss_fn = None
        self.enabled = True
        self.skipped = 0
        self.done: list[int] = []  # steps analysed (in order of completion)
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future | None = None
        self._lock = threading.Lock()

    def setup(self, context, model, data) -> None:
        self.enabled = context.world.is_main
        if not self.enabled:
            return
        self.model, self.tracker = model, context.tracker
        self.loss_fn = context.probe_loss
        if self.grad_norms and self.loss_fn is None and data.has_validation:
            raise ConfigError(
                "callbacks.analysis.grad_norms=true: the run's objective trains on batches it "
                "makes, not on the data's, so a probe batch of the data has no loss to "
                "differentiate: set callbacks.analysis.grad_norms=false")
        self.shadow = copy.deepcopy(model)  # the worker's own model: training's is never touched
        self.shadow.eval()
        if data.has_validation:
            self.probe = next(iter(data.val_batches(Batching(batch_size=self.probe_batch_size))),
                              None)
        self.tokenizer = data.tokenizer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analysis")

    # --- the training thread --------------------------------------------------------------

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if not self.enabled or step % self.every_steps:
            return
        with self._lock:
            if self._running is not None and not self._running.done():
                self.skipped += 1  # never wait: the step goes on, this snapshot is dropped
                return
            snapshot = self.model.parameters()  # references: the values of this step
            self._running = self._executor.submit(self._analyse, step, snapshot)

    def on_train_end(self) -> None:
        if self._executor is None:
            return
        running = self._running
        if running is not None:
            try:
                running.result(timeout=self.end_wait_s)
            except Exception as e:  # an analysis never fails a run
                log.warning("analysis: the last analysis did not finish: %s", e)
        if self.skipped and self.tracker is not None:
            self.tracker.log_metrics({"analysis/skipped": float(self.skipped)}, self.done[-1]
                                     if self.done else 0)
        self._executor.shutdown(wait=False)
        self._executor = None

    # --- the worker -----------------------------------------------------------------------

    def _analyse(self, step: int, snapshot: dict) -> None:
        try:
            self.shadow.update(snapshot)
            metrics = analyse(self.shadow, self.probe, self.loss_fn, weight_norms=self.weight_norms,
                              grad_norms=self.grad_norms, attention=self.attention_entropy,
                              embedding=self.embedding_stats)
            self.tracker.log_metrics(metrics, step)
            # a decoder's sample (sample_text: None for a model that does not generate)
            if self.sample_tokens and self.probe is not None:
                text = sample_text(self.shadow, lm_view(self.probe), self.tokenizer,
                                   self.sample_tokens)
                if text is not None:
                    self.tracker.log_text(text, f"samples/step_{step:06d}.txt")
            self.done.append(step)
        except Exception as e:
            log.warning("analysis at step %d failed: %s", step, e)
            raise


def layer_of(path: str) -> str:
    """'encoder.layers.3.attention.query.weight' -> 'encoder.layers.3'; 'classifier.weight' ->
    'classifier': one group per block, one per other top-level part."""
    match = re.match(r"^(.*?\.\d+)\.", path)
    return match.group(1) if match else path.split(".")[0]


def grouped_norms(tree: dict) -> dict[str, float]:
    sums: dict[str, mx.array] = {}
    for path, value in tree_flatten(tree):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            part = (value.astype(mx.float32) ** 2).sum()
            key = layer_of(path)
            sums[key] = sums[key] + part if key in sums else part
    mx.eval(sums)
    return {k: math.sqrt(float(v)) for k, v in sums.items()}


def lm_view(probe: dict) -> dict:
    """The probe as the model reads it: a batch whose token ids are under a prefixed name
    (`<side>_input_ids` with `<side>_labels`, ...: two sequences a row) as the batch of the
    first of them; any other batch as it is."""
    if "input_ids" in probe:
        return probe
    side = next((k.removesuffix("input_ids") for k in probe if k.endswith("_input_ids")), None)
    if side is None:
        return probe
    return {k.removeprefix(side): v for k, v in probe.items() if k.startswith(side)}


def analyse(model: nn.Module, probe: dict | None, loss_fn: losses.LossFn | str | None,
            weight_norms: bool = True, grad_norms: bool = True, attention: bool = True,
            embedding: bool = True) -> dict[str, float]:
    """The metrics of one analysis of `model` (already holding the snapshot's weights).
    `loss_fn`: the objective's loss on the probe (TrainContext.probe_loss), or a data task
    name for its cross-entropy."""
    out: dict[str, float] = {}
    if weight_norms:
        out.update({f"analysis/weight_norm/{k}": v for k, v in grouped_norms(model.parameters()).items()})
    if grad_norms and probe is not None and loss_fn is not None:
        loss_fn = losses.task_loss(loss_fn) if isinstance(loss_fn, str) else loss_fn
        (_, _), grads = nn.value_and_grad(model, loss_fn)(model, probe)
        out.update({f"analysis/grad_norm/{k}": v for k, v in grouped_norms(grads).items()})
    if attention and probe is not None:
        out.update({f"analysis/attention_entropy/{k}": v
                    for k, v in attention_entropies(model, lm_view(probe)).items()})
    if embedding:
        out.update(embedding_statistics(model))
    return out


_ENTROPY: dict[int, mx.array] = {}  # id(attention module) -> its last mean entropy (the worker's)


class _RecordingAttention(Attention):
    """Attention that also keeps the mean entropy of the distributions its forward pass mixes
    the values with (Attention.weights: the layer's own projections), on the worker's copy of
    the model only: its class is swapped for one forward pass."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        p = self.weights(x, mask)
        # Kept beside the module: an array set on an nn.Module would become one of its parameters.
        _ENTROPY[id(self)] = -(p * mx.log(mx.maximum(p, 1e-30))).sum(axis=-1).mean()
        return Attention.__call__(self, x, mask, cache)


def attention_entropies(model: nn.Module, probe: dict) -> dict[str, float]:
    """Mean entropy (nats) of each Attention layer's distributions on `probe`, by block."""
    named = sorted(((layer_of(name), m) for name, m in model.named_modules()
                    if type(m) is Attention), key=lambda item: _natural(item[0]))
    if not named:
        return {}
    layers = [m for _, m in named]
    for m in layers:
        m.__class__ = _RecordingAttention
    try:
        mx.eval(losses.forward(model, probe))
        values = [_ENTROPY[id(m)] for m in layers]
        mx.eval(values)
    finally:
        for m in layers:
            m.__class__ = Attention
            _ENTROPY.pop(id(m), None)
    return {name: float(v) for (name, _), v in zip(named, values)}


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _embedding_matrix(model: nn.Module) -> np.ndarray | None:
    found = [(path, v) for path, v in tree_flatten(model.parameters())
             if "embed" in path and path.endswith("weight") and v.ndim == 2]
    if not found:
        return None
    path, weight = max(found, key=lambda item: item[1].shape[0])  # the token table
    return np.array(weight.astype(mx.float32))


def embedding_statistics(model: nn.Module, max_rows: int = 4096) -> dict[str, float]:
    """Row norms, anisotropy (mean cosine of rows to their mean direction) and effective rank
    (exp of the entropy of the normalized singular values) of the token embedding table."""
    table = _embedding_matrix(model)
    if table is None:
        return {}
    rows = table[:max_rows].astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    unit = rows / np.maximum(norms[:, None], 1e-12)
    mean_dir = unit.mean(axis=0)
    cosine = unit @ (mean_dir / max(np.linalg.norm(mean_dir), 1e-12))
    s = np.linalg.svd(rows - rows.mean(axis=0), compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    rank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    return {"analysis/embedding/norm_mean": float(norms.mean()),
            "analysis/embedding/norm_std": float(norms.std()),
            "analysis/embedding/cosine_to_mean": float(cosine.mean()),
            "analysis/embedding/effective_rank": rank}


def sample_text(model: Model, probe: dict, tokenizer, max_tokens: int) -> str | None:
    """Greedy continuation of the probe's first 8 tokens (seeded, so steps compare)."""
    from mlxlab.decoding.generation import generate_tokens

    if tokenizer is None or model.make_cache() is None:  # (models/base.py: None = no decoder)
        return None
    prompt = np.array(probe["input_ids"][0, :8]).tolist()
    out: list[int] = []
    for token in generate_tokens(model, prompt, temperature=0.0):
        out.append(token)
        if len(out) >= max_tokens:
            break
    return f"{tokenizer.decode(prompt)} ||| {tokenizer.decode(out)}\n"

