"""The one training loop.

`trainer=simple|distill|optimized` are configurations of this class: distillation is a loss hook,
accumulation a compiled step variant, dynamic batching a data-side batching policy, and progress,
early stopping and memory logging are callbacks.

The step follows mlx-examples: `nn.value_and_grad` over a pure loss, one `mx.compile`d function
over `[model.state, optimizer.state, mx.random.state]` (built after any checkpoint is restored,
so it never writes to stale state), and one `mx.eval` per optimizer step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlxlab import kernels
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError, UserError
from mlxlab.runtime import device, distributed, memory
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker, flatten_config
from mlxlab.training import losses, metrics
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback, ModelCheckpoint
from mlxlab.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    find_run_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from mlxlab.training.metrics import is_better
from mlxlab.training.model_ops import ModelSchedule, newest_state
from mlxlab.training.optim import (
    LRSchedule,
    OptimizerFactory,
    build_optimizer,
    clip_by_global_norm,
    default_optimizer,
)
from mlxlab.training.signals import GracefulStop
from mlxlab.training.token_tracking import TokenDistributionLog

log = logging.getLogger(__name__)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (NaN loss, memory budget); the message says why and what to do."""


class TrainingInterrupted(RuntimeError):
    def __init__(self, exit_code: int, checkpoint: Path | None):
        super().__init__(f"interrupted; checkpoint at {checkpoint}")
        self.exit_code, self.checkpoint = exit_code, checkpoint


@dataclass
class FitResult:
    metrics: dict[str, float]
    run_dir: Path
    run_id: str | None
    best_checkpoint: Path | None
    steps: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class RunState:
    """What the loop changes as it goes; it lands in every checkpoint's state.json."""

    step: int = 0
    epoch: int = 0
    run_id: str | None = None
    history: dict[str, list] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_eval: tuple | None = None  # (labels, probs) of the best evaluation: the confusion matrix
    last_eval_step: int | None = None
    finished: bool = False
    log_window: dict | None = None  # the LogWindow at the checkpoint: steps since the last log
    resumed_from: Path | None = None  # the run folder whose checkpoint was restored


