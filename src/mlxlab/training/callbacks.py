"""Small hooks the one training loop calls: progress, eval lines, early stopping, memory.

They are config nodes (`conf/callbacks/default.yaml`, a dict of named `_target_` nodes as in
lightning-hydra-template); train.py instantiates them and hands the list to the Trainer. Add your
own from the command line: `+callbacks.mine={_target_: my_pkg.MyCallback, every: 10}`.
When the loop checkpoints is no callback: it is the `checkpoint` group (conf/checkpoint/), a
settings record the loop reads (settings.py `CheckpointPolicy`).

A callback overrides only what it needs. State that must survive a resume goes through
`state_dict()` / `load_state_dict()` and lands in the checkpoint's state.json.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

from tqdm.auto import tqdm

from mlxlab.checkpoint import choose_best, is_better
from mlxlab.errors import ConfigError
from mlxlab.objectives.base import Evaluation
from mlxlab.runtime.compute import device
from mlxlab.training.settings import CheckpointPolicy
from mlxlab.training.state import TrainContext

log = logging.getLogger("mlxlab.training")


def epoch_of(step: int, steps_per_epoch: int | None) -> int | None:
    """The (1-based) epoch a step belongs to, None when the data has no known length."""
    return math.ceil(step / steps_per_epoch) if steps_per_epoch and step > 0 else None


class Callback:
    should_stop: bool = False
    # True: the loss adds each example's loss to the step's outputs (see on_batch_outputs)
    needs_example_losses: bool = False
    # Its key in the `callbacks` config (train.py sets it): its state's key in checkpoints, so
    # two callbacks of one class keep two states. Built in code: the class name.
    name: str | None = None

    @property
    def state_key(self) -> str:
        return self.name or type(self).__name__

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        """Once per fit, after any checkpoint is restored (load_state_dict) and before the first
        step: read what the run is (context.steps_per_epoch, max_epochs, world, monitor, ...)
        and where it goes (context.tracker, context.run_dir)."""

    def on_train_start(self, total_steps: int | None, start_step: int) -> None: ...

    def on_batch_outputs(self, step: int, batches: list, outputs: dict) -> None:
        """After step `step`: its micro-batches and per-example outputs (aux's `example_*`,
        evaluated arrays, rows in the order of the batches); only if needs_example_losses."""

    def on_compiled(self, step: int, seconds: float) -> None:
        """Step `step` (the first of a process, or after the step was rebuilt) compiled the
        step function, and on a GPU maybe MLX's kernels: `seconds` that are not a step's time.
        Called before on_step."""

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_evaluation(self, step: int, evaluation: Evaluation, best: bool) -> None:
        """After on_eval: the objective's whole Evaluation at `step` (the per-example task
        scores it carries, objectives/base.py) and whether it is the run's best so far."""

    def on_train_end(self) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class ProgressBar(Callback):
    """tqdm bar with rate and ETA; shows the latest train loss and validation metric."""

    def __init__(
        self, enabled: bool = True, unit: str = "step", steps_per_epoch: int | None = None,
        max_epochs: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.unit = unit
        self.steps_per_epoch, self.max_epochs = steps_per_epoch, max_epochs
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}
        self._shown = enabled

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        self.steps_per_epoch, self.max_epochs = context.steps_per_epoch, context.max_epochs
        self.enabled = self._shown and context.world.is_main  # only rank 0 prints

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit=self.unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, desc="train",
            )

    def on_compiled(self, step: int, seconds: float) -> None:
        # The compile's minutes are not a step's time: the bar's clock skips them (tqdm's pause),
        # so its rate never reads "184 s/step" and its ETA counts steps that run.
        if self.bar is not None:
            self.bar.unpause()
            if seconds >= 5:  # a GPU's first run: say where the wait went
                self.postfix["compiled"] = f"{seconds:.0f}s"

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.bar is None:
            return
        epoch = epoch_of(step, self.steps_per_epoch)
        if epoch is not None:
            total = f"/{self.max_epochs}" if self.max_epochs and math.isfinite(self.max_epochs) else ""
            others = {k: v for k, v in self.postfix.items() if k != "epoch"}
            self.postfix = {"epoch": f"{epoch}{total}", **others}  # the epoch shown first
        if "train/loss" in logs:
            self.postfix["loss"] = f"{logs['train/loss']:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        for key in ("val/accuracy", "val/loss"):
            if key in metrics:
                self.postfix[key.split("/")[1]] = f"{metrics[key]:.4f}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by `min_delta` for `patience` evaluations."""

    def __init__(self, monitor: str, mode: str = "max", patience: int = 5, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ConfigError(f"callbacks.early_stopping.mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is None or math.isnan(value):
            return
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
            if self.patience > 0 and self.bad_evals >= self.patience:
                self.should_stop = True
                log.info(
                    "early stopping at step %d: %s has not improved on %.4f by more than %g for "
                    "%d evaluations (callbacks.early_stopping.patience)", step, self.monitor,
                    self.best, self.min_delta, self.bad_evals,
                )

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.bad_evals = state.get("bad_evals", 0)
        self.should_stop = state.get("should_stop", False)


class MemoryMonitor(Callback):
    """Adds active/peak memory (MB) to the logged metrics every `every` steps (0: never)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.every and step % self.every == 0:
            logs["memory/active_mb"] = device.active_memory_mb()
            logs["memory/peak_mb"] = device.peak_memory_mb()


class EvalLog(Callback):
    """One log line per evaluation (step, epoch, metrics, best so far), so a run without a
    progress bar (batch jobs, debug=fast, callbacks.progress.enabled=false) still shows how it
    goes. monitor/mode default to the trainer's (optimized_metric)."""

    def __init__(self, monitor: str | None = None, mode: str | None = None,
                 steps_per_epoch: int | None = None, max_epochs: float | None = None) -> None:
        self.monitor, self.mode = monitor, mode
        self.steps_per_epoch, self.max_epochs = steps_per_epoch, max_epochs
        self.total: int | None = None
        self.best_metrics: dict[str, float] = {}  # the best evaluation's, as the loop picks it
        self.tie_break: tuple[str, str] | None = None

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        self.monitor = self.monitor or context.monitor
        self.mode = self.mode or context.monitor_mode
        self.tie_break = context.tie_break
        self.steps_per_epoch, self.max_epochs = context.steps_per_epoch, context.max_epochs

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        self.total = total_steps
        epochs = ""
        if self.steps_per_epoch and self.max_epochs and math.isfinite(self.max_epochs):
            epochs = f" ({self.max_epochs} epochs of {self.steps_per_epoch} steps)"
        start = f", from step {start_step}" if start_step else ""
        log.info("training: %s steps%s%s", total_steps, epochs, start)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        # the loop's rule (a tie on the monitor broken by the objective's loss): the line names its best
        if choose_best(metrics, self.best_metrics, self.monitor, self.mode or "max", step,
                       self.tie_break).better:
            self.best_metrics = {**metrics, "best_step": float(step)}
        epoch = epoch_of(step, self.steps_per_epoch)
        where = f"step {step}" + (f"/{self.total}" if self.total else "")
        if epoch is not None:
            where += f" epoch {epoch}"
            if self.max_epochs and math.isfinite(self.max_epochs):
                where += f"/{self.max_epochs}"
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        best = ""
        if self.monitor in self.best_metrics:
            best = (f"  | best {self.monitor} {self.best_metrics[self.monitor]:.4f} "
                    f"(step {int(self.best_metrics['best_step'])})")
        log.info("%s  %s%s", where, shown, best)

    def state_dict(self) -> dict:
        return {"best_metrics": self.best_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.best_metrics = dict(state.get("best_metrics") or {})


def from_config(nodes: Mapping[str, Any] | None, build: Callable[[Any], Any],
                checkpoint: Any = None) -> tuple[list[Callback], CheckpointPolicy]:
    """The `callbacks` group's named `_target_` nodes, each made by `build` (config.instantiate),
    in config order (None entries, as left by `callbacks.x=null`, are skipped), and the
    checkpoint policy `checkpoint` (the `checkpoint` group's node) builds: its defaults when
    None."""
    built = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        callback = build(node)
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name} built a {type(callback).__name__}, not a "
                              "mlxlab.training.callbacks.Callback: subclass it")
        callback.name = name  # its state's key in checkpoints
        built.append(callback)
    return built, build(checkpoint) if checkpoint is not None else CheckpointPolicy()
