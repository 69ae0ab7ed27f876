"""The callbacks benchmark workers add to a real run through its config (nothing in the Trainer
is patched): StepClock (OVERRIDE) records into RECORD (the clock at the start and after every
step, the steps that evaluated, the run's TrainContext and model) and calls the worker's HOOKS;
StepTimes appends the clock to a file, for a run started as its own process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# isort: off
import mlxlab  # noqa: F401  (first: loads the fast BLAS before anything imports mlx.core)
from mlxlab.training.callbacks import Callback

# isort: on

RECORD: dict[str, Any] = {"times": [], "evals": [], "context": None, "model": None,
                          "clock": time.perf_counter}
HOOKS: dict[str, Callable] = {}  # "on_step": f(step), "on_eval": f(step, metrics)

OVERRIDE = "+callbacks.bench_clock={_target_:benchmarks.callbacks.StepClock}"


class StepClock(Callback):
    def setup(self, context: Any, model: Any, data: Any) -> None:
        RECORD["context"], RECORD["model"] = context, model

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        RECORD["times"].append(RECORD["clock"]())

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        RECORD["times"].append(RECORD["clock"]())
        if "on_step" in HOOKS:
            HOOKS["on_step"](step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        RECORD["evals"].append(step)
        if "on_eval" in HOOKS:
            HOOKS["on_eval"](step, metrics)


class StepTimes(Callback):
    """time.perf_counter() at the start and after every step, a line each, appended to `path`
    (`+callbacks.step_times={_target_:benchmarks.callbacks.StepTimes,path:FILE}`)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def _stamp(self) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.perf_counter()!r}\n")

    def on_train_start(self, total_steps: int | None, start_step: int) -> None:
        self._stamp()

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self._stamp()
