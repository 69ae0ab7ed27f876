"""bf16 products on a CPU with bf16 units: mlxlab's (MKL's cblas_gemm_bf16bf16f32 on float32
operands rounded to bf16, as trainer.precision=bf16 runs them) beside MLX's own bf16 matmul (a
scalar loop, ~4 GFLOP/s: up to 512 only), MLX's fp32 and PyTorch's bf16 and fp32 matmul (its own
process, without mlxlab). n x n x n GFLOP/s, best of --repeats per round, median of interleaved
rounds. `python benchmarks/speed/bench_bf16.py --threads 2`"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_options, in_round, print_table, write_record

# One process's rows {name: {n: GFLOP/s}}; PyTorch's bf16 row multiplies bf16 tensors made before.
WORKER = """import json, sys, time
kind, sizes, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
if kind == "mlx":
    import mlxlab, mlx.core as mx
    from mlxlab import kernels
    rows = {"mlxlab bf16": (None, kernels.bf16_matmul), "MLX fp32": (None, mx.matmul),
            "MLX bf16": (lambda x: x.astype(mx.bfloat16), mx.matmul)}
    make, run = (lambda n: mx.random.normal((n, n))), (lambda f, a, b: mx.eval(f(a, b)))
else:
    import torch
    torch.set_num_threads(int(sys.argv[4]))
    rows = {"PyTorch bf16": (torch.Tensor.bfloat16, torch.matmul), "PyTorch fp32": (None, torch.matmul)}
    make, run = (lambda n: torch.randn(n, n)), (lambda f, a, b: f(a, b))
out = {}
for name, (prepare, f) in rows.items():
    for n in sizes:
        a, b = (x if prepare is None else prepare(x) for x in (make(n), make(n)))
        if name == "MLX bf16" and n > 512 or name == "mlxlab bf16" and f(a, b) is None:
            continue  # MLX's loop: too slow; mlxlab's: no bf16 units or no MKL here
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            run(f, a, b)
            times.append(time.perf_counter() - start)
        out.setdefault(name, {})[n] = 2 * n**3 / min(times[1:]) / 1e9
print(json.dumps(out))"""
THREADS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "MLXLAB_KERNEL_THREADS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, sizes=("64,128,256,512,1024,2048", "n of the n x n x n products"),
                threads=(os.cpu_count() or 1, "threads of every library", int),
                repeats=(10, "products timed per size and round (best kept)", int),
                rounds=(5, "interleaved rounds of the two processes (median kept)", int))
    args = parser.parse_args()
    sizes = [64] if args.smoke else [int(n) for n in args.sizes.split(",")]
    repeats, rounds = (2, 1) if args.smoke else (args.repeats, args.rounds)
    env = {**os.environ, **dict.fromkeys(THREADS, str(args.threads))}
    runs: dict[str, list[dict]] = {"mlx": [], "torch": []}
    for r in range(rounds):
        for kind in in_round(list(runs), r):
            proc = subprocess.run([sys.executable, "-c", WORKER, kind, json.dumps(sizes),
                                   str(repeats), str(args.threads)], env=env, capture_output=True,
                                  text=True, timeout=1800, check=True)
            runs[kind].append(json.loads(proc.stdout.splitlines()[-1]))
    names = [name for rows in runs.values() for name in rows[0]]
    cell = lambda name, n: [row[name][str(n)] for rows in runs.values() for row in rows  # noqa: E731
                            if str(n) in row.get(name, {})]
    table = {"head": ["n (GFLOP/s)", *names],
             "rows": [[n, *(f"{statistics.median(cell(m, n)):.0f}" if cell(m, n) else "-"
                            for m in names)] for n in sizes]}
    print_table(table)
    write_record("gemm-bf16", {"threads": args.threads, "sizes": sizes, "rounds": runs,
                               "table": table}, question="speed-pytorch", smoke=args.smoke)


if __name__ == "__main__":
    main()
