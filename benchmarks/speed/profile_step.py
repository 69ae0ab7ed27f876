"""Time the compiled nano training step (bench.py's `nano`: batch 16 x 128, vocabulary 3,776; the
trainer's own step: AdamW with bias correction under a warmup-cosine schedule, gradient
clipping) with mlxlab's fused CPU kernels on, off, or on with some of them left to MLX: each
variant is built in this one process and timed a step at a time in rotation, so a busy machine
slows them alike (issue 12, docs/benchmarks-history.md):

    python benchmarks/speed/profile_step.py off,on-rms_norm+rope+adamw,on --threads 2 --rounds 20

A variant is `off`, `on`, or `on-OP+OP` (those ops through MLX; OPs as in
$MLXLAB_FUSED_KERNELS_SKIP). MLXLAB_MALLOC=default leaves glibc returning freed memory (as
before runtime/memory.py). Under `perf`, the first variant then runs --steps more steps alone:

    perf record -F 499 -o perf-on.data python benchmarks/speed/profile_step.py on --steps 20
    perf report -i perf-on.data --sort dso --stdio
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx

# isort: on
from mlxlab import kernels
from mlxlab.models.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.runtime.blas import set_blas_threads
from mlxlab.runtime.memory import keep_freed_memory
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402


def build_step(variant: str, threads: int, batch: dict):
    """The trainer's compiled step for one variant, compiled and warmed up."""
    mode, _, skip = variant.partition("-")
    kernels.set_mode(mode)
    kernels.set_skip(skip.split("+"))  # read while the step is traced (first call)
    if mode != "off":
        kernels.set_threads(threads)
    mx.random.seed(1)
    model = Transformer(vocab_size=3776, dim=256, num_layers=4, num_heads=4, max_seq_len=128)
    settings = TrainerSettings(max_steps=300, fused_kernels=mode)
    optimizer = build_optimizer(partial(default_optimizer(), learning_rate=1e-3), settings.schedule,
                                total_steps=300)
    optimizer.init(model.trainable_parameters())
    step = make_step(model, optimizer, losses.task_loss("lm"), settings)
    for _ in range(2):  # compile + warm-up
        loss = step([batch])[0]
    print(f"{variant}: loss after 2 steps {loss.item():.6f}", flush=True)
    return step


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="?", help="comma-separated: off, on, on-OP+OP")
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS and kernel threads")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--steps", type=int, default=0, help="then this many steps of the first")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # the kernels off and on, one step each
        args.variants, args.rounds, args.steps = "off,on", 1, 1
    if not args.variants:
        parser.error("the following arguments are required: variants")
    set_blas_threads(args.threads)
    keep_freed_memory()  # as the loop does (MLXLAB_MALLOC=default: glibc's own behaviour)
    ids = mx.random.randint(0, 3776, (16, 129))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((16, 128))}
    variants = args.variants.split(",")
    steps = {v: build_step(v, args.threads, batch) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[v]([batch])
            times[v].append(time.perf_counter() - start)
            cpu[v].append(time.process_time() - start_cpu)
    if args.rounds:
        # Wall time, and the process's CPU time (user + system, all threads): on a shared
        # machine at 1 thread the CPU time is what the step costs, whoever else runs.
        base = {q: quantile(times[variants[0]], q) for q in (0.0, 0.5)}
        base_cpu = quantile(cpu[variants[0]], 0.5)
        for v in variants:
            t = {q: quantile(times[v], q) for q in (0.0, 0.5)}
            c = quantile(cpu[v], 0.5)
            print(f"{v:<30} ms/step wall min {t[0.0] * 1e3:6.1f} median {t[0.5] * 1e3:6.1f}, "
                  f"CPU median {c * 1e3:6.1f} | {variants[0]}/this: wall min {base[0.0] / t[0.0]:.3f} "
                  f"median {base[0.5] / t[0.5]:.3f}, CPU {base_cpu / c:.3f}")
    if args.steps:
        start = time.perf_counter()
        for _ in range(args.steps):
            steps[variants[0]]([batch])
        print(f"{variants[0]}: {(time.perf_counter() - start) / args.steps * 1e3:.1f} ms/step "
              f"over {args.steps} steps")


if __name__ == "__main__":
    main()
