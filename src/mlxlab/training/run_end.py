"""The end of a fit: `RunEnd`, the part of `Fit` (loop.py) that finishes a run that trained and
closes every run, however it ended.

`_finish` (a run that trained): the best weights back in the model, the optional quantized copy
and its evaluation, the model's native folder and the artifacts; rank 0 reports and writes, every
rank says its MLX peak. `_close` (every run, from run()'s finally): the callbacks' on_train_end,
the checkpoint writer's close (the last write and upload round), then the tracked run's end with
its status, each step guarded so that one failing never skips the next.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.nn as nn

from mlxlab.checkpoint import CheckpointState, load_checkpoint
from mlxlab.checkpoint.state import read_payload
from mlxlab.models.sources.fingerprint import holds_base
from mlxlab.objectives.base import Evaluation
from mlxlab.tracking import tags as T
from mlxlab.tracking.base import Tracker
from mlxlab.training.artifacts import log_artifacts, save_quantized
from mlxlab.training.async_writer import CheckpointWriter
from mlxlab.training.callbacks import Callback
from mlxlab.training.eval_points import EvaluationPoints
from mlxlab.training.state import FitResult

log = logging.getLogger(__name__)


class RunEnd(EvaluationPoints):
    """A fit's end: `_finish` after the last evaluation, `_close` always."""

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

    def _quantized_state(self) -> CheckpointState:
        """The checkpoint state of the run's quantized copy (artifacts.py save_quantized)."""
        state = self._checkpoint_state(self.data.state_dict())
        state.base = None  # the quantized weights are every weight, packed
        state.run_id = self.tracker.run_id or state.run_id
        return state

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
