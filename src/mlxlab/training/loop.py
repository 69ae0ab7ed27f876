"""The training loop: `Fit`, one call of `Trainer.fit`.

Read `Fit.run` and the pieces it calls in order, as torchtune's recipes keep their phases:
`_prepare` (what the run trains with: the objective set up, the batching, the run's length),
`_restore` (the optimizer and any checkpoint), `_start` (callbacks, tracking, the compiled step),
`_epochs` of `_step`s with their logging, evaluations and checkpoints, then `_finish` (the best
weights back and the artifacts). One try/finally in `run` holds them all, so however the run
ends (finished, an error, a signal, a failure to build the checkpoint writer after the tracked
run started) the callbacks end, the last checkpoint is written and uploaded, and the tracked run
gets its status: FINISHED, KILLED on a signal, FAILED otherwise.

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
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxlab import kernels
from mlxlab.checkpoint import CheckpointManager, choose_best, load_checkpoint
from mlxlab.checkpoint.atomic import temp_dir
from mlxlab.checkpoint.finished import clear_finished, mark_finished
from mlxlab.checkpoint.state import read_payload
from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batching
from mlxlab.models.base import Model
from mlxlab.models.layers.grad_checkpoint import checkpoint_blocks
from mlxlab.models.sources.fingerprint import holds_base
from mlxlab.objectives import losses
from mlxlab.objectives.base import (
    Evaluation,
    LossFn,
    Objective,
    ObjectiveSetup,
    check_objective,
    data_kind,
)
from mlxlab.runtime.cluster import distributed
from mlxlab.runtime.memory import allocator
from mlxlab.runtime.supervision import failures, supervise
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.training.artifacts import log_artifacts, save_quantized
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback
from mlxlab.training.checkpointing import (
    build_manager,
    build_writer,
    checkpoint_state,
    fit_base,
    forget_best,
    restore,
    resume_tags,
    validation_fingerprint,
)
from mlxlab.training.micro_batch import Fitting, plan_micro_batch
from mlxlab.training.model_ops import ModelSchedule
from mlxlab.training.optim import OptimizerFactory, build_optimizer
from mlxlab.training.parallel.sharding import Placement, Written, place
from mlxlab.training.plan import global_batching, plan, steps_of
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


class FitParts(Protocol):
    """What a fit takes from its Trainer (trainer.py): the settings and the parts it was built
    with."""

    settings: TrainerSettings
    optimizer_factory: OptimizerFactory
    callbacks: Sequence[Callback]
    checkpointing: CheckpointPolicy
    objective: Objective


class Fit:
    """One fit of `model` to `data` by `trainer`'s parts (its objective, settings, optimizer,
    callbacks, checkpoint policy), tracked by `tracker`, checkpointed under `run_dir`; `resume`
    (a run or checkpoint folder) continues where it stopped. `run()` trains and returns the best
    evaluation."""

    # What run()'s pieces build, in order, and the save and evaluation points read.
    world: distributed.World
    rows_of: Any                    # this rank's rows of a batch (identity: data batches per rank)
    batching: Batching              # after any memory fitting
    grad_accum: int
    loss_fn: LossFn                 # the objective's loss in trainer.precision: what the step trains
    total_steps: int
    max_epochs: float
    steps_per_epoch: int | None
    state: RunState
    optimizer: Any
    placement: Placement            # how the model sits on the ranks (training/parallel/)
    data_world: distributed.World   # the ranks the data splits over (tensor: none, every rank
    eval_world: distributed.World   # computes the same rows; fsdp evaluates whole on each)
    manager: CheckpointManager
    base: dict | None               # the pretrained base checkpoints leave out (fit_base)
    writer: CheckpointWriter
    model_ops: ModelSchedule
    val_print: str | None           # the validation set's fingerprint (None: no validation)
    saved_at: list[int]             # the steps saved, the same on every rank
    step_fn: Any                    # the compiled step (rebuilt after a model operation)
    compiling: bool                 # the next step compiles (left out of the throughput)
    shapes_seen: frozenset          # the micro-batch shapes the compiled step has traced
    compiles: list[float]           # seconds of each step that compiled, in this process
    tie_break: tuple[str, str] | None  # (metric, mode) breaking a tie on the monitor
    objective_tags: dict[str, str]  # the run tags the objective's setup returned
    steps_peak: int                 # MLX's peak bytes at the last step (before its checkpoint)

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
        if settings.grad_checkpoint:  # before the memory fit measures a step
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
            run_dir=self.run_dir, tracker=self.tracker)) or {}
        self.loss_fn = with_precision(objective.loss, settings.precision)
        # what decides between evaluations equal on the monitor
        self.tie_break = objective.metrics(data_kind(data)).tie()
        self.batching, self.grad_accum = plan_micro_batch(Fitting(  # training/micro_batch.py
            model, data, self.loss_fn, objective.probe_batch, settings, self.data_world,
            self.rows_of,
            self.optimizer_factory, self.run_dir, self.resume, self.config, self.tags,
            lambda: objective.memory_beside_step(batching)), batching, rank_batches)
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
        state, settings = self.state, self.settings
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
            if not settings.eval_every_steps and state.last_eval_step != state.step:
                self._evaluate_and_save()  # once per epoch
                stopped = stopped or any(cb.should_stop for cb in self.callbacks)
        if state.last_eval_step != state.step:
            self._evaluate_and_save(force=True)  # the final state is always evaluated, saved

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
        every = settings.eval_every_steps
        evaluated = bool(every and (state.step % every == 0 or end))
        if evaluated:
            self._evaluate_and_save()
        # Ranks act on one decision (any rank's signal, rank 0's clock) at one step.
        stop_now, save_now = self.world.agree(
            self.stop.requested, not evaluated and self.manager.should_save(state.step))
        if save_now:
            self._save()
        if stop_now:  # a signal: this step checkpointed (once), on disk, then leave
            self._interrupt(self.stop)
        return end or any(cb.should_stop for cb in self.callbacks)

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

    def _save(self, metric: float | None = None, force: bool = False,
              best: bool | None = None) -> Path | None:
        """A checkpoint of this step (rank 0 writes; every rank takes part in the gathers)."""
        # Metrics logged so far reach the store before the checkpoint that covers them is
        # committed, so a SIGKILL never leaves a checkpoint whose steps are missing from the
        # tracking data; the writer waits for that (off this thread when it writes in the
        # background), the training goes on.
        stored = self.tracker.flush_barrier()
        self.saved_at.append(self.state.step)
        model, optimizer, files = self.model, self.optimizer, {}
        if self.placement.sharded:  # every rank sends its slices, rank 0 streams them to files
            spool = temp_dir(self.manager.directory, "spool") if self.world.is_main else None
            if spool is not None:
                spool.mkdir(parents=True)
            files = self.placement.write_whole(self.model, self.optimizer, spool,
                                               trainable_only=self.base is not None)
            model, optimizer = Written(), None
        data_state = self.data.gathered_state()  # every lane's position (data lanes)
        if not self.world.is_main:
            return None
        state = self._checkpoint_state(data_state)

        def before_write() -> dict:
            stored()
            # Read only now: a tracker starting its run in a child process may not have
            # answered with the run's id at the first checkpoint; the step does not wait.
            return {"run_id": self.tracker.run_id or state.run_id}

        return self.writer.save(model, optimizer, state, metric=metric, force=force,
                                before_write=before_write, best=best, files=files)

    def _evaluate_and_save(self, force: bool = False) -> None:
        """An evaluation (metrics logged, callbacks told, the best kept) and its checkpoint; a
        run without validation data only checkpoints."""
        state, settings = self.state, self.settings
        state.last_eval_step = state.step
        if not self.data.has_validation:  # the points where a run evaluates still checkpoint
            self._save(force=force)
            return
        # a sharded model's forward waits on the other ranks: the watchdog bounds it
        with self.world.guard("an evaluation", 20.0) if self.placement.sharded else nullcontext():
            result = self.objective.evaluate(self.model, self.data, self.batching,
                                             self.eval_world, step=state.step)
        for key, value in result.metrics.items():
            state.history.setdefault(key, []).append((state.step, value))
        self.tracker.log_metrics(result.metrics, state.step)
        for cb in self.callbacks:
            cb.on_eval(state.step, result.metrics)
        value = result.metrics.get(settings.monitor, math.nan)
        choice = choose_best(result.metrics, state.best_metrics, settings.monitor,
                             settings.monitor_mode, state.step, self.tie_break)
        if choice.tie:  # a saturated monitor: which checkpoint the tie-break kept, and why
            log.info("best checkpoint: %s", choice.tie)
        if choice.better:
            state.best_metrics = {**result.metrics, "best_step": float(state.step)}
            state.best_eval = result
            self.tracker.set_tags({T.BEST_CHECKPOINT: choice.tie or
                                   f"step {state.step}: {settings.monitor} {value:.6g}"})
        for cb in self.callbacks:  # the evaluation whole: per-example scores it carries
            cb.on_evaluation(state.step, result, choice.better)
        self._save(metric=value, force=force, best=choice.better)

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
        self._log_rank_peaks()
        if not self.world.is_main:
            state.finished = True
            return FitResult(best_metrics, self.run_dir, None, None, state.step, state.history)
        tracker.log_metrics({f"best/{k}": v for k, v in best_metrics.items()}, state.step)
        best = self.manager.best_path
        # The model already holds best/'s weights when the last step is the best one: loading
        # them again would hold a second copy of the whole model (a 1B float32 LoRA base: 4.7 GB
        # more at the run's end).
        # (A sharded model stays sharded: the run's files, not it, are what the verbs load.)
        if (best is not None and not self.placement.sharded
                and read_payload(best).get("step") != state.step):
            load_checkpoint(best, model, verify_base=holds_base(model, str(best)))
        if self.settings.quantize_bits:
            def evaluate(m: nn.Module, prefix: str) -> Evaluation:
                return self.objective.evaluate(m, self.data, self.batching, prefix=prefix,
                                               step=state.step)

            best_metrics.update(save_quantized(
                model, evaluate, int(self.settings.quantize_bits),
                self.settings.monitor, best_metrics, self._quantized_state, self.manager, tracker,
                state.step))
        native = model.save_native(self.run_dir)  # e.g. a sentence-transformers folder
        if native is not None:
            tracker.log_artifact(native, native.name)
        log_artifacts(tracker, self.run_dir, state, self.data, best)
        state.finished = True
        return FitResult(best_metrics, self.run_dir, tracker.run_id, best, state.step,
                         state.history)

    def _log_rank_peaks(self) -> None:
        """Each rank's MLX peak over the steps, said and logged by rank 0 (system/peak_mb_rank<r>):
        what a mode's sharding saves is read there."""
        mine = self.steps_peak / 2**20
        peaks = self.world.sum_numbers([mine if r == self.world.rank else 0.0
                                        for r in range(self.world.size)], "gathering memory peaks")
        log.info("MLX peak over the steps, per rank: %s MB",
                 ", ".join(f"{p:.1f}" for p in peaks))
        if self.world.is_main:
            self.tracker.log_metrics({f"system/peak_mb_rank{r}": p for r, p in enumerate(peaks)},
                                     self.state.step)

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

    def _checkpoint_state(self, data_state: dict):
        return checkpoint_state(self.state, data_state, model=self.model, data=self.data,
                                callbacks=self.callbacks, monitor=self.settings.monitor,
                                config=self.config, val_print=self.val_print,
                                model_ops=self.model_ops, objective=self.objective,
                                base=self.base)

    def _quantized_state(self):
        state = self._checkpoint_state(self.data.state_dict())
        state.base = None  # the quantized weights are every weight, packed
        state.run_id = self.tracker.run_id or state.run_id
        return state


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
