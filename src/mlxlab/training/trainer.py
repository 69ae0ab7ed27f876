"""The one training loop: the Trainer's settings and the loop over a Run's points (run.py).

`trainer=simple|distill|optimized` are configurations of this class: distillation is a loss hook,
accumulation a compiled step variant, dynamic batching a data-side batching policy, and progress,
early stopping and memory logging are callbacks. The settings are read, never changed: what one
`fit` builds and changes lives in its Run, so two calls of fit behave the same.

The step follows mlx-examples: `nn.value_and_grad` over a pure loss, one `mx.compile`d function
over `[model.state, optimizer.state, mx.random.state]` (built after any checkpoint is restored,
so it never writes to stale state), and one `mx.eval` per optimizer step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxlab import kernels
from mlxlab.checkpoint import (
    rng_state,
    set_rng_state,
)
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model
from mlxlab.models.quantize import quantize_linears
from mlxlab.runtime import device, distributed, failures
from mlxlab.tracking.base import Tracker, flatten_config
from mlxlab.training import losses, metrics
from mlxlab.training.callbacks import Callback, ModelCheckpoint, checkpoint_policy
from mlxlab.training.optim import (
    OptimizerFactory,
    build_optimizer,
    clip_by_global_norm,
    default_optimizer,
)
from mlxlab.training.run import (  # noqa: F401  (FitResult, TrainingInterrupted: public here too)
    FitResult,
    Run,
    TrainingError,
    TrainingInterrupted,
)
from mlxlab.training.settings import (  # noqa: F401  (configs saved before settings.py
    DistillConfig,  # name mlxlab.training.trainer.DistillConfig: they keep building)
    DistributedConfig,
    TrainerSettings,
)

log = logging.getLogger(__name__)


# (teacher specs, vocab_size, num_labels, label_names) -> (frozen teacher models, weights)
TeacherLoader = Callable[[list, int, "int | None", "list[str] | None"],
                         tuple[list[nn.Module], list[float]]]


class Trainer:
    """The one loop. Its knobs come in one frozen `TrainerSettings` (`conf/trainer/*.yaml`,
    training/settings.py); what it trains with comes in built: the optimizer as a partial
    (`conf/optimizer/*.yaml`, learning_rate = the peak of `settings.schedule`), the callbacks
    (`conf/callbacks/*.yaml`) and, for distillation, `load_teachers`, which turns
    `trainer.distill.teachers` into models (train.py gives runs.load_teachers, so the loop never
    reaches up into finished runs itself)."""

    def __init__(
        self,
        settings: TrainerSettings | None = None,
        optimizer: OptimizerFactory | None = None,
        callbacks: Sequence[Callback] = (),
        load_teachers: TeacherLoader | None = None,
    ) -> None:
        self.settings = settings or TrainerSettings()
        self.optimizer_factory = optimizer or default_optimizer()
        self.callbacks = list(callbacks)
        self.load_teachers = load_teachers
        # batch_size is per rank under data parallelism, as with torchrun (Run scales it)
        self.batching = self.settings.data_batching()

    @property
    def checkpointing(self) -> ModelCheckpoint:
        """The ModelCheckpoint among the callbacks, else its defaults (checkpoints always exist)."""
        return checkpoint_policy(self.callbacks)

    def build_optimizer(self, total_steps: int):
        """The configured optimizer, its learning rate following the schedule over total_steps."""
        return build_optimizer(self.optimizer_factory, self.settings.schedule, total_steps)

    # --- hooks ---------------------------------------------------------------------------

    def build_loss(self, data) -> losses.LossFn:
        return self.loss_setup(data, self.batching)[0]

    def loss_setup(self, data, batching: Batching) -> tuple[losses.LossFn, list[float]]:
        """The run's loss function and, distilling, each teacher's (normalized) weight."""
        per_example = any(cb.needs_example_losses for cb in self.callbacks)
        distill, smoothing = self.settings.distill, self.settings.label_smoothing
        weights: list[float] = []
        if distill:
            if self.load_teachers is None:
                raise ConfigError("a distilling Trainer needs load_teachers= (e.g. "
                                  "mlxlab.runs.load_teachers), which builds its teachers")
            teachers, weights = self.load_teachers(
                distill.teachers, data.vocab_size, data.num_labels, data.label_names
            )
            if distill.teacher_weights == "learned" and len(teachers) > 1:
                from mlxlab.training.teacher_weights import fit_teacher_weights

                # Streamed text has no in-order pass over its training rows: its validation
                # batches are used instead (the weights then saw the validation data).
                rows = data.train_batches_in_order(batching) or data.val_batches(batching)
                weights = fit_teacher_weights(teachers, rows)
            cache = None
            if distill.cache_teacher:
                probs_of = losses.teacher_targets(teachers, weights, distill.temperature,
                                                  distill.loss)
                cache = self.teacher_cache(data, probs_of, batching)
            loss_fn = losses.distillation_loss(
                teachers, weights, alpha=distill.alpha, temperature=distill.temperature,
                label_smoothing=smoothing, cache=cache, per_example=per_example,
                loss=distill.loss, kl_scale=distill.kl_scale,
            )
            weights = [w / sum(weights) for w in weights]
        else:
            loss_fn = losses.task_loss(data.task, smoothing, per_example)
        dtype = self.compute_dtype()
        return (loss_fn if dtype == mx.float32 else mixed_precision(loss_fn, dtype)), weights

    def teacher_cache(self, data, probs_of, batching: Batching) -> mx.array | None:
        """The teachers' probabilities for every training example, from one pass before training.

        The teachers are frozen and in eval mode, so on a fixed dataset an example's soft targets
        never change: looking them up makes a distilled step cost what the student's step costs.
        None (run the teachers in every step) for data without `train_batches_in_order`, such as
        streamed text, where a vocabulary-sized distribution per token would be too big to keep.
        """
        in_order = data.train_batches_in_order(batching)
        if in_order is None:
            return None
        parts = []
        for batch in in_order:
            probs = probs_of(batch)
            mx.eval(probs)
            parts.append((np.array(batch["index"]), np.array(probs)))
        table = np.zeros((max(int(i.max()) for i, _ in parts) + 1, parts[0][1].shape[-1]), np.float32)
        for index, probs in parts:
            table[index] = probs
        log.info("distillation: teacher probabilities of %d training examples cached", len(table))
        return mx.array(table)

    def compute_dtype(self) -> mx.Dtype:
        if self.settings.precision == "auto":
            return device.default_compute_dtype()
        # the choices are checked by TrainerSettings (settings.PRECISIONS)
        return {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}[self.settings.precision]

    # --- the step ------------------------------------------------------------------------

    def make_step(self, model: nn.Module, optimizer, loss_fn: losses.LossFn,
                   world: distributed.World | None = None, shards=None, grad_accum: int | None = None):
        """Returns step(batches) -> (loss, grad_norm, aux); one optimizer update per call.

        With grad_accum > 1 the gradients of the micro-batches are summed, weighted by their token
        counts, so N micro-batches of size B give the update of one batch of N*B. `world` and
        `shards` (distributed.OptimizerShards, ZeRO-1) are the run's; default: one process.
        """
        kernels.set_mode(self.settings.fused_kernels)  # the ops the step traces
        world = world or distributed.World()
        grad_accum = grad_accum or self.settings.grad_accum
        loss_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state]
        clip = self.settings.grad_clip
        compile_ = (partial(mx.compile, inputs=state, outputs=state) if self.settings.compile
                    else (lambda f: f))
        update = partial(optimizer.update, model) if shards is None else partial(shards.update, model, optimizer)

        @compile_
        def fused_step(batch):
            (loss, aux), grads = loss_and_grad(model, batch)
            grads, norm = clip_by_global_norm(grads, clip)
            update(grads)
            return loss, norm, aux

        # Data parallel runs take the accumulation path below even for one micro-batch: its
        # apply_step sums value x count over ranks, so the update is the global batch's. (With
        # MLX 0.32 on CPU, an all_sum compiled into the same graph as the backward pass hung on
        # the ring backend; in its own compiled function it does not.)
        if grad_accum == 1 and not world.enabled:
            def step(batches):
                loss, norm, aux = fused_step(batches[0])
                mx.eval(loss, norm, aux, state)
                return loss, norm, aux

            return step

        @compile_
        def grad_step(batch):
            (loss, aux), grads = loss_and_grad(model, batch)
            examples = losses.pop_example_outputs(aux)  # per row: concatenated, not averaged
            n = aux["ntokens"]
            weighted = {k: v * n for k, v in aux.items() if k != "ntokens"}
            return loss * n, n, weighted, tree_map(lambda g: g * n, grads), examples

        @compile_
        def apply_step(grads, ntokens, loss_sum, aux_sum):
            summed = world.all_sum_tree({"g": grads, "n": ntokens, "l": loss_sum, "a": aux_sum})
            grads, ntokens = tree_map(lambda g: g / summed["n"], summed["g"]), summed["n"]
            grads, norm = clip_by_global_norm(grads, clip)
            update(grads)
            aux = {k: v / ntokens for k, v in summed["a"].items()} | {"ntokens": ntokens}
            return norm, summed["l"] / ntokens, aux

        compiled: list[bool] = []

        def step(batches):
            total_loss, total_n, total_aux, acc, examples = 0.0, 0.0, None, None, []
            for batch in batches:
                loss_sum, n, aux_sum, grads, per_row = grad_step(batch)
                examples.append(per_row)
                if acc is None:
                    acc, total_aux = grads, aux_sum
                else:
                    acc, total_aux = tree_map(mx.add, acc, grads), tree_map(mx.add, total_aux, aux_sum)
                total_loss, total_n = total_loss + loss_sum, total_n + n
                mx.eval(acc, total_aux, total_loss, total_n)  # one micro-batch of activations alive
            # The first update also compiles (and a rank may still be compiling its grad step).
            with world.guard("a training step", 1.0 if compiled else 10.0):
                norm, loss, aux = apply_step(acc, total_n, total_loss, total_aux)
                for key in examples[0]:  # evaluated here: callbacks may read them on a thread
                    aux[key] = mx.concatenate([e[key] for e in examples])  # with no MLX stream
                mx.eval(loss, norm, aux, state)
            compiled.append(True)
            return loss, norm, aux

        return step

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(self, model: nn.Module, data, task: str, prefix: str = "val",
                 batching: Batching | None = None, world: distributed.World | None = None
                 ) -> dict[str, float]:
        """Validation metrics (see evaluate_outputs)."""
        return self.evaluate_outputs(model, data, task, batching, world, prefix)[0]

    def evaluate_outputs(
        self, model: nn.Module, data, task: str, batching: Batching | None = None,
        world: distributed.World | None = None, prefix: str = "val",
    ) -> tuple[dict[str, float], tuple | None]:
        """(validation metrics, classification's (labels, probabilities) for the confusion
        matrix, else None). Under data parallelism (`world`) each rank evaluates every N-th batch
        and the sums (and, for classifiers, the labels and probabilities) are reduced over ranks."""
        model.eval()
        total, count, probs, labels = 0.0, 0.0, [], []
        world = world or distributed.World()
        for k, batch in enumerate(data.val_batches(batching or self.batching)):
            if k % world.size != world.rank:
                continue
            logits = losses.forward(model, batch).astype(mx.float32)
            ce_sum, n = losses.masked_sum(losses.token_cross_entropy(logits, batch["labels"]), batch)
            if task == "classification":
                p = mx.softmax(logits, axis=-1)
                mx.eval(ce_sum, n, p)
                probs.append(np.array(p))
                labels.append(np.array(batch["labels"]))
            else:
                mx.eval(ce_sum, n)
            total += float(ce_sum)
            count += float(n)
        model.train()
        if world.enabled:
            total, count = world.sum_numbers([total, count], "evaluation")
            if task == "classification":
                width = data.num_labels
                labels = [world.gather_rows(np.concatenate(labels) if labels else np.zeros(0, np.int32))]
                probs = [world.gather_rows(
                    np.concatenate(probs) if probs else np.zeros((0, width), np.float32))]
        if count == 0:
            raise TrainingError(
                "the validation split is empty: hold out more (data.val_fraction for tables, "
                "data.splits.val_examples for streamed text) or add data"
            )
        mean = total / count
        if task == "classification":
            outputs = (np.concatenate(labels), np.concatenate(probs))
            return metrics.classification_metrics(*outputs, loss=mean, prefix=prefix), outputs
        return metrics.lm_metrics(mean, prefix=prefix), None

    # --- the loop ------------------------------------------------------------------------

    def plan(self, data, batching: Batching | None = None, grad_accum: int | None = None,
             world: distributed.World | None = None) -> tuple[int, float, int | None]:
        """(total optimizer steps, epochs, steps per epoch): the run ends at max_steps or
        max_epochs, first come. A stream's epoch is counted (one pass) when max_epochs is set,
        as far as it could end the run before max_steps; past that its steps per epoch stay
        None (unknown)."""
        batching, settings = batching or self.batching, self.settings
        max_epochs, max_steps = settings.max_epochs, settings.max_steps
        accum = grad_accum or settings.grad_accum
        batches = data.num_train_batches(batching)
        if batches is None and max_epochs:
            limit = math.ceil(max_steps * accum / max_epochs) if max_steps else None
            batches = data.count_train_batches(batching, limit)
            if batches is not None and world is not None and world.enabled:
                # lanes of a stream: an epoch ends for all when the shortest lane runs dry
                counts = world.sum_numbers([batches if r == world.rank else 0.0
                                            for r in range(world.size)], "the epoch's length")
                batches = int(min(counts))
            if limit is not None and batches is not None and batches > limit:
                batches = None  # max_steps comes first
            elif not batches:
                raise ConfigError("the training split holds no full batch: lower "
                                  "trainer.batch_size or data.packing.seq_len")
        per_epoch = math.ceil(batches / accum) if batches else None
        limits = [max_steps]
        if max_epochs and per_epoch:
            limits.append(max_epochs * per_epoch)
        if not any(limits):
            raise ConfigError("this data has no known length: set trainer.max_steps or "
                              "trainer.max_epochs")
        return min(x for x in limits if x), max_epochs or math.inf, per_epoch

    def fit(
        self,
        model: nn.Module,
        data: DataModule,
        tracker: Tracker,
        run_dir: str | Path,
        config: dict | None = None,
        tags: dict | None = None,
        resume: str | Path | None = None,
    ) -> FitResult:
        """Train `model` on `data`, tracked by `tracker`, checkpointed under `run_dir`; `resume`
        (a run or checkpoint folder) continues where it stopped. Returns the best evaluation."""
        if not isinstance(model, Model):
            raise TypeError(f"{type(model).__name__} is not a model of mlxlab: subclass "
                            "mlxlab.models.base.Model (its optional members have defaults)")
        check_contract(data, DataModule, "data module")
        check_contract(tracker, Tracker, "tracker")
        run = Run(self, model, data, tracker, Path(run_dir), config or {}, dict(tags or {}), resume)
        state, status = run.state, "FAILED"
        with run.stop:  # SIGTERM/SIGINT: finish the step, checkpoint, leave (Run.interrupt)
            try:
                for cb in run.callbacks:
                    cb.on_train_start(run.total_steps, state.step)
                stopped = state.step >= run.total_steps  # a finished run resumed: nothing left
                while state.epoch < run.max_epochs and not stopped:
                    pending: list = []
                    for batch in data.train_batches(run.batching, state.epoch):
                        pending.append(run.rows_of(batch))
                        if len(pending) == run.grad_accum:
                            stopped, pending = run.train_step(pending), []
                            if stopped:
                                break
                    else:  # a whole epoch: its last micro-batches make one smaller update
                        if pending:
                            stopped = run.train_step(pending)
                        state.epoch += 1
                    if not self.settings.eval_every_steps and state.last_eval_step != state.step:
                        run.evaluate_and_save()  # once per epoch
                        stopped = stopped or run.should_stop()
                if state.last_eval_step != state.step:
                    run.evaluate_and_save(force=True)  # the final state is always evaluated, saved
                return run.finish()
            except (TrainingInterrupted, KeyboardInterrupt):
                status = "KILLED"
                raise
            except RuntimeError as err:  # MLX out of memory: one line, and an end within seconds
                failure = failures.device_failure(  # the last checkpoint, once written
                    err, state.step, lambda: run.writer.wait() or run.manager.latest())
                if failure is None:
                    raise
                raise failure from err  # the watchdog now bounds run.close below
            finally:
                run.close(status)

    # --- extras --------------------------------------------------------------------------

    def fit_batch_to_memory(self, model: nn.Module, data, loss_fn, batching: Batching | None = None,
                            world: distributed.World | None = None, rows_of=None
                            ) -> tuple[Batching, int]:
        """(batching, grad_accum) for the run: under trainer.memory_budget_mb the batch is halved
        (grad_accum doubled, the same effective batch) until one step fits. `rows_of` takes this
        rank's rows of a batch (Run.rows_of)."""
        batching, grad_accum = batching or self.batching, self.settings.grad_accum
        budget = self.settings.memory_budget_mb
        if not budget:
            return batching, grad_accum
        saved_rng, saved_data = rng_state(), data.state_dict()
        grad_fn = nn.value_and_grad(model, loss_fn)
        world = world or distributed.World()
        while True:
            device.reset_peak_memory()
            batch = next(iter(data.train_batches(batching, 0)))
            out = grad_fn(model, rows_of(batch) if rows_of else batch)
            mx.eval(out)
            del out
            peak = device.peak_memory_mb()
            if world.enabled:  # one figure for all ranks, so they all pick the same batch
                peak = max(world.sum_numbers([peak if r == world.rank else 0.0
                                              for r in range(world.size)], "the memory probe"))
            if peak <= budget:
                break
            if batching.batch_size == 1:
                raise TrainingError(
                    f"one example needs {peak:.0f} MB, over trainer.memory_budget_mb="
                    f"{budget}: use a smaller model or raise the budget"
                )
            # dynamic batches are sized by their token budget
            batching = dataclasses.replace(
                batching, batch_size=batching.batch_size // 2,
                max_tokens=max(1, batching.max_tokens // 2) if batching.max_tokens else None)
            grad_accum *= 2
            log.warning(
                "step peak memory %.0f MB is over the budget of %.0f MB: batch_size -> %d, "
                "grad_accum -> %d (same effective batch)", peak, budget,
                batching.batch_size, grad_accum,
            )
        set_rng_state(saved_rng)
        data.load_state_dict(saved_data)
        return batching, grad_accum

    def quantized_metrics(self, model: nn.Module, data, task: str,
                          batching: Batching | None = None) -> dict[str, float]:
        """Quantize `model` in place (models/quantize.py) and evaluate it: val_q<bits>/*."""
        bits = int(self.settings.quantize_bits)
        quantize_linears(model, bits)
        return self.evaluate(model, data, task, prefix=f"val_q{bits}", batching=batching)

    @staticmethod
    def resume_changes(old: dict, new: dict) -> dict[str, str]:
        """Tags naming each model, trainer, optimizer, data and seed setting that differs from the
        checkpoint's."""
        def settings(cfg: dict) -> dict[str, str]:
            # data.tokenizer.path is pointed at the resumed run's tokenizer (its hash is compared
            # instead); cache folders move with the project root and change no result.
            flat = flatten_config({k: cfg[k] for k in ("model", "trainer", "optimizer", "data", "seed")
                                   if k in cfg})
            return {k: v for k, v in flat.items()
                    if k != "data.tokenizer.path" and not k.endswith("cache_dir")}

        before = settings(old)
        changes = {}
        for key, value in settings(new).items():
            if key in before and before[key] != value:
                log.warning("resume: %s changed %s -> %s", key, before[key], value)
                changes[f"resume.changed.{key}"] = f"{before[key]} -> {value}"
        return changes


def check_contract(obj: Any, protocol: type, what: str) -> None:
    """A part that does not implement its protocol fails here, naming what it lacks."""
    if isinstance(obj, protocol):
        return
    members = [m for m in dir(protocol) if not m.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    missing = sorted({m for m in members if not hasattr(obj, m)})
    raise TypeError(f"{type(obj).__name__} is not a {what} ({protocol.__module__}."
                    f"{protocol.__name__}): it lacks {missing}")


def mixed_precision(loss_fn: losses.LossFn, dtype: mx.Dtype) -> losses.LossFn:
    """Compute in `dtype` while gradients flow back to the fp32 master weights."""

    def wrapped(model: nn.Module, batch):
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                              master))
        loss, aux = loss_fn(model, batch)
        model.update(master)
        return loss.astype(mx.float32), aux

    return wrapped


