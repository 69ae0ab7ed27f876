"""Flush-to-zero and denormals-are-zero on the thread that runs MLX's CPU ops (csrc/fp_mode.cpp).

Why: an x86 core runs each multiply-add that reads or makes a denormal float (below 1.2e-38)
through a microcode assist, ~100x its cost (an OpenBLAS sgemm on inputs of 1e-36 took 86x as
long here). A LoRA step on a Llama with peaked attention makes them: probabilities of ~1e-30
times the backward's small cotangents (a loss averaged over thousands of tokens) give
denormal score gradients, and the products that read them made the backward cost 5x the
forward instead of 2x (docs/benchmarks.md, LoRA). TensorFlow's CPU threads flush denormals by
default; PyTorch has torch.set_flush_denormal. What it changes: values below 1.2e-38 become 0,
in every op on that thread (MLX's, the BLAS's on its calling thread, the fused kernels'). A
product the BLAS splits over worker threads of its own (MKL's OpenMP pool, OpenBLAS's) keeps
denormals in the workers' parts: their mode is their own.
"""

from __future__ import annotations

import mlx.core as mx

from mlxlab.kernels.dispatch import extension


def flush_denormals(on: bool) -> bool | None:
    """Set (on) or clear the mode on MLX's CPU stream thread; returns whether it was on before
    (to restore it), or None where the kernels' extension is unavailable (nothing changed).
    Process-wide, as trainer.fused_kernels: every later op on MLX's default CPU stream sees it."""
    module = extension()
    if module is None:
        return None
    before = module.flush_denormals(bool(on))
    mx.eval(before)
    return bool(before.item())
