"""MLX's BLAS under variants (library wheel x OpenBLAS kernels): GEMM rate at the default run's
and nano's shapes and square, whether a product's bits depend on B's layout, start-up (issue 39).

    python benchmarks/speed/bench_blas.py [--variants NAME:VAR=VALUE[;VAR=VALUE...],...]
                                    [--threads 2] [--repeats 3]

Each variant runs in its own fresh process (`--worker`), in rounds whose order reverses every
other round. A variant's assignments are its environment: MLXLAB_BLAS=<library file> picks the
library (runtime/blas.py finds its symbol prefix), OPENBLAS_CORETYPE=<core> the OpenBLAS kernels.
The default variants: the two OpenBLAS wheels mlxlab can give MLX (`ngsolve-openblas`,
`scipy-openblas32`), each with the kernels OpenBLAS picks on this CPU by itself and with its AVX2
kernels (`Haswell`, what runtime/blas.py pins on x86-64-v3 CPUs), plus MLX's own reference BLAS.

Columns: GFLOP/s (median of timed repeats, 2 m n k per product) for each shape, `B^T same bits`
(MLX's product with B given transposed (NT) equals the one with B copied (NN), bit for bit, for
the default run's attention scores: what the fused kernels' bitwise on/off claim needs), a hash of
a fixed set of products (equal hashes: the same bits), and start-up: `import mlxlab` in a fresh
process (MLX + the BLAS load and rebind), median over the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, cpu_model

# (m, k, n) of one product; batched (b, m, k, n) for the attention's.
SHAPES = {
    # the default run (BERT hidden 128, FFN 512, batch 32 x ~48 tokens): projections, FFN, the
    # weight gradients (k = tokens), the attention's per-head scores and values
    "bert qkv (1536x128x128)": (1536, 128, 128),
    "bert ffn up (1536x128x512)": (1536, 128, 512),
    "bert ffn down (1536x512x128)": (1536, 512, 128),
    "bert dW (128x1536x512)": (128, 1536, 512),
    "bert scores (128 x 48x32x48)": (128, 48, 32, 48),
    # nano (dim 256, hidden 704, vocab ~3.8k, 16 x 128 tokens)
    "nano ffn (2048x256x704)": (2048, 256, 704),
    "nano head (2048x256x3776)": (2048, 256, 3776),
    "square 1024": (1024, 1024, 1024),
    "square 2048": (2048, 2048, 2048),
}


def _library(package: str, pattern: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    found = sorted(Path(spec.submodule_search_locations[0]).rglob(pattern))
    return str(found[0]) if found else ""


def default_variants() -> str:
    ngsolve = _library("ngsolve_openblas", "libopenblas*.so*")
    scipy = _library("scipy_openblas32", "libscipy_openblas*.so*")
    variants = ["reference:MLXLAB_BLAS=off"]
    for name, path, own in (("ngsolve", ngsolve, "Cooperlake"), ("scipy", scipy, "SkylakeX")):
        if path:
            variants += [f"{name}/{own}:MLXLAB_BLAS={path};OPENBLAS_CORETYPE={own}",
                         f"{name}/Haswell:MLXLAB_BLAS={path};OPENBLAS_CORETYPE=Haswell"]
    return ",".join(variants)


def worker(repeats: int, skip_big: bool) -> dict:
    started = time.perf_counter()
    import mlxlab

    startup = time.perf_counter() - started
    import mlx.core as mx
    import numpy as np

    out = {"startup_s": startup, "blas": mlxlab.blas.detail or mlxlab.blas.status, "gflops": {}}
    mx.random.seed(0)
    for name, shape in SHAPES.items():
        if skip_big and "square 2048" in name:
            continue
        *batch, m, k, n = shape
        a, b = mx.random.normal((*batch, m, k)), mx.random.normal((*batch, k, n))
        mx.eval(a, b, a @ b)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - t)
        flops = 2 * m * n * k * (batch[0] if batch else 1)
        out["gflops"][name] = flops / statistics.median(times) / 1e9
    # The attention scores as the two paths make them: k's heads copied contiguous (its
    # transpose goes to BLAS as B^T) or a strided view (MLX copies it: B as it is).
    out["nt_equals_nn"] = True
    for tokens in (32, 48):  # 32: where OpenBLAS's AVX-512 kernels differ (issue 39)
        q = mx.random.normal((32, tokens, 4, 32)).transpose(0, 2, 1, 3)
        k = mx.random.normal((32, tokens, 4, 32)).transpose(0, 2, 1, 3)
        nt = q @ mx.contiguous(k).swapaxes(-1, -2)
        nn = q @ k.swapaxes(-1, -2)
        out["nt_equals_nn"] &= bool(np.array_equal(np.array(nt), np.array(nn)))
    digest = hashlib.sha256()
    for m, k_, n in ((1536, 128, 512), (128, 1536, 512), (1000, 700, 300)):
        a, b = mx.random.normal((m, k_)), mx.random.normal((k_, n))
        digest.update(np.array(a @ b).tobytes())
    out["hash"] = digest.hexdigest()[:12]
    return out


def parse(variants: str) -> list[tuple[str, dict[str, str]]]:
    parsed = []
    for variant in variants.split(","):
        name, _, assignments = variant.partition(":")
        parsed.append((name, dict(a.split("=", 1) for a in assignments.split(";") if a)))
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=None, help="default: see the docstring")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="rounds (fresh processes)")
    parser.add_argument("--gemm-repeats", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # the shipped BLAS alone, one round, one GEMM each
        args.variants, args.repeats, args.gemm_repeats = "shipped:", 1, 1
    if args.worker:
        skip_big = os.environ.get("MLXLAB_BLAS") == "off"  # the reference BLAS: minutes
        print(json.dumps(worker(args.gemm_repeats, skip_big)))
        return
    variants = parse(args.variants or default_variants())
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for round_ in range(args.repeats):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for name, env in order:
            run_env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), **env}
            done = subprocess.run([sys.executable, __file__, "--worker", "--gemm-repeats",
                                   str(args.gemm_repeats)], env=run_env, capture_output=True,
                                  text=True, check=True)
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: {results[name][-1]['blas']}", file=sys.stderr)
    shapes = list(SHAPES)
    print(f"CPU: {cpu_model()}; {args.threads} BLAS thread(s); {args.repeats} rounds; "
          f"command: `python benchmarks/speed/bench_blas.py --threads {args.threads} "
          f"--repeats {args.repeats}`\n")
    print("| variant | " + " | ".join(shapes) + " | B^T same bits | bits hash | `import mlxlab` (s) |")
    print("|---|" + "---:|" * len(shapes) + "---|---|---:|")
    for name, runs in results.items():
        cells = []
        for shape in shapes:
            values = [r["gflops"][shape] for r in runs if shape in r["gflops"]]
            cells.append(f"{statistics.median(values):.1f}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) +
              f" | {'yes' if all(r['nt_equals_nn'] for r in runs) else 'no'}"
              f" | {runs[0]['hash']} | {statistics.median(r['startup_s'] for r in runs):.2f} |")
    print()
    for name, runs in results.items():
        print(f"- {name}: {runs[0]['blas']}")


if __name__ == "__main__":
    main()
