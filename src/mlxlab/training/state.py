"""What one fit changes and what it tells others: `RunState` (lands in every checkpoint) with its
`LogWindow` (the averages since the last logged line), `TrainContext` (the frozen view callbacks
get), `FitResult` (and `Evaluation`, which objectives/base.py defines: an objective's evaluate
returns it), and the two ways a fit ends early (`TrainingError`,
`TrainingInterrupted`).

The floor of training/ beside settings.py: it imports no other module of training/, so callbacks
and every part of the loop can import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxlab.checkpoint.layout import CHECKPOINTS_DIR
from mlxlab.errors import UserError
from mlxlab.objectives.base import Evaluation  # noqa: F401  (public here too, as before)
from mlxlab.runtime.cluster import distributed
from mlxlab.tracking.base import Tracker

if TYPE_CHECKING:
    from mlxlab.checkpoint import CheckpointState


@dataclass(frozen=True)
class TrainContext:
    """What a callback may know about the run it is in (Callback.setup receives it)."""

    world: distributed.World
    task: str                      # the data's: "classification" | "lm" | "preference" | ...
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
    # the metric (and its mode) that breaks a tie on the monitor: the objective's loss
    # (MetricSpec.tie_break, checkpoint.choose_best); None: the later evaluation
    tie_break: tuple[str, str] | None = None
    # the objective's loss (as the step computes it) on a batch of the data's, e.g. a probe for
    # gradient norms; None when the objective trains on batches it makes (Objective.probe_loss)
    probe_loss: Any = None


@dataclass
class FitResult:
    metrics: dict[str, float]
    run_dir: Path
    run_id: str | None
    best_checkpoint: Path | None
    steps: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


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
        for key, value in aux.items():  # the loss's parts (its aux scalars) and ntokens
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


@dataclass
class RunState:
    """What the loop changes as it goes; it lands in every checkpoint's state.json."""

    step: int = 0
    epoch: int = 0
    run_id: str | None = None
    history: dict[str, list] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_eval: Evaluation | None = None  # the best evaluation: confusion matrix, predictions
    last_eval_step: int | None = None
    finished: bool = False
    window: LogWindow = field(default_factory=LogWindow)  # steps since the last logged line
    resumed_from: Path | None = None  # the run folder whose checkpoint was restored

    def restore(self, saved: CheckpointState, path: Path) -> None:
        """Continue from checkpoint `path`, whose state.json is `saved`."""
        self.step, self.epoch, self.run_id = saved.step, saved.epoch, saved.run_id
        self.history, self.best_metrics = saved.history, saved.best_metrics
        # what predictions/val_best.csv is written from: a run resumed after its best
        # evaluation evaluates no better one, and must still write it
        self.best_eval = Evaluation.from_state_dict(saved.best_eval)
        self.window.load_state_dict(saved.log_window)
        # <run dir>/checkpoints/step_N (or best): the killed run's folder, for its tracking files
        self.resumed_from = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
