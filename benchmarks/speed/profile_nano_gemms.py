"""The nano preset's training step, its matrix products one by one: each GEMM of the forward and
backward pass (projections, SwiGLU MLP, attention's batched products, the tied output head) at its
shape and operand layout, timed through MLX (mlxlab's OpenBLAS, the kernels this CPU runs),
through mlxlab's fused attention (its batched products as one `cblas_sgemm_batch_strided` call,
kernels.batched_matmul; the other products are MLX's) and through PyTorch (its own BLAS), each in
its own process, in rounds whose order alternates.

    python benchmarks/speed/profile_nano_gemms.py [--threads 2] [--rounds 2] [--repeats 7]

Prints one row per product: count per step, milliseconds each (the best of --repeats, median
over rounds) and per step on each side, and the totals: how much of a step's time is GEMM on
each side when set beside the step times of bench.py. nano: vocabulary 3,776, dim 256, 4 layers,
4 heads, SwiGLU hidden 704, batch 16 x 128 (benchmarks/speed/bench.py's `nano`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, cpu_model  # noqa: E402

TOKENS, DIM, HIDDEN, VOCAB, LAYERS, HEADS, SEQ = 2048, 256, 704, 3776, 4, 4, 128
BATCH_HEADS, HEAD_DIM = TOKENS // SEQ * HEADS, DIM // HEADS
# (name, count per step, A shape, B shape, layout): "nt" = a @ b.T (a Linear's forward, b its
# weight), "nn" = a @ b (the input's gradient), "tn" = a.T @ b (the weight's gradient);
# batched ones carry a leading (batch x heads) dimension.
PRODUCTS = [
    ("q/k/v/o forward", 4 * LAYERS, (TOKENS, DIM), (DIM, DIM), "nt"),
    ("q/k/v/o dX", 4 * LAYERS, (TOKENS, DIM), (DIM, DIM), "nn"),
    ("q/k/v/o dW", 4 * LAYERS, (TOKENS, DIM), (TOKENS, DIM), "tn"),
    ("gate/up forward", 2 * LAYERS, (TOKENS, DIM), (HIDDEN, DIM), "nt"),
    ("gate/up dX", 2 * LAYERS, (TOKENS, HIDDEN), (HIDDEN, DIM), "nn"),
    ("gate/up dW", 2 * LAYERS, (TOKENS, HIDDEN), (TOKENS, DIM), "tn"),
    ("down forward", LAYERS, (TOKENS, HIDDEN), (DIM, HIDDEN), "nt"),
    ("down dX", LAYERS, (TOKENS, DIM), (DIM, HIDDEN), "nn"),
    ("down dW", LAYERS, (TOKENS, DIM), (TOKENS, HIDDEN), "tn"),
    ("attention q k^T (and dP = dO v^T)", 2 * LAYERS,
     (BATCH_HEADS, SEQ, HEAD_DIM), (BATCH_HEADS, SEQ, HEAD_DIM), "nt"),
    ("attention p v (and dQ = dS k)", 2 * LAYERS,
     (BATCH_HEADS, SEQ, SEQ), (BATCH_HEADS, SEQ, HEAD_DIM), "nn"),
    ("attention dV = p^T dO (and dK)", 2 * LAYERS,
     (BATCH_HEADS, SEQ, SEQ), (BATCH_HEADS, SEQ, HEAD_DIM), "tn"),
    ("head forward (tied)", 1, (TOKENS, DIM), (VOCAB, DIM), "nt"),
    ("head dX", 1, (TOKENS, VOCAB), (VOCAB, DIM), "nn"),
    ("head dW", 1, (TOKENS, VOCAB), (TOKENS, DIM), "tn"),
]


SIDES = ("mlx", "mlxlab", "torch")


def flops(a: tuple, b: tuple, layout: str) -> float:
    """2 m n k of one product (times its batch)."""
    batch = a[0] if len(a) == 3 else 1
    a2, b2 = a[-2:], b[-2:]
    m, k = (a2[1], a2[0]) if layout == "tn" else a2
    n = b2[0] if layout == "nt" else b2[1]
    return 2.0 * batch * m * n * k


def worker(side: str, threads: int, repeats: int) -> dict:
    """Best-of-repeats seconds of each product on one side, in this process."""
    if side in ("mlx", "mlxlab"):
        import mlx.core as mx

        import mlxlab  # noqa: F401  gives MLX the fast BLAS
        from mlxlab.runtime.blas import mlx_sgemm_batch, set_blas_threads

        set_blas_threads(threads)
        ops = {"nt": lambda a, b: a @ b.swapaxes(-1, -2), "nn": lambda a, b: a @ b,
               "tn": lambda a, b: a.swapaxes(-1, -2) @ b}
        if side == "mlxlab" and mlx_sgemm_batch():
            from mlxlab.kernels.dispatch import extension

            module = extension()
            module.set_sgemm_batch(mlx_sgemm_batch())
            flags = {"nt": (False, True), "nn": (False, False), "tn": (True, False)}
            ops = {layout: (lambda op, ta, tb: lambda a, b: module.batched_matmul(a, b, ta, tb)
                            if a.ndim == 3 else op(a, b))(ops[layout], *flags[layout])
                   for layout in ops}

        def make(shape):
            return mx.random.normal(shape)

        def run(op, a, b):
            mx.eval(op(a, b))
        detail = mlxlab.blas.detail
    else:
        import torch

        torch.set_num_threads(threads)
        ops = {"nt": lambda a, b: a @ b.transpose(-1, -2), "nn": lambda a, b: a @ b,
               "tn": lambda a, b: a.transpose(-1, -2) @ b}

        def make(shape):
            return torch.randn(shape)

        def run(op, a, b):
            op(a, b)
        detail = f"PyTorch {torch.__version__}"
    seconds = {}
    for name, _, a_shape, b_shape, layout in PRODUCTS:
        a, b, op = make(a_shape), make(b_shape), ops[layout]
        run(op, a, b)  # warm
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(op, a, b)
            best = min(best, time.perf_counter() - start)
        seconds[name] = best
    return {"side": side, "seconds": seconds, "detail": detail}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.repeats)))
        return {}
    if args.smoke:
        args.rounds, args.repeats = 1, 1
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            out = subprocess.run([sys.executable, __file__, "--worker", side, "--threads",
                                  str(args.threads), "--repeats", str(args.repeats)],
                                 env=env, capture_output=True, text=True, check=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {side: {name: statistics.median(r["seconds"][name] for r in runs[side])
                  for name, *_ in PRODUCTS} for side in runs}
    print(f"CPU: {cpu_model()}; {args.threads} thread(s); {args.rounds} round(s), best of "
          f"{args.repeats}; MLX: {runs['mlx'][0]['detail']}; {runs['torch'][0]['detail']}\n")
    print("| product | per step | shape (A, B, layout) | MLX ms | mlxlab ms | PyTorch ms | "
          "MLX GFLOP/s | mlxlab GFLOP/s | PyTorch GFLOP/s | MLX ms/step | mlxlab ms/step | "
          "PyTorch ms/step |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = dict.fromkeys(SIDES, 0.0)
    for name, count, a, b, layout in PRODUCTS:
        f = flops(a, b, layout)
        t = {side: med[side][name] for side in SIDES}
        for side in SIDES:
            totals[side] += count * t[side]
        print(f"| {name} | {count} | {a} x {b} {layout} | "
              + " | ".join(f"{t[side] * 1e3:.2f}" for side in SIDES) + " | "
              + " | ".join(f"{f / t[side] / 1e9:.0f}" for side in SIDES) + " | "
              + " | ".join(f"{count * t[side] * 1e3:.1f}" for side in SIDES) + " |")
    print("| **all GEMMs of a step** | | | | | | | | | "
          + " | ".join(f"**{totals[side] * 1e3:.1f}**" for side in SIDES) + " |")
    return {"cpu": cpu_model(), "threads": args.threads, "median_s": med,
            "gemm_ms_per_step": {k: v * 1e3 for k, v in totals.items()}}


if __name__ == "__main__":
    main()
