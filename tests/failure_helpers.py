"""A callback that makes a run fail the way MLX on CUDA fails when the GPU runs out of memory
(tests/test_failures.py). MLX's CPU backend cannot be made to raise it: a failed allocation there
is a segmentation fault (runtime/supervision/failures.py), so the GPU's behaviour is reproduced at the
point where the trainer meets it: a RuntimeError with MLX's message from inside a step, then,
with `hang`, a teardown that never returns (ml-explore/mlx#2821)."""

from __future__ import annotations

import threading
from pathlib import Path

from mlxlab.training.callbacks import Callback

# What MLX 0.32 on CUDA raised in mlx#2821 when memory ran out.
CUDA_OOM = "cudaMallocManaged failed: an illegal memory access was encountered."


class FailAt(Callback):
    """Fails at `step`; with `once` (a file), only in the first process to get there."""

    def __init__(self, step: int, hang: bool = False, message: str = CUDA_OOM,
                 once: str | None = None) -> None:
        self.step, self.hang, self.message, self.once = step, hang, message, once

    def on_step(self, step: int, logs: dict) -> None:
        if step == self.step:
            if self.once is not None:
                if Path(self.once).exists():
                    return
                Path(self.once).write_text("failed once")
            raise RuntimeError(self.message)

    def on_train_end(self) -> None:
        if self.hang:  # as MLX's buffers' destructors after the error: never returns
            threading.Event().wait()


class StallAt(Callback):
    """At `step`, the training thread stops the way a run stuck in MLX's thread pool does (a
    wait on a condition variable: no step, no CPU, no I/O), for ever; or with `busy_s`, it
    computes for that long without a step (a long evaluation), then goes on."""

    def __init__(self, step: int, busy_s: float | None = None) -> None:
        self.step, self.busy_s = step, busy_s

    def on_step(self, step: int, logs: dict) -> None:
        if step != self.step:
            return
        if self.busy_s is None:
            threading.Event().wait()
        import time

        end = time.process_time() + self.busy_s
        while time.process_time() < end:
            sum(i * i for i in range(10_000))
