"""Memory as the run goes: MLX's counters and the process's resident size in the tracker, and
each step's number for a supervising parent.

MLflow's own system metrics read NVIDIA's and AMD's GPUs, not MLX's memory, so `SystemMemory`
logs it with every logged step under `system/`: MLX's active, peak and cache memory
(mx.get_active_memory, get_peak_memory, get_cache_memory) and the process's resident set size
(psutil), in MiB; at the end, the run's peaks as summary metrics (`system/peak_mb`: MLX's, since
the micro-batch search reset it; `system/peak_rss_mb`: the process's). `StepMark` writes each
optimizer step where mlxlab-train's parent can read it after a crash (runtime/supervision/supervise.py).
Both are added to every run by train.py.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import mlx.core as mx
import psutil

from mlxlab.runtime.supervision import supervise
from mlxlab.training.callbacks import Callback
from mlxlab.training.state import TrainContext

MB = 2**20


def memory_now() -> dict[str, float]:
    """MLX's active, peak and cache memory and the process's resident size, in MiB."""
    return {
        "system/mlx_active_mb": mx.get_active_memory() / MB,
        "system/mlx_peak_mb": mx.get_peak_memory() / MB,
        "system/mlx_cache_mb": mx.get_cache_memory() / MB,
        "system/rss_mb": psutil.Process().memory_info().rss / MB,
    }


def peak_rss_mb() -> float:
    """The process's largest resident size so far (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024)


class SystemMemory(Callback):
    """`system/` memory metrics with every logged step, and the run's peaks at its end."""

    name = "system_memory"

    def __init__(self) -> None:
        self.tracker: Any = None
        self.step = 0
        self.peak_mb = 0.0
        self.peak_rss = 0.0  # of the logged samples: the kernel's own high-water mark
        # (getrusage) is kept from counters it syncs lazily, and can read below a later sample

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        self.tracker = context.tracker

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.step = step
        if logs:  # a logged step: the loop logs `logs` right after
            now = memory_now()
            self.peak_mb = max(self.peak_mb, now["system/mlx_peak_mb"])
            self.peak_rss = max(self.peak_rss, now["system/rss_mb"])
            logs.update(now)

    def on_train_end(self) -> None:
        if self.tracker is None or not self.step:
            return
        peak = max(self.peak_mb, mx.get_peak_memory() / MB)
        self.tracker.log_metrics({"system/peak_mb": peak,
                                  "system/peak_rss_mb": max(self.peak_rss, peak_rss_mb())},
                                 self.step)


class StepMark(Callback):
    """Each optimizer step, for a supervising parent: how many steps a crash loses."""

    name = "step_mark"

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        supervise.mark_step(step)
