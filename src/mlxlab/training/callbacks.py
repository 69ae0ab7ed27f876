"""Small hooks the one training loop calls: progress, early stopping, memory.

A callback overrides only what it needs. State that must survive a resume goes through
`state_dict()` / `load_state_dict()` and lands in the checkpoint's state.json.
"""

from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm

from mlxlab.runtime import device
from mlxlab.training.metrics import is_better


class Callback:
    should_stop: bool = False

    def on_train_start(self, total_steps: int | None, start_step: int) -> None: ...

    def on_step(self, step: int, logs: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class ProgressBar(Callback):
    """tqdm bar with rate and ETA; shows the latest train loss and validation metric."""

    def __init__(self, enabled: bool = True, unit: str = "step") -> None:
        self.enabled = enabled
        self.unit = unit
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=total_steps, initial=start_step, unit=self.unit, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5, desc="train",
            )

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.bar is None:
            return
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
            raise ValueError(f"early_stopping.mode must be 'max' or 'min', got {mode!r}")
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

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "should_stop": self.should_stop}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.bad_evals = state.get("bad_evals", 0)
        self.should_stop = state.get("should_stop", False)


class MemoryMonitor(Callback):
    """Adds active/peak memory (MB) to the logged metrics every `every` steps."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if self.every and step % self.every == 0:
            logs["memory/active_mb"] = device.active_memory_mb()
            logs["memory/peak_mb"] = device.peak_memory_mb()
