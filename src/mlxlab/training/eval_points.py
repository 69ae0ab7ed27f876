"""Where a fit evaluates and checkpoints: `EvaluationPoints`, the part of `Fit` (loop.py) that
decides, after each step and each epoch, whether the run evaluates, checkpoints or leaves on a
signal, and does it.

A run evaluates every `trainer.eval_every_steps` steps and at its last step, or once per epoch
when that is 0; the final state is always evaluated and saved. Between evaluations it
checkpoints on the checkpoint manager's interval; a signal checkpoints the step it arrived at
(once) and leaves. An evaluation logs its metrics, tells the callbacks, keeps the best (the
monitor, then the objective's tie-break) and checkpoints; a run without validation data only
checkpoints at those points. Every rank acts on one decision at one step.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

from mlxlab.checkpoint import CheckpointState, choose_best
from mlxlab.checkpoint.atomic import temp_dir
from mlxlab.tracking import tags as T
from mlxlab.training.checkpointing import checkpoint_state
from mlxlab.training.fit_fields import FitFields
from mlxlab.training.parallel.sharding import Written
from mlxlab.training.signals import GracefulStop
from mlxlab.training.state import TrainingInterrupted

log = logging.getLogger(__name__)


class EvaluationPoints(FitFields):
    """A fit's evaluations and checkpoints, and when they happen (the loop calls the `_at_*`
    points)."""

    def _at_step_end(self, end: bool) -> None:
        """After a step: its evaluation when one is due (every eval_every_steps, and the last
        step), else its checkpoint when the interval is due; a signal on any rank checkpoints
        this step and leaves the loop (TrainingInterrupted)."""
        state, every = self.state, self.settings.eval_every_steps
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

    def _at_epoch_end(self) -> bool:
        """After an epoch: its evaluation when the run evaluates once per epoch
        (eval_every_steps 0) and this step was not evaluated; True when it evaluated."""
        if self.settings.eval_every_steps or self.state.last_eval_step == self.state.step:
            return False
        self._evaluate_and_save()
        return True

    def _at_run_end(self) -> None:
        """The final state is always evaluated and saved (once)."""
        if self.state.last_eval_step != self.state.step:
            self._evaluate_and_save(force=True)

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

    def _checkpoint_state(self, data_state: dict) -> CheckpointState:
        return checkpoint_state(self.state, data_state, model=self.model, data=self.data,
                                callbacks=self.callbacks, monitor=self.settings.monitor,
                                config=self.config, val_print=self.val_print,
                                model_ops=self.model_ops, objective=self.objective,
                                base=self.base)
