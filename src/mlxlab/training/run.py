"""One call of `Trainer.fit`: what a run builds, changes and does at each point of the loop.

The Trainer holds settings and never changes them; a `Run` holds everything one fit builds
(the world, this run's batching, loss, optimizer, checkpoint manager and writer, the compiled
step) and everything it changes (`RunState`, which lands in every checkpoint). Its methods are
the loop's points: `train_step`, `evaluate_and_save`, `save`, `finish`, `close`. Trainer.fit is
the loop over them. Callbacks see the run through a frozen `TrainContext`, not the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab import kernels
from mlxlab.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointState,
    find_run_checkpoints,
    is_better,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from mlxlab.checkpoint.layout import CHECKPOINTS_DIR, QUANTIZED
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.errors import UserError
from mlxlab.models.quantize import GROUP_SIZE, parameter_mb
from mlxlab.runtime import distributed, memory
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.training import losses, metrics
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.model_ops import ModelSchedule, newest_state
from mlxlab.training.signals import GracefulStop
from mlxlab.training.token_tracking import TokenDistributionLog

if TYPE_CHECKING:
    from mlxlab.training.trainer import Trainer

log = logging.getLogger("mlxlab.training.trainer")


@dataclass(frozen=True)
class TrainContext:
    """What a callback may know about the run it is in (Callback.setup receives it)."""

    world: distributed.World
    task: str                      # "classification" | "lm"
    total_steps: int
    steps_per_epoch: int | None    # None: data of unknown length
    max_epochs: float              # math.inf when only max_steps bounds the run
    monitor: str                   # the metric that picks the best checkpoint
    monitor_mode: str              # max | min
    tracker: Tracker
    run_dir: Path
    batch_size: int                # this rank's rows per micro-batch, after any memory fitting
    grad_accum: int
    optimizer: Any                 # the run's mlx.optimizers optimizer (its learning_rate, state)
    optimizer_state_mb: float      # this rank's share of the optimizer state


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


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (NaN loss, memory budget); the message says why and what to do."""


class TrainingInterrupted(RuntimeError):
    """A stop signal, after its checkpoint; `requeue`: the job asks to be started again
    (SIGUSR1 with trainer.requeue)."""

    def __init__(self, exit_code: int, checkpoint: Path | None, requeue: bool = False):
        super().__init__(f"interrupted; checkpoint at {checkpoint}")
        self.exit_code, self.checkpoint, self.requeue = exit_code, checkpoint, requeue


