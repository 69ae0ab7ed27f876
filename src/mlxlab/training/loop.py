"""The training loop: `Fit`, one call of `Trainer.fit`.

Read `Fit.run` and the pieces it calls in order, as torchtune's recipes keep their phases:
`_prepare` (what the run trains with: the objective set up, the batching, the run's length),
`_restore` (the optimizer and any checkpoint), `_start` (callbacks, tracking, the compiled step),
`_epochs` of `_step`s with their logging, then `_finish` (the best weights back and the
artifacts). One try/finally in `run` holds them all, so however the run ends (finished, an
error, a signal, a failure to build the checkpoint writer after the tracked run started) the
callbacks end, the last checkpoint is written and uploaded, and the tracked run gets its status:
FINISHED, KILLED on a signal, FAILED otherwise.

`Fit` is this file (the loop itself) on two bases, a concern each: `EvaluationPoints`
(eval_points.py: after each step and epoch, whether the run evaluates, checkpoints or leaves on a
signal, and doing it) and `RunEnd` (run_end.py: `_finish`, and `_close`, which ends every run);
fit_fields.py declares the fields the three share, part_checks.py checks what a fit is given.

What the run trains toward is its `Objective` (objectives/base.py): the loop takes its batches
from `objective.train_batches`, trains `objective.loss`, evaluates with `objective.evaluate`,
checkpoints `objective.state_dict()`, and never asks which objective it is (rule 4 of
scripts/audit_house.py fails on a branch; tests/test_objectives.py trains one the loop never
named). The other parts it calls live beside it, a module each, and never call back into it:
plan.py (the run's length, batching, memory fitting), step.py (the compiled step, precision),
checkpointing.py (writer, checkpoint state, resume), artifacts.py (what a finished run leaves);
state.py holds what the loop changes (RunState) and what callbacks see (TrainContext). The
constructor only keeps its arguments.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab import kernels
from mlxlab.checkpoint import CheckpointManager
from mlxlab.checkpoint.finished import clear_finished, mark_finished
from mlxlab.data.base import DataModule
from mlxlab.models.layers.grad_checkpoint import checkpoint_blocks, checkpoint_mixers
from mlxlab.objectives import losses
from mlxlab.objectives.base import (
    ObjectiveSetup,
    check_objective,
    data_kind,
)
from mlxlab.runtime.cluster import distributed
from mlxlab.runtime.memory import allocator
from mlxlab.runtime.supervision import failures, supervise
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.training.checkpointing import (
    build_manager,
    build_writer,
    fit_base,
    forget_best,
    restore,
    resume_tags,
    validation_fingerprint,
)
from mlxlab.training.fit_fields import FitParts
from mlxlab.training.micro_batch import Fitting, plan_micro_batch
from mlxlab.training.model_ops import ModelSchedule
from mlxlab.training.optim import build_optimizer
from mlxlab.training.parallel.sharding import place
from mlxlab.training.part_checks import check_parts
from mlxlab.training.plan import global_batching, plan, steps_of
from mlxlab.training.run_end import RunEnd
from mlxlab.training.signals import GracefulStop
from mlxlab.training.state import (
    FitResult,
    RunState,
    TrainContext,
    TrainingError,
    TrainingInterrupted,
)
from mlxlab.training.step import compute_dtype, make_step, with_precision
from mlxlab.training.token_tracking import TokenDistributionLog

log = logging.getLogger(__name__)


class Fit(RunEnd):
    """One fit of `model` to `data` by `trainer`'s parts (its objective, settings, optimizer,
    callbacks, checkpoint policy), tracked by `tracker`, checkpointed under `run_dir`; `resume`
    (a run or checkpoint folder) continues where it stopped. `run()` trains and returns the best
    evaluation."""

    def __init__(self, trainer: FitParts, model: nn.Module, data: DataModule, tracker: Tracker,
                 run_dir: Path, config: dict, tags: dict, resume: str | Path | None) -> None:
        self.settings, self.optimizer_factory = trainer.settings, trainer.optimizer_factory
        self.callbacks = list(trainer.callbacks)  # this fit's: a data curriculum adds its own
        self.checkpointing = trainer.checkpointing
        self.objective = trainer.objective
        self.model, self.data, self.tracker = model, data, tracker
        self.run_dir, self.config, self.tags, self.resume = run_dir, config, tags, resume
        self.compiles = []
        self.steps_peak = 0

    def run(self) -> FitResult:
        """Train; returns the best evaluation's metrics and where the best weights are. Its
        pieces, in order: _prepare (what the run trains with), _restore (the optimizer and any
        checkpoint), _start (callbacks, tracking, the step), _epochs, _finish; however it ends,
        _close ends the callbacks, the writer and the tracked run."""
        check_parts(self.model, self.data, self.tracker)
        check_objective(self.objective)
        self.stop, status = GracefulStop(), "FAILED"
        self.state = self.manager = self.writer = None  # what the clauses below close
        self.set_up = self.tracked = False
        self.was_flushing = None  # the denormal mode before this run, restored at its end
        try:
            self._prepare()
            self._restore()
            self._start()
            self._epochs()
            return self._finish()  # the best weights back, quantized check, artifacts
        except (TrainingInterrupted, KeyboardInterrupt):
            status = "KILLED"
            raise
        except RuntimeError as err:  # MLX out of memory: one line, and an end within seconds
            def last_checkpoint():  # once written
                return (self.writer and self.writer.wait()) or (
                    self.manager and self.manager.latest())

            failure = failures.device_failure(err, self.state.step if self.state else 0,
                                              last_checkpoint)
            if failure is None:
                raise
            raise failure from err  # the watchdog now bounds the cleanup below
        finally:  # always, last: callbacks end, the last checkpoint writes and uploads, run ends
            finished = self.state is not None and self.state.finished
            try:
                self._close(self.callbacks if self.set_up else [], self.writer,
                            self.tracker if self.tracked else None,
                            "FINISHED" if finished else status, raise_first=finished)
                if finished and self.world.is_main:  # its last checkpoint is written
                    mark_finished(self.run_dir, self.state.step)
            finally:
                if self.was_flushing is False:
                    kernels.flush_denormals(False)
                self.stop.disarm()  # last: a second Ctrl-C while closing still exits at once

    def _prepare(self) -> None:
        """What this run trains with: the world, the objective set up (before any restore), the
        batching fitted to memory, the run's length, its checkpoint manager."""
        model, data, settings, objective = self.model, self.data, self.settings, self.objective
        kernels.set_mode(settings.fused_kernels)  # process-wide: the ops the step traces
        if settings.grad_checkpoint in ("mixers", "cores"):  # before the memory fit's step
            cores = settings.grad_checkpoint == "cores"
            log.info("gradient checkpointing: %d recurrent mixers recompute their activations in "
                     "the backward%s", checkpoint_mixers(model, cores),
                     ", their projections' and rule's outputs kept" if cores else "")
        elif settings.grad_checkpoint:
            log.info("gradient checkpointing: %d blocks recompute their activations in the "
                     "backward", checkpoint_blocks(model))
        if settings.flush_denormals and mx.default_device() == mx.cpu:
            # x86 runs arithmetic on denormal floats ~100x slower (kernels/denormals.py)
            self.was_flushing = kernels.flush_denormals(True)
        world = self.world = distributed.world(settings.distributed.mode,
                                               settings.distributed.timeout_s)
        # tensor: every rank computes the same rows. A sharded model's forward is a collective,
        # so evaluation runs every batch on every rank (data parallel spreads the batches).
        self.data_world = distributed.World() if settings.distributed.mode == "tensor" else world
        self.eval_world = distributed.World() if settings.distributed.sharded else world
        if world.is_main:  # training in this folder again: its run is not finished until then
            clear_finished(self.run_dir)
        self.model_ops = ModelSchedule(settings.model_schedule)  # which are done: this run's
        # batch_size is per rank, as with torchrun; data that reads a lane per rank
        # (data.shard_by_rank) batches per rank already, other data the global batch
        rank_batches = data.use_world(self.data_world)
        self.rows_of = (lambda batch: batch) if rank_batches else self.data_world.shard_rows
        batching = settings.data_batching()
        batching = batching if rank_batches else global_batching(batching, self.data_world)
        self.objective_tags = objective.setup(ObjectiveSetup(
            model=model, data=data, batching=batching, world=self.data_world,
            per_example=any(cb.needs_example_losses for cb in self.callbacks),
            run_dir=self.run_dir, tracker=self.tracker,
            float32_step=compute_dtype(settings.precision) == mx.float32)) or {}
        self.loss_fn = with_precision(objective.loss, settings.precision)
        # what decides between evaluations equal on the monitor
        self.tie_break = objective.metrics(data_kind(data)).tie()
        self.batching, self.grad_accum = plan_micro_batch(Fitting(  # training/micro_batch.py
            model, data, self.loss_fn, objective.probe_batch, settings, self.data_world,
            self.rows_of,
            self.optimizer_factory, self.run_dir, self.resume, self.config, self.tags,
            lambda: objective.memory_beside_step(batching), not objective.couples_rows),
            batching, rank_batches)
        self.total_steps, self.max_epochs, self.steps_per_epoch = plan(
            data, settings, self.batching, self.grad_accum,
            self.data_world if rank_batches else None,
            per_data_batch=objective.plan(self.grad_accum))
        self.state = RunState()
        if data.curriculum is not None:  # data/curriculum.py: pacing, tracking
            self.callbacks.append(TokenDistributionLog(
                data, self.tracker, self.run_dir, self.total_steps * self.grad_accum,
                self.grad_accum))
        self.val_print = validation_fingerprint(data)  # None: no validation data, said once
        self.manager = build_manager(self.checkpointing, self.run_dir, settings)
        self.base = fit_base(self.model, self.checkpointing)  # None: checkpoints of every weight

    def _restore(self) -> None:
        """The optimizer, any checkpoint restored into it, the model, the data position, the
        objective, the callbacks and the RunState; then, for trainer.distributed.mode=fsdp or
        tensor, the model and its optimizer state split over the ranks."""
        model, settings, world = self.model, self.settings, self.world
        optimizer = build_optimizer(self.optimizer_factory, settings.schedule, self.total_steps)
        optimizer.init(model.trainable_parameters())
        if self.resume:
            saved, report = restore(self.resume, model=model, optimizer=optimizer, data=self.data,
                                    callbacks=self.callbacks, state=self.state,
                                    manager=self.manager, model_ops=self.model_ops,
                                    world=self.data_world,
                                    objective=self.objective, rows=self.batching.batch_size)
            self.tags.update(resume_tags(saved, report, self.config, self.data, self.val_print,
                                         self.state, self.manager, settings.monitor))
        # A checkpoint is whole (any world size wrote it): it loaded into the whole model and
        # optimizer above, and each rank keeps its slices of both here.
        self.placement = place(model, world, settings.distributed.mode)
        restored = dict(tree_flatten(optimizer.state)) if self.resume else None
        self.placement.adopt(optimizer, model, restored)
        if self.placement.sharded:  # the whole model held before the split is not the step's
            mx.reset_peak_memory()
        self.optimizer = optimizer

    def _start(self) -> None:
        """The callbacks set up, the tracked run started (or continued), the step compiled,
        the checkpoint writer built."""
        state_mb = distributed.tree_nbytes(self.optimizer.state) / 2**20
        probe_loss = self.objective.probe_loss()  # None: it trains on batches it makes
        log.info("optimizer state: %.1f MB on this rank%s", state_mb,
                 f" (sharded over {self.world.size} ranks)" if self.placement.sharded else "")
        context = TrainContext(
            world=self.world, task=self.data.task, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, max_epochs=self.max_epochs,
            monitor=self.settings.monitor, monitor_mode=self.settings.monitor_mode,
            tracker=self.tracker, run_dir=self.run_dir, batch_size=self.batching.batch_size,
            grad_accum=self.grad_accum, optimizer=self.optimizer, optimizer_state_mb=state_mb,
            tie_break=self.tie_break,
            probe_loss=None if probe_loss is None else with_precision(probe_loss,
                                                                      self.settings.precision))
        self.set_up = True  # from here on the callbacks are ended, however the run ends
        for cb in self.callbacks:
            cb.setup(context, self.model, self.data)
        self.tracked = True  # (ending a tracker whose start failed is a no-op)
        self._start_tracking()
        allocator.keep_freed_memory()  # steps reuse freed memory, no page faults
        self._compile()  # after any restore; the next step compiles (on a GPU, MLX's kernels too)
        self.writer = build_writer(self.checkpointing, self.manager, self.run_dir, self.config,
                                   self.world)
        self.saved_at = []
        self.model.train()

    def _compile(self) -> None:
        self.step_fn = make_step(self.model, self.optimizer, self.loss_fn, self.settings,
                                 self.world, self.placement.gradients, self.grad_accum)
        self.compiling, self.shapes_seen = True, frozenset()

    def _epochs(self) -> None:
        """Epochs of optimizer steps, each evaluated and checkpointed as the settings say; the
        final state is always evaluated and saved."""
        state = self.state
        self.stop.arm()  # SIGTERM/SIGINT/SIGUSR1: finish the step, checkpoint, leave
        for cb in self.callbacks:
            cb.on_train_start(self.total_steps, state.step)
        stopped = state.step >= self.total_steps  # a finished run resumed: nothing left
        while state.epoch < self.max_epochs and not stopped:
            batches = self.objective.train_batches(self.data, self.batching, state.epoch,
                                                   self.model)
            for micro in steps_of(batches, self.grad_accum, self.rows_of):
                stopped = self._step(micro)
                if stopped and len(micro) == self.grad_accum:  # an epoch's last, smaller step
                    break                                       # still ends its epoch
            else:
                state.epoch += 1
            if self._at_epoch_end():  # evaluated: a callback may stop the run
                stopped = stopped or any(cb.should_stop for cb in self.callbacks)
        self._at_run_end()  # the final state is always evaluated, saved

    def _step(self, batches: list[dict]) -> bool:
        """One optimizer step on `batches` (its micro-batches), its logs, any evaluation and
        checkpoint it is due; True when the run should stop after it."""
        state, settings, model, optimizer = self.state, self.settings, self.model, self.optimizer
        if self.model_ops.due(state.step):  # scheduled model operations, a new step
            if self.model_ops.run_due(state.step, model, optimizer, self.tracker):
                forget_best(state, self.manager)
            self._compile()
        shapes = batch_shapes(batches)  # a shape the compiled step has not seen traces anew
        compiling = self.compiling or not shapes <= self.shapes_seen
        started = time.perf_counter()
        loss, norm, aux = self.step_fn(batches)
        state.step += 1
        # a step that compiled: said, tagged, and left out of the throughput
        compiled_s = (self._compiled(time.perf_counter() - started, shapes - self.shapes_seen)
                      if compiling else None)
        self.shapes_seen |= shapes
        self.compiling = False
        examples = losses.pop_example_outputs(aux)
        if examples:
            for cb in self.callbacks:
                cb.on_batch_outputs(state.step, batches, examples)
        loss_value = loss.item()  # already computed: the step's mx.eval synced
        check_loss(loss_value, state.step, self.manager)
        state.window.add(loss_value, aux, left_out_s=compiled_s)
        end = state.step >= self.total_steps
        # MLX's peak over the steps, before this step's evaluation or checkpoint (a sharded
        # checkpoint gathers the whole model on rank 0)
        self.steps_peak = mx.get_peak_memory()
        logs: dict[str, float] = {}
        if state.step % settings.log_every_steps == 0 or end:
            logs = state.window.summary(self.data.task, norm.item(),
                                        float(optimizer.learning_rate))
            logs.update({f"train/{k}": v for k, v in self.objective.logs().items()})
            state.history.setdefault("train/loss", []).append((state.step, logs["train/loss"]))
        for cb in self.callbacks:
            cb.on_step(state.step, logs)
        if logs:
            self.tracker.log_metrics(logs, state.step)
        self._at_step_end(end)  # its evaluation, checkpoint or signal (eval_points.py)
        return end or any(cb.should_stop for cb in self.callbacks)

    def _start_tracking(self) -> None:
        """The tracked run starts (or a resumed one continues), with the tags only the fit knows."""
        state, tracker = self.state, self.tracker
        self.tags.update(self.objective_tags)  # known after its setup (learned weights)
        if self.val_print is not None:  # runs scored on the same rows compare row by row
            self.tags[T.VAL_FINGERPRINT] = self.val_print
        if state.resumed_from is not None:  # file trackers carry the killed run's record
            tracker.continue_from(state.resumed_from, state.step)
        # a run its supervising parent restarted before any checkpoint continues its tracked run
        restarted = None if state.run_id else supervise.continued_run_id(self.run_dir)
        run_id = state.run_id or restarted
        tracker.start(params=self.config, tags=self.tags, run_id=run_id)
        if ((self.resume or restarted) and run_id is not None and tracker.run_id == run_id):
            tracker.rewind(state.step)  # what the killed process logged after its checkpoint
        if self.world.is_main:  # for the parent: a restart continues it, a stall ends it
            supervise.report_tracked(tracker.run_id, getattr(tracker, "uri", None))

    def _compiled(self, seconds: float, new_shapes: frozenset) -> float:
        """A step that compiled (the first after the step was built, or a batch shape it had not
        seen) took `seconds`: logged with the shapes, counted and summed in tags
        (mlxlab.compiles, mlxlab.compile_s) and left out of the throughput (the bar's rate too,
        Callback.on_compiled). On a GPU the first step of a machine also compiles MLX's CUDA
        kernels: minutes, not a step's time."""
        self.compiles.append(seconds)
        log.info("step %d compiled %s in %.1f s (MLX's compile%s; %d so far, %.1f s in all); "
                 "left out of the throughput", self.state.step,
                 ", ".join(sorted(shape_text(s) for s in new_shapes)) or "the step",
                 seconds, "" if mx.default_device() == mx.cpu else " and its GPU kernels",
                 len(self.compiles), sum(self.compiles))
        # tags, not metrics: a resumed run compiles again at another step, and its metric
        # history must stay the uninterrupted run's
        self.tracker.set_tags({T.COMPILE_S: f"{sum(self.compiles):.3f}",
                               T.COMPILES: str(len(self.compiles))})
        for cb in self.callbacks:
            cb.on_compiled(self.state.step, seconds)
        return seconds


def batch_shapes(batches: list[dict]) -> frozenset[tuple[tuple[int, ...], ...]]:
    """The shapes of a step's micro-batches (each: its arrays' shapes in key order): a new one
    makes the compiled step trace and compile again."""
    return frozenset(tuple(tuple(b[k].shape) for k in sorted(b)) for b in batches)


def shape_text(shapes: tuple[tuple[int, ...], ...]) -> str:
    """A micro-batch's shape as its widest array's, e.g. "4x160" (rows x positions)."""
    return "x".join(map(str, max(shapes, key=lambda s: (len(s), s), default=())))


def check_loss(value: float, step: int, manager: CheckpointManager) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"loss became {value} at step {step}: lower optimizer.learning_rate "
                            f"or set trainer.grad_clip; last good checkpoint: {manager.latest()}")