class LogWindow:
    """Averages over the steps since the last logged line (loss, loss parts, throughput)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.count = 0.0, 0, 0.0
        self.parts: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, loss: float, aux: dict[str, mx.array]) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        for key, value in aux.items():  # loss parts (e.g. distillation's ce / kl) and ntokens
            if key == "ntokens":
                self.count += value.item()
            else:
                self.parts[key] = self.parts.get(key, 0.0) + value.item()

    def summary(self, task: str, grad_norm: float, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = "train/tokens_per_sec" if task == "lm" else "train/samples_per_sec"
        out = {
            "train/loss": self.loss / self.steps, "train/grad_norm": grad_norm, "train/lr": lr,
            rate: self.count / elapsed,  # real tokens (loss_mask) or examples, padding excluded
            **{f"train/{k}": v / self.steps for k, v in self.parts.items()},
        }
        self.reset()
        return out

    def state_dict(self) -> dict:
        # A checkpoint between two logged lines keeps the partial sums, so the first line after a
        # resume averages the same steps as an uninterrupted run's (floats survive JSON exactly).
        return {"loss": self.loss, "steps": self.steps, "count": self.count,
                "parts": dict(self.parts), "elapsed": time.perf_counter() - self.start}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.loss, self.steps, self.count = state["loss"], state["steps"], state["count"]
            self.parts = dict(state["parts"])
            self.start = time.perf_counter() - state["elapsed"]


@dataclass
class DistillConfig:
    """`trainer.distill` (trainer=distill): teachers are finished runs, see conf/trainer/distill.yaml."""

    teachers: list[dict] = field(default_factory=list)  # [{run: <run dir>, weight: 1.0}, ...]
    alpha: float = 0.5            # weight of the hard-label CE; (1 - alpha) on the soft KL
    temperature: float = 2.0
    cache_teacher: bool = True    # fixed datasets: teacher outputs computed once, looked up per step
    rounds: int = 1               # > 1: rounds of distillation (distill_rounds.py, run by train.py)
    round_teachers: str = "chain"  # chain | ensemble: who teaches round r + 1
    teacher_weights: str = "fixed"  # fixed | learned (training/teacher_weights.py)
    loss: str = "kl"              # kl | reverse_kl | mse: the soft term (losses.distillation_loss)
    kl_scale: str = "t2"          # t2: the KL times T^2 (Hinton) | none: alpha*CE + (1-alpha)*KL


@dataclass
class DistributedConfig:
    """`trainer.distributed`: data parallelism under `mlx.launch -n N -- mlxlab train ...`."""

    mode: str | bool = "auto"     # auto = on when launched with > 1 rank | on (must be launched) | off
    timeout_s: float = 30.0       # a collective waiting longer (dead or hung rank) ends the process
    shard_optimizer: bool = False  # ZeRO-1: each rank keeps ~1/N of the optimizer state


class Trainer:
    """The one loop. What it trains with comes in built: the optimizer as a partial
    (`conf/optimizer/*.yaml`, learning_rate = the peak of `schedule`) and the callbacks
    (`conf/callbacks/*.yaml`); the rest are the loop's own knobs (`conf/trainer/*.yaml`)."""

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        callbacks: Sequence[Callback] = (),
        schedule: LRSchedule | None = None,
        max_epochs: int | None = 10,
        max_steps: int | None = None,
        batch_size: int = 32,
        grad_accum: int = 1,
        grad_clip: float = 1.0,
        label_smoothing: float = 0.0,
        eval_every_steps: int | None = None,
        log_every_steps: int = 10,
        batching: dict | None = None,
        precision: str = "auto",
        compile: bool = True,
        memory_budget_mb: float | None = None,
        quantize_bits: int | None = None,
        monitor: str = "val/accuracy",
        monitor_mode: str = "max",
        distill: DistillConfig | None = None,
        distributed: DistributedConfig | None = None,
        fused_kernels: str | bool = "auto",
        model_schedule: list | None = None,
    ) -> None:
        if max_epochs is None and max_steps is None:
            raise ConfigError("set trainer.max_epochs or trainer.max_steps")
        self.optimizer_factory = optimizer or default_optimizer()
        self.callbacks = list(callbacks)
        self.schedule = schedule or LRSchedule()
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        self.eval_every_steps, self.log_every_steps = eval_every_steps, log_every_steps
        self.grad_accum = grad_accum
        self.batching = Batching(batch_size=batch_size, **(batching or {}))
        self.precision, self.compile = precision, compile
        self.memory_budget_mb, self.quantize_bits = memory_budget_mb, quantize_bits
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.distill = distill
        self.teachers: list[nn.Module] = []
        # Data parallelism (runtime/distributed.py): batch_size is per rank, as with torchrun.
        self.distributed = distributed or DistributedConfig()
        self.world = None  # set in fit()
        self.steps_per_epoch: int | None = None  # set in plan()
        kernels.set_mode(fused_kernels)  # auto | on | off: fused CPU cross-entropy/SwiGLU
        self.optimizer_shards = None
        self.model_ops = ModelSchedule(model_schedule)  # scheduled model operations (model_ops.py)
        if self.model_ops and self.distributed.shard_optimizer:
            raise ConfigError("trainer.model_schedule does not work with trainer.distributed."
                              "shard_optimizer yet: turn one of them off")

    @property
    def checkpointing(self) -> ModelCheckpoint:
        """The ModelCheckpoint among the callbacks, else its defaults (checkpoints always exist)."""
        found = [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]
        return found[0] if found else ModelCheckpoint()

    def build_optimizer(self, total_steps: int):
        """The configured optimizer, its learning rate following the schedule over total_steps."""
        return build_optimizer(self.optimizer_factory, self.schedule, total_steps)

    # --- hooks ---------------------------------------------------------------------------

    def build_loss(self, data) -> losses.LossFn:
        task = data.task
        per_example = any(cb.needs_example_losses for cb in self.callbacks)
        if self.distill:
            from mlxlab.training.run_model import load_teachers

            self.teachers, weights = load_teachers(
                self.distill.teachers, data.vocab_size, data.num_labels
            )
            if self.distill.teacher_weights == "learned" and len(self.teachers) > 1:
                from mlxlab.training.teacher_weights import fit_teacher_weights

                # Streamed text has no in-order pass over its training rows: its validation
                # batches are used instead (the weights then saw the validation data).
                rows = getattr(data, "train_batches_in_order", data.val_batches)(self.batching)
                weights = fit_teacher_weights(self.teachers, rows)
            self.teacher_weights = [w / sum(weights) for w in weights]
            temperature = self.distill.temperature
            cache = None
            if self.distill.cache_teacher:
                probs_of = losses.teacher_targets(self.teachers, weights, temperature,
                                                  self.distill.loss)
                cache = self.teacher_cache(data, probs_of)
            loss_fn = losses.distillation_loss(
                self.teachers, weights, alpha=self.distill.alpha,
                temperature=temperature, label_smoothing=self.label_smoothing, cache=cache,
                per_example=per_example, loss=self.distill.loss, kl_scale=self.distill.kl_scale,
            )
        else:
            loss_fn = losses.task_loss(task, self.label_smoothing, per_example)
        dtype = self.compute_dtype()
        return loss_fn if dtype == mx.float32 else mixed_precision(loss_fn, dtype)

    def teacher_cache(self, data, probs_of) -> mx.array | None:
        """The teachers' probabilities for every training example, from one pass before training.

        The teachers are frozen and in eval mode, so on a fixed dataset an example's soft targets
        never change: looking them up makes a distilled step cost what the student's step costs.
        None (run the teachers in every step) for data without `train_batches_in_order`, such as
        streamed text, where a vocabulary-sized distribution per token would be too big to keep.
        """
        in_order = data.train_batches_in_order(self.batching)
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
        if self.precision == "auto":
            return device.default_compute_dtype()
        choices = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}
        if self.precision not in choices:
            raise ConfigError(f"trainer.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        return choices[self.precision]

    # --- the step ------------------------------------------------------------------------

    def make_step(self, model: nn.Module, optimizer, loss_fn: losses.LossFn):
        """Returns step(batches) -> (loss, grad_norm, aux); one optimizer update per call.

        With grad_accum > 1 the gradients of the micro-batches are summed, weighted by their token
        counts, so N micro-batches of size B give the update of one batch of N*B.
        """
        loss_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state]
        clip = self.grad_clip
        compile_ = partial(mx.compile, inputs=state, outputs=state) if self.compile else (lambda f: f)
        world = self.world or distributed.World()
        shards = self.optimizer_shards
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
        if self.grad_accum == 1 and not world.enabled:
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
                mx.eval(loss, norm, aux, state)
            compiled.append(True)
            for key in examples[0]:
                aux[key] = mx.concatenate([e[key] for e in examples])
            return loss, norm, aux

        return step

    # --- evaluation ----------------------------------------------------------------------

    def evaluate(
        self, model: nn.Module, data, task: str, prefix: str = "val", shard: bool = True
    ) -> dict[str, float]:
        """Validation metrics; under data parallelism each rank evaluates every N-th batch and
        the sums (and, for classifiers, the labels and probabilities) are reduced over ranks."""
        model.eval()
        self.last_eval = None  # classification: (labels, probs), for the confusion matrix
        total, count, probs, labels = 0.0, 0.0, [], []
        world = self.world if shard and self.world is not None else distributed.World()
        for k, batch in enumerate(data.val_batches(self.batching)):
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
                "data.val_examples for streamed text) or add data"
            )
        mean = total / count
        if task == "classification":
            self.last_eval = (np.concatenate(labels), np.concatenate(probs))
            return metrics.classification_metrics(*self.last_eval, loss=mean, prefix=prefix)
        return metrics.lm_metrics(mean, prefix=prefix)

    # --- the loop ------------------------------------------------------------------------

    def use_global_batches(self, world: distributed.World) -> None:
        """Data parallel: the data module batches the global batch (batch_size per rank x ranks,
        token budgets likewise) and each rank trains on its rows, see World.shard_rows."""
        if not world.enabled or getattr(self, "_global_batches", False):
            return
        self._global_batches = True
        b = self.batching
        b.batch_size *= world.size
        b.max_tokens = b.max_tokens * world.size if b.max_tokens else None
        b.max_batch_size = b.max_batch_size * world.size if b.max_batch_size else None

    def rows_of(self, batch: dict) -> dict:
        """This rank's part of a batch the data module handed out (all of it when the data
        batches per rank)."""
        if self.world is None or getattr(self, "rank_batches", False):
            return batch
        return self.world.shard_rows(batch)

    def plan(self, data) -> tuple[int, float]:
        """(total optimizer steps, epochs): the run ends at max_steps or max_epochs, first come."""
        batches = data.num_train_batches(self.batching)
        per_epoch = math.ceil(batches / self.grad_accum) if batches else None
        self.steps_per_epoch = per_epoch  # for the epoch the progress bar and eval lines show
        limits = [self.max_steps]
        if self.max_epochs and per_epoch:
            limits.append(self.max_epochs * per_epoch)
        if not any(limits):
            raise ConfigError("this data has no known length: set trainer.max_steps")
        return min(x for x in limits if x), self.max_epochs or math.inf

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
        check_contract(data, DataModule, "data module")
        check_contract(tracker, Tracker, "tracker")
        run_dir, task, config = Path(run_dir), data.task, config or {}
        world = self.world = distributed.world(self.distributed.mode, self.distributed.timeout_s)
        # data that reads a lane per rank (data.shard_by_rank) batches per rank already
        self.rank_batches = bool(getattr(data, "use_world", lambda _: False)(world))
        if not self.rank_batches:
            self.use_global_batches(world)
        loss_fn = self.build_loss(data)
        self.fit_batch_to_memory(model, data, loss_fn)
        total_steps, max_epochs = self.plan(data)

        optimizer = self.build_optimizer(total_steps)
        if self.distributed.shard_optimizer and world.enabled:
            self.optimizer_shards = distributed.OptimizerShards(world, model.trainable_parameters())
        else:  # sharded: the full state is only built when a checkpoint is restored into it
            optimizer.init(model.trainable_parameters())
        policy = self.checkpointing
        manager = CheckpointManager(
            run_dir / "checkpoints", keep_last_n=policy.keep_last_n,
            save_every_steps=policy.save_every_steps, save_every_minutes=policy.save_every_minutes,
            monitor=self.monitor, mode=self.monitor_mode,
        )
        callbacks = list(self.callbacks)
        if getattr(data, "curriculum", None) is not None:  # data/curriculum.py: pacing, tracking
            callbacks.append(TokenDistributionLog(data, tracker, run_dir,
                                                  total_steps * self.grad_accum, self.grad_accum))
        self.tracker, self.run_dir = tracker, run_dir  # for callbacks that log or write (setup)
        for cb in callbacks:
            cb.setup(self, model, data)
        run = RunState()
        tags = dict(tags or {})
        has_val = data.has_validation
        if not has_val:
            log.info("no validation data (%s): no evaluation; checkpoints by steps (trainer."
                     "checkpoint.save_every_steps, trainer.eval_every_steps), at epoch ends and at the "
                     "end; no best/ checkpoint: the last one is the result",
                     data.no_validation_reason)
        val_print = val_fingerprint(data) if has_val else None
        if resume:
            tags.update(self.restore(resume, model, optimizer, data, callbacks, manager, run, config,
                                     val_print))
        if self.optimizer_shards is not None:  # keep this rank's share of the (restored) state
            sharded = self.build_optimizer(total_steps)
            self.optimizer_shards.adopt(
                sharded, optimizer.state if resume else None, model.trainable_parameters())
            optimizer = sharded
        self.optimizer_state_mb = distributed.tree_nbytes(optimizer.state) / 2**20
        log.info("optimizer state: %.1f MB on this rank%s", self.optimizer_state_mb,
                 f" (sharded over {world.size} ranks)" if self.optimizer_shards else "")
        if self.distill:  # the weights each teacher had (learned ones are known only now)
            tags[T.DISTILL_TEACHER_WEIGHTS] = str([round(w, 4) for w in self.teacher_weights])
        if run.resumed_from is not None:  # file trackers (CsvTracker) carry the killed run's record
            getattr(tracker, "continue_from", lambda *a: None)(run.resumed_from, run.step)
        tracker.start(params=config, tags=tags, run_id=run.run_id)
        if resume and run.run_id is not None and tracker.run_id == run.run_id:
            # What the killed process logged after its checkpoint is about to be logged again.
            getattr(tracker, "rewind", lambda step: None)(run.step)
        memory.keep_freed_memory()  # steps reuse freed memory, no page faults (runtime/memory.py)
        step_fn = self.make_step(model, optimizer, loss_fn)  # compiled after any restore
        model.train()

        def trainer_state(data_state: dict) -> CheckpointState:
            return CheckpointState(
                step=run.step, epoch=run.epoch, data=data_state, rng=rng_state(),
                callbacks={type(cb).__name__: cb.state_dict() for cb in callbacks},
                run_id=tracker.run_id or run.run_id, history=run.history,
                best_metrics=run.best_metrics, best_metric=run.best_metrics.get(self.monitor),
                config=config,
                # + what rebuilds a pretrained model without its source folder (its config)
                model_init={"vocab_size": data.vocab_size, "num_labels": data.num_labels,
                            **getattr(model, "checkpoint_init", {})},
                tokenizer_hash=data.tokenizer_hash,
                val_fingerprint=val_print, log_window=window.state_dict(),
                model_ops=self.model_ops.state_dict(),  # training/model_ops.py
                # classification: label values and columns, so predicting needs no training CSV
                encoding=data.encoding_state(),
            )

        writer = self.checkpoint_writer(manager, run_dir, config)
        saved_at: list[int] = []  # the same on every rank (manager state is rank 0's alone)

        def save(metric: float | None = None, force: bool = False) -> Path | None:
            # Metrics logged so far reach the store before the checkpoint that covers them, so a
            # SIGKILL never leaves a checkpoint whose steps are missing from the tracking data.
            tracker.flush()
            saved_at.append(run.step)
            opt = optimizer
            if self.optimizer_shards is not None:  # every rank takes part in the gather
                opt = distributed.StateView(
                    self.optimizer_shards.gathered_state(optimizer, model.trainable_parameters()))
            # every rank takes part in gathering per-rank data positions (data lanes)
            data_state = getattr(data, "gathered_state", data.state_dict)()
            if not world.is_main:
                return None
            return writer.save(model, opt, trainer_state(data_state), metric=metric, force=force)

        def evaluate_and_save(force: bool = False) -> None:
            if not has_val:  # the points where a run evaluates still checkpoint
                run.last_eval_step = run.step
                save(force=force)
                return
            results = self.evaluate(model, data, task)
            for key, value in results.items():
                run.history.setdefault(key, []).append((run.step, value))
            tracker.log_metrics(results, run.step)
            for cb in callbacks:
                cb.on_eval(run.step, results)
            value = results.get(self.monitor, math.nan)
            if is_better(value, run.best_metrics.get(self.monitor), self.monitor_mode):
                run.best_metrics = {**results, "best_step": float(run.step)}
                run.best_eval = self.last_eval
            run.last_eval_step = run.step
            save(metric=value, force=force)

        window = LogWindow()
        window.load_state_dict(run.log_window)

        def train_step(batches: list) -> bool:
            """One optimizer update, its logging, evaluation and checkpoint; True = stop now."""
            nonlocal step_fn
            if self.model_ops.due(run.step):  # scheduled model operations, then a new step
                if self.model_ops.run_due(run.step, model, optimizer, tracker):
                    # a best/ of other weights is no bar for these: the next evaluation sets one
                    run.best_metrics, run.best_eval, manager.best_metric = {}, None, None
                step_fn = self.make_step(model, optimizer, loss_fn)
            loss, norm, aux = step_fn(batches)
            run.step += 1
            examples = losses.pop_example_outputs(aux)
            if examples:
                for cb in callbacks:
                    cb.on_batch_outputs(run.step, batches, examples)
            loss_value = loss.item()  # already computed: the step's mx.eval synced
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at step {run.step}: lower optimizer.learning_rate or "
                    f"set trainer.grad_clip; last good checkpoint: {manager.latest()}"
                )
            window.add(loss_value, aux)
            end = run.step >= total_steps
            logs: dict[str, float] = {}
            if run.step % self.log_every_steps == 0 or end:
                logs = window.summary(task, norm.item(), float(optimizer.learning_rate))
                run.history.setdefault("train/loss", []).append((run.step, logs["train/loss"]))
            for cb in callbacks:
                cb.on_step(run.step, logs)
            if logs:
                tracker.log_metrics(logs, run.step)
            evaluated = bool(self.eval_every_steps and (run.step % self.eval_every_steps == 0 or end))
            if evaluated:
                evaluate_and_save()
            # Ranks act on one decision (any rank's signal, rank 0's clock) at the same step.
            stop_now, save_now = world.agree(
                stop.requested, not evaluated and manager.should_save(run.step))
            if save_now:
                save()
            if stop_now:
                if run.step not in saved_at[-1:]:
                    save(force=True)
                writer.wait()  # the emergency checkpoint is on disk before the process exits
                raise TrainingInterrupted(stop.exit_code if stop.requested else 143,
                                          manager.latest())
            return end or any(cb.should_stop for cb in callbacks)

        status = "FAILED"
        with GracefulStop() as stop:
            try:
                for cb in callbacks:
                    cb.on_train_start(total_steps, run.step)
                stopped = run.step >= total_steps  # a finished run resumed: nothing left to train
                while run.epoch < max_epochs and not stopped:
                    pending: list = []
                    for batch in data.train_batches(self.batching, run.epoch):
                        pending.append(self.rows_of(batch))
                        if len(pending) == self.grad_accum:
                            stopped, pending = train_step(pending), []
                            if stopped:
                                break
                    else:  # a whole epoch: its last micro-batches make one smaller update
                        if pending:
                            stopped = train_step(pending)
                        run.epoch += 1
                    if not self.eval_every_steps and run.last_eval_step != run.step:
                        evaluate_and_save()  # once per epoch
                        stopped = stopped or any(cb.should_stop for cb in callbacks)
                if run.last_eval_step != run.step:
                    evaluate_and_save(force=True)  # the final state is always evaluated and saved
                writer.wait()
                return self.finish(model, data, task, tracker, run_dir, run, manager)
            except (TrainingInterrupted, KeyboardInterrupt):
                status = "KILLED"
                raise
            finally:
                for cb in callbacks:
                    cb.on_train_end()
                writer.close(tracker)  # the last write and upload round, before the run ends
                tracker.end("FINISHED" if run.finished else status)

    def checkpoint_writer(self, manager: CheckpointManager, run_dir: Path, config: dict
                          ) -> CheckpointWriter:
        """Background (or inline) checkpoint writes, uploading to callbacks.checkpoint.remote."""
        uploader, policy = None, self.checkpointing
        if policy.remote and (self.world is None or self.world.is_main):
            from omegaconf import OmegaConf

            from mlxlab.training.remote import RemoteStore, RemoteUploader

            store = RemoteStore(policy.remote, retries=policy.remote_retries,
                                backoff_s=policy.remote_backoff_s, timeout_s=policy.remote_timeout_s)
            uploader = RemoteUploader(store, run_dir, manager.keep_last_n,
                                      config_text=OmegaConf.to_yaml(OmegaConf.create(config)),
                                      final_wait_s=policy.remote_final_wait_s)
        return CheckpointWriter(manager, asynchronous=policy.async_write,
                                when_busy=policy.when_busy, uploader=uploader)

    def restore(
        self, resume, model, optimizer, data, callbacks, manager, run, config, val_print=None
    ) -> dict:
        """Load the newest usable checkpoint of `resume` into everything; returns tags to log."""
        source = find_run_checkpoints(resume)
        self.model_ops.restore_structure(model, newest_state(source))  # before its weights load
        raw, path = source.load_latest(model, optimizer)
        state = CheckpointState.from_json(raw)
        if (state.model_ops or {}).get("done", []) != self.model_ops.done:
            raise CheckpointError(f"resume: {path} was saved before or after other model "
                                  "operations than the newest checkpoint: resume from that one")
        data.load_state_dict(state.data)
        set_rng_state(state.rng)
        for cb in callbacks:
            cb.load_state_dict(state.callbacks.get(type(cb).__name__, {}))
        run.step, run.epoch, run.run_id = state.step, state.epoch, state.run_id
        run.history, run.best_metrics = state.history, state.best_metrics
        run.log_window = state.log_window
        # <run dir>/checkpoints/step_N (or best): the killed run's folder, for its tracking files
        run.resumed_from = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        manager.restore_best(state.best_metric)
        if self.world is None or self.world.is_main:  # rank 0 alone writes the run folder
            manager.adopt_best(path.parent)
        log.info("resumed from %s at step %d (epoch %d)", path, run.step, run.epoch)
        tags = self.resume_changes(state.config or {}, config)
        old_tok, new_tok = state.tokenizer_hash, data.tokenizer_hash
        if old_tok != new_tok:
            log.warning("resume: the tokenizer changed (%s -> %s)", old_tok, new_tok)
            tags["resume.changed.tokenizer_hash"] = f"{old_tok} -> {new_tok}"
        if state.validation_changed(val_print):
            # A best metric measured on other data is no bar for this data's metrics.
            log.warning("resume: the validation set changed since the checkpoint: the best metric "
                        "(%s = %s) is reset; the next evaluation sets a new best/",
                        self.monitor, run.best_metrics.get(self.monitor))
            tags["resume.changed.validation_set"] = f"{state.val_fingerprint} -> {val_print}"
            run.best_metrics, run.best_eval, manager.best_metric = {}, None, None
        report = source.last_report
        if report is not None and not report.exact:  # the architecture changed since then
            log.warning("resume: weights did not all match:\n%s", report.summary())
            tags["resume.load_report"] = report.summary()[:5000]
        return tags

    def finish(self, model, data, task, tracker, run_dir, run, manager) -> FitResult:
        """Best weights back in the model, optional quantized check, artifacts."""
        metrics_out = dict(run.best_metrics)
        if self.world is not None and not self.world.is_main:  # rank 0 reports and writes
            run.finished = True
            return FitResult(metrics_out, run_dir, None, None, run.step, run.history)
        tracker.log_metrics({f"best/{k}": v for k, v in metrics_out.items()}, run.step)
        best = manager.best_path
        if best is not None:
            load_checkpoint(best, model)
        if self.quantize_bits:
            quantized = self.quantized_metrics(model, data, task)
            tracker.log_metrics(quantized, run.step)
            metrics_out.update(quantized)
        self.log_artifacts(tracker, run_dir, run, task, best, data.label_names)
        run.finished = True
        return FitResult(metrics_out, run_dir, tracker.run_id, best, run.step, run.history)

    # --- extras --------------------------------------------------------------------------

    def fit_batch_to_memory(self, model: nn.Module, data, loss_fn) -> None:
        """Under trainer.memory_budget_mb, halve the batch (raising grad_accum) until it fits."""
        if not self.memory_budget_mb:
            return
        saved_rng, saved_data = rng_state(), data.state_dict()
        grad_fn = nn.value_and_grad(model, loss_fn)
        while True:
            device.reset_peak_memory()
            world = self.world or distributed.World()
            batch = self.rows_of(next(iter(data.train_batches(self.batching, 0))))
            out = grad_fn(model, batch)
            mx.eval(out)
            del out
            peak = device.peak_memory_mb()
            if world.enabled:  # one figure for all ranks, so they all pick the same batch
                peak = max(world.sum_numbers([peak if r == world.rank else 0.0
                                              for r in range(world.size)], "the memory probe"))
            if peak <= self.memory_budget_mb:
                break
            if self.batching.batch_size == 1:
                raise TrainingError(
                    f"one example needs {peak:.0f} MB, over trainer.memory_budget_mb="
                    f"{self.memory_budget_mb}: use a smaller model or raise the budget"
                )
            self.batching.batch_size //= 2
            if self.batching.max_tokens:  # dynamic batches are sized by their token budget
                self.batching.max_tokens = max(1, self.batching.max_tokens // 2)
            self.grad_accum *= 2
            log.warning(
                "step peak memory %.0f MB is over the budget of %.0f MB: batch_size -> %d, "
                "grad_accum -> %d (same effective batch)", peak, self.memory_budget_mb,
                self.batching.batch_size, self.grad_accum,
            )
        set_rng_state(saved_rng)
        data.load_state_dict(saved_data)

    def quantized_metrics(self, model: nn.Module, data, task: str) -> dict[str, float]:
        bits = int(self.quantize_bits)
        nn.quantize(model, group_size=32, bits=bits,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
        return self.evaluate(model, data, task, prefix=f"val_q{bits}", shard=False)

    @staticmethod
    def resume_changes(old: dict, new: dict) -> dict[str, str]:
        """Tags naming each trainer, optimizer, data and seed setting that differs from the
        checkpoint's."""
        def settings(cfg: dict) -> dict[str, str]:
            # data.tokenizer.path is pointed at the resumed run's tokenizer (its hash is compared
            # instead); cache folders move with the project root and change no result.
            flat = flatten_config({k: cfg[k] for k in ("trainer", "optimizer", "data", "seed")
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

    def log_artifacts(self, tracker, run_dir: Path, run: RunState, task: str, best: Path | None,
                      label_names: list[str] | None = None) -> None:
        from mlxlab.tracking import plots

        plot_dir = run_dir / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_artifact(plots.loss_curve_png(run.history, plot_dir / "loss_curve.png"), "plots")
        if task == "classification" and run.best_eval is not None:
            labels, probs = run.best_eval
            cm = metrics.confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
            step = int(run.best_metrics.get("best_step", run.step))
            png = plots.confusion_matrix_png(cm, plot_dir / "confusion_matrix.png",
                                             label_names or None,
                                             title=f"validation confusion matrix, step {step}")
            tracker.log_artifact(png, "plots")
        if (run_dir / ".hydra").is_dir():
            tracker.log_artifact(run_dir / ".hydra", ".hydra")
        if best is not None:
            tracker.log_artifact(best, "checkpoint")
        if (run_dir / "tokenizer.json").exists():
            tracker.log_artifact(run_dir / "tokenizer.json")


def check_contract(obj: Any, protocol: type, what: str) -> None:
    """A part that does not implement its protocol fails here, naming what it lacks."""
    if isinstance(obj, protocol):
        return
    members = [m for m in dir(protocol) if not m.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    missing = sorted({m for m in members if not hasattr(obj, m)})
    raise TypeError(f"{type(obj).__name__} is not a {what} ({protocol.__module__}."
                    f"{protocol.__name__}): it lacks {missing}")


def val_fingerprint(data) -> str:
    """A hash of the validation batches, cut with one fixed batching so that the run's own batch
    size does not count: equal fingerprints mean metrics measured on the same examples."""
    h = hashlib.sha256()
    for batch in data.val_batches(Batching(batch_size=64)):
        for key in sorted(batch):
            value = np.array(batch[key])
            h.update(f"{key}{value.dtype}{value.shape}".encode())
            h.update(value.tobytes())
    return h.hexdigest()[:16]


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


