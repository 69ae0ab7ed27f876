"""A callback that makes a run fail the way MLX on CUDA fails when the GPU runs out of memory
(tests/test_failures.py). MLX's CPU backend cannot be made to raise it: a failed allocation there
is a segmentation fault (runtime/failures.py), so the GPU's behaviour is reproduced at the
point where the trainer meets it: a RuntimeError with MLX's message from inside a step, then,
with `hang`, a teardown that never returns (ml-explore/mlx#2821)."""

from __future__ import annotations

import threading

from mlxlab.training.callbacks import Callback

# What MLX 0.32 on CUDA raised in mlx#2821 when memory ran out.
CUDA_OOM = "cudaMallocManaged failed: an illegal memory access was encountered."


class FailAt(Callback):
    def __init__(self, step: int, hang: bool = False, message: str = CUDA_OOM) -> None:
        self.step, self.hang, self.message = step, hang, message

    def on_step(self, step: int, logs: dict) -> None:
        if step == self.step:
            raise RuntimeError(self.message)

    def on_train_end(self) -> None:
        if self.hang:  # as MLX's buffers' destructors after the error: never returns
            threading.Event().wait()
