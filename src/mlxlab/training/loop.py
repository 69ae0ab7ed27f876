"""The training loop: `Fit`, one call of `Trainer.fit`.

Read `Fit.run` top to bottom: it is the whole loop, in the order things happen (as mlx-lm's
`train()` and torchtune's recipes keep theirs): what the run trains with, any checkpoint
restored, tracking started, then epochs of optimizer steps with their logging, evaluations and
checkpoints, then the best weights back and the artifacts. One try/finally holds it all, so
however the run ends (finished, an error, a signal, a failure to build the checkpoint writer
after the tracked run started) the callbacks end, the last checkpoint is written and uploaded,
and the tracked run gets its status: FINISHED, KILLED on a signal, FAILED otherwise. `run` is
the one function over the house's 80 lines (docs/architecture.md, "House rules, measured").

The parts it calls live beside it, a module each, and never call back into it: plan.py (the
run's length, batching, memory fitting), distill.py (the loss), step.py (the compiled step,
precision), evaluate.py, checkpointing.py (writer, checkpoint state, resume), artifacts.py (what
a finished run leaves); state.py holds what the loop changes (RunState) and what callbacks see
(TrainContext). The constructor only keeps its arguments.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels
from mlxlab.checkpoint import CheckpointManager, is_better, load_checkpoint
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.models.base import Model
from mlxlab.models.grad_checkpoint import checkpoint_blocks
from mlxlab.runtime import distributed, failures, memory
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.training import losses
from mlxlab.training.artifacts import log_artifacts, save_quantized
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback
from mlxlab.training.checkpointing import (
    build_manager,
    build_writer,
    checkpoint_state,
    forget_best,
    restore,
    resume_tags,
    validation_fingerprint,
)
from mlxlab.training.distill import TeacherLoader, build_loss
from mlxlab.training.evaluate import evaluate
from mlxlab.training.model_ops import ModelSchedule
from mlxlab.training.optim import OptimizerFactory, build_optimizer
from mlxlab.training.plan import fit_batch_to_memory, global_batching, plan, steps_of
from mlxlab.training.settings import CheckpointPolicy, TrainerSettings
from mlxlab.training.signals import GracefulStop
from mlxlab.training.state import (
    FitResult,
    RunState,
    TrainContext,
    TrainingError,
    TrainingInterrupted,
)
from mlxlab.training.step import make_step, with_precision
from mlxlab.training.token_tracking import TokenDistributionLog

log = logging.getLogger(__name__)


class Fit:
    """One fit of `model` to `data` under `settings`, tracked by `tracker`, checkpointed under
    `run_dir` as `checkpointing` says; `resume` (a run or checkpoint folder) continues where it
    stopped. `run()` trains and returns the best evaluation."""

    # What run() builds and its save and evaluation points (_save, _evaluate_and_save) read.
    world: distributed.World
    batching: Batching              # after any memory fitting
    loss_fn: losses.LossFn          # what the step trains (evaluation scores preference pairs by it)
    state: RunState
    optimizer: Any
    shards: distributed.OptimizerShards | None
    manager: CheckpointManager
    writer: CheckpointWriter
    model_ops: ModelSchedule
    val_print: str | None           # the validation set's fingerprint (None: no validation)
    saved_at: list[int]             # the steps saved, the same on every rank

    def __init__(self, settings: TrainerSettings, optimizer: OptimizerFactory,
                 callbacks: Sequence[Callback], load_teachers: TeacherLoader | None,
                 checkpointing: CheckpointPolicy, model: nn.Module, data: DataModule,
                 tracker: Tracker, run_dir: Path, config: dict, tags: dict,
                 resume: str | Path | None) -> None:
        self.settings, self.optimizer_factory = settings, optimizer
        self.callbacks = list(callbacks)  # this fit's: a data curriculum adds its own
        self.load_teachers, self.checkpointing = load_teachers, checkpointing
        self.model, self.data, self.tracker = model, data, tracker
        self.run_dir, self.config, self.tags, self.resume = run_dir, config, tags, resume

    def run(self) -> FitResult:
        """Train; returns the best evaluation's metrics and where the best weights are."""
        model, data, tracker, settings, callbacks = (
            self.model, self.data, self.tracker, self.settings, self.callbacks)
        check_parts(model, data, tracker)
        stop, status, tracked, set_up = GracefulStop(), "FAILED", False, False
        state = manager = writer = None  # what the except and finally clauses below close
        was_flushing = None  # the denormal mode before this run, restored at its end
        try:
            # --- what this run trains with ---------------------------------------------------
            kernels.set_mode(settings.fused_kernels)  # process-wide: the ops the step traces
            if settings.grad_checkpoint:  # before the memory fit measures a step
                log.info("gradient checkpointing: %d blocks recompute their activations in "
                         "the backward", checkpoint_blocks(model))
            if settings.flush_denormals and mx.default_device() == mx.cpu:
                # x86 runs arithmetic on denormal floats ~100x slower (kernels/denormals.py)
                was_flushing = kernels.flush_denormals(True)
            world = self.world = distributed.world(settings.distributed.mode,
                                                   settings.distributed.timeout_s)
            self.model_ops = ModelSchedule(settings.model_schedule)  # which are done: this run's
            # batch_size is per rank, as with torchrun; data that reads a lane per rank
            # (data.shard_by_rank) batches per rank already, other data the global batch
            rank_batches = data.use_world(world)
            rows_of = (lambda batch: batch) if rank_batches else world.shard_rows
            batching = settings.data_batching()
            batching = batching if rank_batches else global_batching(batching, world)
            loss_fn, teacher_weights = build_loss(
                settings, data, batching, self.load_teachers,
                per_example=any(cb.needs_example_losses for cb in callbacks), model=model)
            loss_fn = self.loss_fn = with_precision(loss_fn, settings.precision)
            self.batching, grad_accum = fit_batch_to_memory(model, data, loss_fn, settings, batching,
                                                            world, rows_of)
            total_steps, max_epochs, steps_per_epoch = plan(
                data, settings, self.batching, grad_accum, world if rank_batches else None)
            state = self.state = RunState()
            if data.curriculum is not None:  # data/curriculum.py: pacing, tracking
                callbacks.append(TokenDistributionLog(data, tracker, self.run_dir,
                                                      total_steps * grad_accum, grad_accum))
            self.val_print = validation_fingerprint(data)  # None: no validation data, said once
            manager = self.manager = build_manager(self.checkpointing, self.run_dir, settings)

            # --- the optimizer (sharded over ranks with ZeRO-1), any checkpoint restored -------
            optimizer = build_optimizer(self.optimizer_factory, settings.schedule, total_steps)
            self.shards = None
            if settings.distributed.shard_optimizer and world.enabled:
                self.shards = distributed.OptimizerShards(world, model.trainable_parameters())
            else:  # sharded: the full state is only built when a checkpoint is restored into it
                optimizer.init(model.trainable_parameters())
            if self.resume:
                saved, report = restore(self.resume, model=model, optimizer=optimizer, data=data,
                                        callbacks=callbacks, state=state, manager=manager,
                                        model_ops=self.model_ops, world=world)
                self.tags.update(resume_tags(saved, report, self.config, data, self.val_print,
                                             state, manager, settings.monitor))
            if self.shards is not None:  # keep this rank's share of the (restored) state
                sharded = build_optimizer(self.optimizer_factory, settings.schedule, total_steps)
                self.shards.adopt(sharded, optimizer.state if self.resume else None,
                                  model.trainable_parameters())
                optimizer = sharded
            self.optimizer = optimizer
            state_mb = distributed.tree_nbytes(optimizer.state) / 2**20
            log.info("optimizer state: %.1f MB on this rank%s", state_mb,
                     f" (sharded over {world.size} ranks)" if self.shards else "")
            context = TrainContext(
                world=world, task=data.task, total_steps=total_steps,
                steps_per_epoch=steps_per_epoch, max_epochs=max_epochs, monitor=settings.monitor,
                monitor_mode=settings.monitor_mode, tracker=tracker, run_dir=self.run_dir,
                batch_size=self.batching.batch_size, grad_accum=grad_accum, optimizer=optimizer,
                optimizer_state_mb=state_mb)
            set_up = True  # from here on the callbacks are ended, however the run ends
            for cb in callbacks:
                cb.setup(context, model, data)

            # --- tracking: the run starts in the store (the finally below ends it) ------------
            tracked = True  # (ending a tracker whose start failed is a no-op)
            self._start_tracking(teacher_weights)
            memory.keep_freed_memory()  # steps reuse freed memory, no page faults
            # compiled after any restore; the next step compiles (and on a GPU, MLX's kernels)
            step_fn, compiling = make_step(model, optimizer, loss_fn, settings, world, self.shards,
                                           grad_accum), True
            writer = self.writer = build_writer(self.checkpointing, manager, self.run_dir,
                                                self.config, world)
            self.saved_at = []
            model.train()

            # --- epochs of optimizer steps --------------------------------------------------
            stop.arm()  # SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, leave
            for cb in callbacks:
                cb.on_train_start(total_steps, state.step)
            stopped = state.step >= total_steps  # a finished run resumed: nothing left
            while state.epoch < max_epochs and not stopped:
                for batches in steps_of(data.train_batches(self.batching, state.epoch), grad_accum,
                                        rows_of):
                    if self.model_ops.due(state.step):  # scheduled model operations, a new step
                        if self.model_ops.run_due(state.step, model, optimizer, tracker):
                            forget_best(state, manager)
                        step_fn, compiling = make_step(model, optimizer, loss_fn, settings, world,
                                                       self.shards, grad_accum), True
                    started = time.perf_counter()
                    loss, norm, aux = step_fn(batches)
                    state.step += 1
                    # a step that compiled: said, tagged, and left out of the throughput
                    compiled_s = self._compiled(time.perf_counter() - started) if compiling else None
                    compiling = False
                    examples = losses.pop_example_outputs(aux)
                    if examples:
                        for cb in callbacks:
                            cb.on_batch_outputs(state.step, batches, examples)
                    loss_value = loss.item()  # already computed: the step's mx.eval synced
                    check_loss(loss_value, state.step, manager)
                    state.window.add(loss_value, aux, left_out_s=compiled_s)
                    end = state.step >= total_steps
                    logs: dict[str, float] = {}
                    if state.step % settings.log_every_steps == 0 or end:
                        logs = state.window.summary(data.task, norm.item(),
                                                    float(optimizer.learning_rate))
                        state.history.setdefault("train/loss", []).append(
                            (state.step, logs["train/loss"]))
                    for cb in callbacks:
                        cb.on_step(state.step, logs)
                    if logs:
                        tracker.log_metrics(logs, state.step)
                    every = settings.eval_every_steps
                    evaluated = bool(every and (state.step % every == 0 or end))
                    if evaluated:
                        self._evaluate_and_save()
                    # Ranks act on one decision (any rank's signal, rank 0's clock) at one step.
                    stop_now, save_now = world.agree(
                        stop.requested, not evaluated and manager.should_save(state.step))
                    if save_now:
                        self._save()
                    if stop_now:  # a signal: this step checkpointed (once), on disk, then leave
                        self._interrupt(stop)
                    stopped = end or any(cb.should_stop for cb in callbacks)
                    if stopped and len(batches) == grad_accum:  # an epoch's last, smaller step
                        break                                    # still ends its epoch
                else:
                    state.epoch += 1
                if not settings.eval_every_steps and state.last_eval_step != state.step:
                    self._evaluate_and_save()  # once per epoch
                    stopped = stopped or any(cb.should_stop for cb in callbacks)
            if state.last_eval_step != state.step:
                self._evaluate_and_save(force=True)  # the final state is always evaluated, saved

            return self._finish()  # the best weights back, quantized check, artifacts
        except (TrainingInterrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        except RuntimeError as err:  # MLX out of memory: one line, and an end within seconds
            def last_checkpoint():  # once written
                return (writer and writer.wait()) or (manager and manager.latest())

            failure = failures.device_failure(err, state.step if state else 0, last_checkpoint)
            if failure is None:
                raise
            raise failure from err  # the watchdog now bounds the cleanup below
        finally:  # always, last: callbacks end, the last checkpoint writes and uploads, run ends
            finished = state is not None and state.finished
            try:
                self._close(callbacks if set_up else [], writer, tracker if tracked else None,
                            "FINISHED" if finished else status, raise_first=finished)
            finally:
                if was_flushing is False:
                    kernels.flush_denormals(False)
                stop.disarm()  # last: a second Ctrl-C while closing still exits at once

    def _close(self, callbacks: Sequence[Callback], writer: CheckpointWriter | None,
               tracker: Tracker | None, status: str, raise_first: bool) -> None:
        """The end of a fit, each step guarded: the callbacks' on_train_end, the writer's close
        (the last write and upload round), then the tracked run's end. A step that fails does
        not skip the next ones: the run still ends, FAILED, with the first failure tagged; that
        failure is raised after, unless another exception is already on its way out
        (`raise_first` false: the run did not finish), which it must not replace."""
        failures: list[tuple[str, BaseException]] = []
        steps: list[tuple[str, Any]] = [(f"{type(cb).__name__}.on_train_end", cb.on_train_end)
                                        for cb in callbacks]
        if writer is not None:
            steps.append(("the checkpoint writer's close", lambda: writer.close(tracker)))
        for what, close in steps:
            try:
                close()
            except Exception as err:  # noqa: BLE001 - the next steps and the run's end go on
                log.error("closing the run: %s failed: %s: %s", what, type(err).__name__, err)
                failures.append((what, err))
        if tracker is not None:
            if failures:
                what, err = failures[0]
                status = "KILLED" if status == "KILLED" else "FAILED"
                try:
                    tracker.set_tags({T.ERROR: f"{what}: {type(err).__name__}: {err}"[:5000]})
                except Exception as tag_err:  # noqa: BLE001 - the status below matters more
                    log.error("closing the run: its error tag failed: %s", tag_err)
            try:
                tracker.end(status)
            except Exception as err:  # noqa: BLE001 - reported below, like the others
                log.error("closing the run: ending the tracked run (%s) failed: %s: %s", status,
                          type(err).__name__, err)
                failures.append(("the tracked run's end", err))
        if failures and raise_first:
            raise failures[0][1]

    def _start_tracking(self, teacher_weights: list[float]) -> None:
        """The tracked run starts (or a resumed one continues), with the tags only the fit knows."""
        state, tracker, settings = self.state, self.tracker, self.settings
        if settings.distill:  # the weights each teacher had (learned ones are known only now)
            self.tags[T.DISTILL_TEACHER_WEIGHTS] = str([round(w, 4) for w in teacher_weights])
        if self.val_print is not None:  # runs scored on the same rows compare row by row
            self.tags[T.VAL_FINGERPRINT] = self.val_print
        if state.resumed_from is not None:  # file trackers carry the killed run's record
            tracker.continue_from(state.resumed_from, state.step)
        tracker.start(params=self.config, tags=self.tags, run_id=state.run_id)
        if self.resume and state.run_id is not None and tracker.run_id == state.run_id:
            tracker.rewind(state.step)  # what the killed process logged after its checkpoint

    def _save(self, metric: float | None = None, force: bool = False) -> Path | None:
        """A checkpoint of this step (rank 0 writes; every rank takes part in the gathers)."""
        # Metrics logged so far reach the store before the checkpoint that covers them is
        # committed, so a SIGKILL never leaves a checkpoint whose steps are missing from the
        # tracking data; the writer waits for that (off this thread when it writes in the
        # background), the training goes on.
        stored = self.tracker.flush_barrier()
        self.saved_at.append(self.state.step)
        optimizer = self.optimizer
        if self.shards is not None:
            optimizer = distributed.StateView(
                self.shards.gathered_state(self.optimizer, self.model.trainable_parameters()))
        data_state = self.data.gathered_state()  # every lane's position (data lanes)
        if not self.world.is_main:
            return None
        state = self._checkpoint_state(data_state)

        def before_write() -> dict:
            stored()
            # Read only now: a tracker starting its run in a child process may not have
            # answered with the run's id at the first checkpoint (issue 24); the step won't wait.
            return {"run_id": self.tracker.run_id or state.run_id}

        return self.writer.save(self.model, optimizer, state, metric=metric, force=force,
                                before_write=before_write)

    def _evaluate_and_save(self, force: bool = False) -> None:
        """An evaluation (metrics logged, callbacks told, the best kept) and its checkpoint; a
        run without validation data only checkpoints."""
        state, settings = self.state, self.settings
        state.last_eval_step = state.step
        if not self.data.has_validation:  # the points where a run evaluates still checkpoint
            self._save(force=force)
            return
        result = evaluate(self.model, self.data, self.batching, self.world, loss_fn=self.loss_fn)
        for key, value in result.metrics.items():
            state.history.setdefault(key, []).append((state.step, value))
        self.tracker.log_metrics(result.metrics, state.step)
        for cb in self.callbacks:
            cb.on_eval(state.step, result.metrics)
        value = result.metrics.get(settings.monitor, math.nan)
        if is_better(value, state.best_metrics.get(settings.monitor), settings.monitor_mode):
            state.best_metrics = {**result.metrics, "best_step": float(state.step)}
            state.best_eval = result
        self._save(metric=value, force=force)

    def _interrupt(self, stop: GracefulStop) -> None:
        """A signal: checkpoint this step (once), wait until it is on disk, leave the loop."""
        if self.state.step not in self.saved_at[-1:]:
            self._save(force=True)
        self.writer.wait()  # the emergency checkpoint is on disk before the process exits
        raise TrainingInterrupted(stop.exit_code if stop.requested else 143, self.manager.latest(),
                                  requeue=stop.time_limit_warning and self.settings.requeue)

    def _finish(self) -> FitResult:
        """The run trained: best weights back in the model, the optional quantized check, the
        artifacts (rank 0 reports and writes)."""
        self.writer.wait()
        state, tracker, model = self.state, self.tracker, self.model
        best_metrics = dict(state.best_metrics)
        if not self.world.is_main:
            state.finished = True
            return FitResult(best_metrics, self.run_dir, None, None, state.step, state.history)
        tracker.log_metrics({f"best/{k}": v for k, v in best_metrics.items()}, state.step)
        best = self.manager.best_path
        if best is not None:
            load_checkpoint(best, model)
        if self.settings.quantize_bits:
            best_metrics.update(save_quantized(
                model, self.data, self.batching, int(self.settings.quantize_bits),
                self.settings.monitor, best_metrics, self._quantized_state, self.manager, tracker,
                state.step))
        log_artifacts(tracker, self.run_dir, state, self.data, best)
        state.finished = True
        return FitResult(best_metrics, self.run_dir, tracker.run_id, best, state.step,
                         state.history)

    def _compiled(self, seconds: float) -> float:
        """A step that compiled took `seconds`: said (when long), tagged (mlxlab.compile_s) and
        left out of the throughput (the bar's rate too, Callback.on_compiled). On a GPU the first
        step of a machine also compiles MLX's CUDA kernels: minutes, not a step's time."""
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

    def _checkpoint_state(self, data_state: dict):
        return checkpoint_state(self.state, data_state, model=self.model, data=self.data,
                                callbacks=self.callbacks, monitor=self.settings.monitor,
                                config=self.config, val_print=self.val_print,
                                model_ops=self.model_ops)

    def _quantized_state(self):
        state = self._checkpoint_state(self.data.state_dict())
        state.run_id = self.tracker.run_id or state.run_id
        return state


def check_loss(value: float, step: int, manager: CheckpointManager) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"loss became {value} at step {step}: lower optimizer.learning_rate "
                            f"or set trainer.grad_clip; last good checkpoint: {manager.latest()}")


def check_parts(model: Any, data: Any, tracker: Any) -> None:
    """What a fit is given is a model, a data module and a tracker of mlxlab, or it fails here
    (once per fit), naming what is missing."""
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} is not a model of mlxlab: subclass "
                        "mlxlab.models.base.Model (its optional members have defaults)")
    check_contract(data, DataModule, "data module")
    check_contract(tracker, Tracker, "tracker")


def check_contract(obj: Any, protocol: type, what: str) -> None:
    """A part that does not implement its protocol fails here, naming what it lacks."""
    if isinstance(obj, protocol):
        return
    members = [m for m in dir(protocol) if not m.startswith("_")]
    members += list(getattr(protocol, "__annotations__", {}))
    missing = sorted({m for m in members if not hasattr(obj, m)})
    raise TypeError(f"{type(obj).__name__} is not a {what} ({protocol.__module__}."
                    f"{protocol.__name__}): it lacks {missing}")