class LogWindow:
    """Averages over the steps since the last logged line (loss, loss parts, throughput)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.count = 0.0, 0, 0.0
        self.left_out_s, self.left_out_count = 0.0, 0.0  # compiling steps: not in the rate
        self.parts: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, loss: float, aux: dict[str, mx.array], left_out_s: float | None = None) -> None:
        """One step's loss and parts; `left_out_s`: the step compiled, so neither its time
        (that many seconds) nor its tokens count in the throughput."""
        self.loss, self.steps = self.loss + loss, self.steps + 1
        if left_out_s is not None:
            self.start += left_out_s
            self.left_out_s += left_out_s
        for key, value in aux.items():  # loss parts (e.g. distillation's ce / kl) and ntokens
            if key == "ntokens" and left_out_s is not None:
                self.left_out_count += value.item()
            elif key == "ntokens":
                self.count += value.item()
            else:
                self.parts[key] = self.parts.get(key, 0.0) + value.item()

    def summary(self, task: str, grad_norm: float, lr: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = "train/tokens_per_sec" if task == "lm" else "train/samples_per_sec"
        out = {
            "train/loss": self.loss / self.steps, "train/grad_norm": grad_norm, "train/lr": lr,
            **{f"train/{k}": v / self.steps for k, v in self.parts.items()},
        }
        # real tokens (loss_mask) or examples, padding excluded, compiling steps left out; a
        # window of compiling steps only (log_every_steps=1's first) gives its own rate, so that
        # a resumed run logs the same keys at the same steps as an uninterrupted one
        out[rate] = (self.count / elapsed if self.count else
                     self.left_out_count / max(elapsed + self.left_out_s, 1e-9))
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


class Run:
    """One fit of `trainer`'s settings to `model` on `data`: built ready to take its first step
    (anything in `resume` restored, tracking started, the step compiled)."""

    def __init__(self, trainer: Trainer, model: nn.Module, data: DataModule, tracker: Tracker,
                 run_dir: Path, config: dict, tags: dict, resume: str | Path | None) -> None:
        self.trainer, self.model, self.data, self.tracker = trainer, model, data, tracker
        self.settings = settings = trainer.settings  # read, never changed
        self.run_dir, self.config, self.task = run_dir, config, data.task
        kernels.set_mode(settings.fused_kernels)  # process-wide: the ops the step traces
        self.world = distributed.world(settings.distributed.mode, settings.distributed.timeout_s)
        # scheduled model operations (model_ops.py): which are done is this run's to change
        self.model_ops = ModelSchedule(settings.model_schedule)
        # data that reads a lane per rank (data.shard_by_rank) batches per rank already
        self.rank_batches = data.use_world(self.world)
        batching = trainer.batching if self.rank_batches else global_batching(
            trainer.batching, self.world)
        self.loss_fn, self.teacher_weights = trainer.loss_setup(data, batching)
        self.batching, self.grad_accum = trainer.fit_batch_to_memory(
            model, data, self.loss_fn, batching, self.world, self.rows_of)
        self.total_steps, self.max_epochs, self.steps_per_epoch = trainer.plan(
            data, self.batching, self.grad_accum, self.world if self.rank_batches else None)
        self.state, self.window = RunState(), LogWindow()
        self.callbacks = list(trainer.callbacks)
        if data.curriculum is not None:  # data/curriculum.py: pacing, tracking
            self.callbacks.append(TokenDistributionLog(
                data, tracker, run_dir, self.total_steps * self.grad_accum, self.grad_accum))
        self.has_val = data.has_validation
        if not self.has_val:
            log.info("no validation data (%s): no evaluation; checkpoints by steps (trainer."
                     "eval_every_steps, callbacks.checkpoint.save_every_steps), at epoch ends and "
                     "at the end; no best/ checkpoint: the last one is the result",
                     data.no_validation_reason)
        self.val_print = val_fingerprint(data) if self.has_val else None
        policy = trainer.checkpointing
        self.manager = CheckpointManager(
            run_dir / CHECKPOINTS_DIR, keep_last_n=policy.keep_last_n,
            save_every_steps=policy.save_every_steps, save_every_minutes=policy.save_every_minutes,
            monitor=settings.monitor, mode=settings.monitor_mode)
        self.optimizer, self.shards = self.build_optimizer(resume, tags)
        self.start_tracking(tags, resume)
        memory.keep_freed_memory()  # steps reuse freed memory, no page faults (runtime/memory.py)
        self.step_fn = trainer.make_step(model, self.optimizer, self.loss_fn, self.world,
                                         self.shards, self.grad_accum)  # compiled after any restore
        self.compiling = True  # the next step compiles (and on a GPU, MLX's kernels)
        self.writer = self.checkpoint_writer()
        self.saved_at: list[int] = []  # the same on every rank (manager state is rank 0's alone)
        self.stop = GracefulStop()  # fit() enters it (signal handlers) around the loop
        model.train()

    # --- building --------------------------------------------------------------------------

    def build_optimizer(self, resume: str | Path | None, tags: dict):
        """The optimizer (sharded over ranks with ZeRO-1), any checkpoint restored into it and
        everything else, and the callbacks set up: (optimizer, shards or None)."""
        trainer, model, settings = self.trainer, self.model, self.settings
        optimizer = trainer.build_optimizer(self.total_steps)
        shards = None
        if settings.distributed.shard_optimizer and self.world.enabled:
            shards = distributed.OptimizerShards(self.world, model.trainable_parameters())
        else:  # sharded: the full state is only built when a checkpoint is restored into it
            optimizer.init(model.trainable_parameters())
        if resume:
            tags.update(self.restore(resume, optimizer))
        if shards is not None:  # keep this rank's share of the (restored) state
            sharded = trainer.build_optimizer(self.total_steps)
            shards.adopt(sharded, optimizer.state if resume else None, model.trainable_parameters())
            optimizer = sharded
        state_mb = distributed.tree_nbytes(optimizer.state) / 2**20
        log.info("optimizer state: %.1f MB on this rank%s", state_mb,
                 f" (sharded over {self.world.size} ranks)" if shards else "")
        self.context = TrainContext(
            world=self.world, task=self.task, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, max_epochs=self.max_epochs,
            monitor=settings.monitor, monitor_mode=settings.monitor_mode, tracker=self.tracker,
            run_dir=self.run_dir, batch_size=self.batching.batch_size, grad_accum=self.grad_accum,
            optimizer=optimizer, optimizer_state_mb=state_mb)
        for cb in self.callbacks:
            cb.setup(self.context, model, self.data)
        return optimizer, shards

    def start_tracking(self, tags: dict, resume: str | Path | None) -> None:
        if self.settings.distill:  # the weights each teacher had (learned ones are known only now)
            tags[T.DISTILL_TEACHER_WEIGHTS] = str([round(w, 4) for w in self.teacher_weights])
        if self.val_print is not None:  # runs scored on the same rows compare row by row
            tags[T.VAL_FINGERPRINT] = self.val_print
        state, tracker = self.state, self.tracker
        if state.resumed_from is not None:  # file trackers (CsvTracker) carry the killed run's record
            tracker.continue_from(state.resumed_from, state.step)
        tracker.start(params=self.config, tags=tags, run_id=state.run_id)
        if resume and state.run_id is not None and tracker.run_id == state.run_id:
            # What the killed process logged after its checkpoint is about to be logged again.
            tracker.rewind(state.step)

    def checkpoint_writer(self) -> CheckpointWriter:
        """Background (or inline) checkpoint writes, uploading to callbacks.checkpoint.remote."""
        uploader, policy = None, self.trainer.checkpointing
        if policy.remote and self.world.is_main:
            from omegaconf import OmegaConf

            from mlxlab.checkpoint.remote import RemoteStore, RemoteUploader

            store = RemoteStore(policy.remote, retries=policy.remote_retries,
                                backoff_s=policy.remote_backoff_s, timeout_s=policy.remote_timeout_s)
            uploader = RemoteUploader(store, self.run_dir, self.manager.keep_last_n,
                                      config_text=OmegaConf.to_yaml(OmegaConf.create(self.config)),
                                      final_wait_s=policy.remote_final_wait_s)
        return CheckpointWriter(self.manager, asynchronous=policy.async_write,
                                when_busy=policy.when_busy, uploader=uploader)

    def restore(self, resume: str | Path, optimizer) -> dict:
        """Load the newest usable checkpoint of `resume` into everything; returns tags to log."""
        trainer, model, data, state = self.trainer, self.model, self.data, self.state
        source = find_run_checkpoints(resume)
        self.model_ops.restore_structure(model, newest_state(source))  # before its weights load
        raw, path = source.load_latest(model, optimizer)
        saved = CheckpointState.from_json(raw)
        if (saved.model_ops or {}).get("done", []) != self.model_ops.done:
            raise CheckpointError(f"resume: {path} was saved before or after other model "
                                  "operations than the newest checkpoint: resume from that one")
        data.load_state_dict(saved.data)
        set_rng_state(saved.rng)
        for cb in self.callbacks:
            cb.load_state_dict(saved.callbacks.get(cb.state_key, saved.callbacks.get(
                type(cb).__name__, {})))  # checkpoints before issue 25 keyed by class name
        state.step, state.epoch, state.run_id = saved.step, saved.epoch, saved.run_id
        state.history, state.best_metrics = saved.history, saved.best_metrics
        self.window.load_state_dict(saved.log_window)
        # <run dir>/checkpoints/step_N (or best): the killed run's folder, for its tracking files
        state.resumed_from = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
        self.manager.restore_best(saved.best_metric)
        if self.world.is_main:  # rank 0 alone writes the run folder
            self.manager.adopt_best(path.parent)
        log.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
        return {**trainer.resume_changes(saved.config or {}, self.config),
                **self.resume_warnings(saved, source)}

    def resume_warnings(self, saved: CheckpointState, source) -> dict:
        """Tags (and warnings) for what differs from the checkpoint: tokenizer, validation set,
        weights that did not load."""
        tags: dict[str, str] = {}
        old_tok, new_tok = saved.tokenizer_hash, self.data.tokenizer_hash
        if old_tok != new_tok:
            log.warning("resume: the tokenizer changed (%s -> %s)", old_tok, new_tok)
            tags["resume.changed.tokenizer_hash"] = f"{old_tok} -> {new_tok}"
        if saved.validation_changed(self.val_print):
            # A best metric measured on other data is no bar for this data's metrics.
            log.warning("resume: the validation set changed since the checkpoint: the best metric "
                        "(%s = %s) is reset; the next evaluation sets a new best/",
                        self.settings.monitor, self.state.best_metrics.get(self.settings.monitor))
            tags["resume.changed.validation_set"] = f"{saved.val_fingerprint} -> {self.val_print}"
            self.forget_best()
        report = source.last_report
        if report is not None and not report.exact:  # the architecture changed since then
            log.warning("resume: weights did not all match:\n%s", report.summary())
            tags["resume.load_report"] = report.summary()[:5000]
        return tags

    def forget_best(self) -> None:
        """A best/ of other weights or data is no bar for these: the next evaluation sets one."""
        self.state.best_metrics, self.state.best_eval, self.manager.best_metric = {}, None, None

    # --- the loop's points -------------------------------------------------------------------

    def rows_of(self, batch: dict) -> dict:
        """This rank's part of a batch the data module handed out (all of it when the data
        batches per rank)."""
        return batch if self.rank_batches else self.world.shard_rows(batch)

    def checkpoint_state(self, data_state: dict) -> CheckpointState:
        state, data = self.state, self.data
        return CheckpointState(
            step=state.step, epoch=state.epoch, data=data_state, rng=rng_state(),
            callbacks={cb.state_key: cb.state_dict() for cb in self.callbacks},
            run_id=state.run_id, history=state.history,  # the tracker's: Run.save, later
            best_metrics=state.best_metrics,
            best_metric=state.best_metrics.get(self.settings.monitor), config=self.config,
            # + what rebuilds a pretrained model without its source folder (its config)
            model_init={"vocab_size": data.vocab_size, "num_labels": data.num_labels,
                        **self.model.checkpoint_init},
            tokenizer_hash=data.tokenizer_hash,
            val_fingerprint=self.val_print, log_window=self.window.state_dict(),
            model_ops=self.model_ops.state_dict(),  # training/model_ops.py
            # classification: label values and columns, so predicting needs no training CSV
            encoding=data.encoding_state(),
        )

    def save(self, metric: float | None = None, force: bool = False) -> Path | None:
        # Metrics logged so far reach the store before the checkpoint that covers them is
        # committed, so a SIGKILL never leaves a checkpoint whose steps are missing from the
        # tracking data; the writer waits for that (off this thread when it writes in the
        # background), the training goes on.
        stored = self.tracker.flush_barrier()
        self.saved_at.append(self.state.step)
        opt = self.optimizer
        if self.shards is not None:  # every rank takes part in the gather
            opt = distributed.StateView(
                self.shards.gathered_state(self.optimizer, self.model.trainable_parameters()))
        # every rank takes part in gathering per-rank data positions (data lanes)
        data_state = self.data.gathered_state()
        if not self.world.is_main:
            return None
        state = self.checkpoint_state(data_state)

        def before_write() -> dict:
            stored()
            # Read only now: a tracker starting its run in a child process may not have
            # answered with the run's id at the first checkpoint (issue 24); the step won't wait.
            return {"run_id": self.tracker.run_id or state.run_id}

        return self.writer.save(self.model, opt, state, metric=metric, force=force,
                                before_write=before_write)

    def evaluate_and_save(self, force: bool = False) -> None:
        state = self.state
        if not self.has_val:  # the points where a run evaluates still checkpoint
            state.last_eval_step = state.step
            self.save(force=force)
            return
        results, outputs = self.trainer.evaluate_outputs(
            self.model, self.data, self.task, self.batching, self.world)
        for key, value in results.items():
            state.history.setdefault(key, []).append((state.step, value))
        self.tracker.log_metrics(results, state.step)
        for cb in self.callbacks:
            cb.on_eval(state.step, results)
        monitor = self.settings.monitor
        value = results.get(monitor, math.nan)
        if is_better(value, state.best_metrics.get(monitor), self.settings.monitor_mode):
            state.best_metrics = {**results, "best_step": float(state.step)}
            state.best_eval = outputs
        state.last_eval_step = state.step
        self.save(metric=value, force=force)

    def train_step(self, batches: list) -> bool:
        """One optimizer update, its logging, evaluation and checkpoint; True = stop now."""
        trainer, settings, state = self.trainer, self.settings, self.state
        if self.model_ops.due(state.step):  # scheduled model operations, then a new step
            if self.model_ops.run_due(state.step, self.model, self.optimizer, self.tracker):
                self.forget_best()
            self.step_fn = trainer.make_step(self.model, self.optimizer, self.loss_fn, self.world,
                                             self.shards, self.grad_accum)
            self.compiling = True
        started = time.perf_counter()
        loss, norm, aux = self.step_fn(batches)
        state.step += 1
        compiled_s = self.compiled(time.perf_counter() - started) if self.compiling else None
        examples = losses.pop_example_outputs(aux)
        if examples:
            for cb in self.callbacks:
                cb.on_batch_outputs(state.step, batches, examples)
        loss_value = loss.item()  # already computed: the step's mx.eval synced
        self.check_loss(loss_value)
        self.window.add(loss_value, aux, left_out_s=compiled_s)
        end = state.step >= self.total_steps
        logs: dict[str, float] = {}
        if state.step % settings.log_every_steps == 0 or end:
            logs = self.window.summary(self.task, norm.item(), float(self.optimizer.learning_rate))
            state.history.setdefault("train/loss", []).append((state.step, logs["train/loss"]))
        for cb in self.callbacks:
            cb.on_step(state.step, logs)
        if logs:
            self.tracker.log_metrics(logs, state.step)
        every = settings.eval_every_steps
        evaluated = bool(every and (state.step % every == 0 or end))
        if evaluated:
            self.evaluate_and_save()
        # Ranks act on one decision (any rank's signal, rank 0's clock) at the same step.
        stop_now, save_now = self.world.agree(
            self.stop.requested, not evaluated and self.manager.should_save(state.step))
        if save_now:
            self.save()
        if stop_now:
            self.interrupt()
        return end or self.should_stop()

    def compiled(self, seconds: float) -> float:
        """A step that compiled took `seconds`: said (when long), tagged (mlxlab.compile_s) and
        left out of the throughput (the bar's rate too, Callback.on_compiled). On a GPU the first
        step of a machine also compiles MLX's CUDA kernels: minutes, not a step's time."""
        self.compiling = False
        if seconds > 5.0:
            log.info("step %d compiled in %.1f s (MLX's compile%s); left out of the throughput "
                     "(tag %s)", self.state.step, seconds,
                     "" if mx.default_device() == mx.cpu else " and its GPU kernels", T.COMPILE_S)
        # a tag, not a metric: a resumed run compiles again at another step, and its metric
        # history must stay the uninterrupted run's
        self.tracker.set_tags({T.COMPILE_S: f"{seconds:.3f}"})
        for cb in self.callbacks:
            cb.on_compiled(self.state.step, seconds)
        return seconds

    def check_loss(self, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at step {self.state.step}: lower optimizer.learning_rate "
                f"or set trainer.grad_clip; last good checkpoint: {self.manager.latest()}")

    def interrupt(self) -> None:
        """A signal: checkpoint this step (once) and leave the loop."""
        if self.state.step not in self.saved_at[-1:]:
            self.save(force=True)
        self.writer.wait()  # the emergency checkpoint is on disk before the process exits
        warned = self.stop.signum == getattr(signal, "SIGUSR1", None)  # Slurm's time-limit warning
        raise TrainingInterrupted(self.stop.exit_code if self.stop.requested else 143,
                                  self.manager.latest(), requeue=warned and self.settings.requeue)

    def should_stop(self) -> bool:
        return any(cb.should_stop for cb in self.callbacks)

    def finish(self) -> FitResult:
        """Best weights back in the model, optional quantized check, artifacts."""
        self.writer.wait()
        state, tracker = self.state, self.tracker
        metrics_out = dict(state.best_metrics)
        if not self.world.is_main:  # rank 0 reports and writes
            state.finished = True
            return FitResult(metrics_out, self.run_dir, None, None, state.step, state.history)
        tracker.log_metrics({f"best/{k}": v for k, v in metrics_out.items()}, state.step)
        best = self.manager.best_path
        if best is not None:
            load_checkpoint(best, self.model)
        if self.settings.quantize_bits:
            metrics_out.update(self.save_quantized(metrics_out))
        self.log_artifacts(best)
        state.finished = True
        return FitResult(metrics_out, self.run_dir, tracker.run_id, best, state.step,
                         state.history)

    def save_quantized(self, float_metrics: dict[str, float]) -> dict[str, float]:
        """trainer.quantize_bits: the best weights quantized, evaluated, and saved beside the
        float ones as checkpoints/quantized (what `mlxlab predict/eval/serve --checkpoint
        quantized` load); the sizes and metrics of both, logged and in the run's metrics."""
        bits, model = int(self.settings.quantize_bits), self.model
        float_mb = parameter_mb(model)
        results = self.trainer.quantized_metrics(model, self.data, self.task, self.batching)
        results["model/size_mb"] = float_mb
        results[f"model/q{bits}_size_mb"] = parameter_mb(model)
        self.tracker.log_metrics(results, self.state.step)
        state = self.checkpoint_state(self.data.state_dict())
        state.run_id = self.tracker.run_id or state.run_id
        state.extra["quantization"] = {"bits": bits, "group_size": GROUP_SIZE}
        path = self.manager.save_named(QUANTIZED, model, state)
        monitor = self.settings.monitor
        quantized_monitor = monitor.replace("val/", f"val_q{bits}/", 1)
        log.info("quantized to %d bits: %.2f MB (float %.2f MB); %s %.4f (float %.4f); saved %s",
                 bits, results[f"model/q{bits}_size_mb"], float_mb, quantized_monitor,
                 results.get(quantized_monitor, math.nan), float_metrics.get(monitor, math.nan),
                 path)
        self.tracker.log_artifact(path, "checkpoint_quantized")
        return results

    def close(self, status: str) -> None:
        """Always, last: callbacks end, the last checkpoint writes and uploads, the run ends."""
        for cb in self.callbacks:
            cb.on_train_end()
        self.writer.close(self.tracker)  # the last write and upload round, before the run ends
        self.tracker.end("FINISHED" if self.state.finished else status)

    def log_artifacts(self, best: Path | None) -> None:
        from mlxlab.tracking import plots

        state, tracker, run_dir = self.state, self.tracker, self.run_dir
        plot_dir = run_dir / "plots"
        plot_dir.mkdir(parents=True, exist_ok=True)
        tracker.log_artifact(plots.loss_curve_png(state.history, plot_dir / "loss_curve.png"),
                             "plots")
        if self.task == "classification" and state.best_eval is not None:
            labels, probs = state.best_eval
            cm = metrics.confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
            step = int(state.best_metrics.get("best_step", state.step))
            png = plots.confusion_matrix_png(cm, plot_dir / "confusion_matrix.png",
                                             self.data.label_names or None,
                                             title=f"validation confusion matrix, step {step}")
            tracker.log_artifact(png, "plots")
            # per-row predictions: `mlxlab runs compare` tests two configs row by row from these
            tracker.log_artifact(write_predictions(labels, probs, run_dir), "predictions")
        if (run_dir / ".hydra").is_dir():
            tracker.log_artifact(run_dir / ".hydra", ".hydra")
        if best is not None:
            tracker.log_artifact(best, "checkpoint")
        if (run_dir / "tokenizer.json").exists():
            tracker.log_artifact(run_dir / "tokenizer.json")


PREDICTIONS_FILE = "predictions/val_best.csv"


def write_predictions(labels: np.ndarray, probs: np.ndarray, run_dir: Path) -> Path:
    """The best checkpoint's validation predictions, a row per example in the validation
    order: its label, the predicted label and that label's probability."""
    path = run_dir / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(axis=1)
    lines = ["row,label,prediction,probability"]
    lines += [f"{i},{int(y)},{int(p)},{float(probs[i, p]):.6g}"
              for i, (y, p) in enumerate(zip(labels, predicted))]
    path.write_text("\n".join(lines) + "\n")
    return path


def val_fingerprint(data: DataModule) -> str:
    """A hash of the validation batches, cut with one fixed batching so that the run's own batch
    size does not count: equal fingerprints mean metrics measured on the same examples."""
    h = hashlib.sha256()
    for batch in data.val_batches(Batching(batch_size=64)):
        for key in sorted(batch):
            value = np.array(batch[key])
            h.update(f"{key}{value.dtype}{value.shape}".encode())
            h.update(value.tobytes())
    return h.hexdigest()[:16]


def global_batching(batching: Batching, world: distributed.World) -> Batching:
    """Data parallel: the data module batches the global batch (batch_size per rank x ranks,
    token budgets likewise) and each rank trains on its rows, see World.shard_rows."""
    if not world.enabled:
        return batching
    n = world.size
    return dataclasses.replace(
        batching, batch_size=batching.batch_size * n,
        max_tokens=batching.max_tokens * n if batching.max_tokens else None,
        max_batch_size=batching.max_batch_size * n if batching.max_batch_size else None)
