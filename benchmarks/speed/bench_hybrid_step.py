"""A gated-delta hybrid's LoRA step time beside a plain Qwen3 of the same width and depth: the
models benchmarks/memory/bench_hybrid_memory.py measures the memory of (built the same way, by
its `model_step`: mlxlab's mlx-lm decoder, the chunked rule, LoRA rank 8 on its targets, random
weights, batch 1), one loss + gradient at each --lengths, with grad_checkpoint where asked.

Each (family, length) runs in its own process (a model's compiled kernels and cache never help
the other), in --repeats rounds alternating the families' order (ABBA), so a slow spell of a
shared machine meets both alike; a process times --steps steps after one untimed warm-up step and
reports their median. The figure is the hybrid's median over the plain model's, per round.

    python benchmarks/speed/bench_hybrid_step.py --lengths 2048,4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*

from benchmarks.harness import add_options, in_round, print_table, write_record  # noqa: E402

PAIR = ("plain qwen3", "hybrid, chunked")


def worker(family: str, length: int, steps: int, checkpoint: bool) -> None:
    """One process: the family's step at `length`, a warm-up then `steps` timed; prints JSON."""
    import mlx.core as mx

    from benchmarks.memory.bench_hybrid_memory import FAMILIES, model_step

    step, _ = model_step(FAMILIES[family], length, checkpoint=checkpoint)
    mx.eval(step())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(step())
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(seconds), "all_s": seconds}))


def timed(family: str, length: int, steps: int, checkpoint: bool) -> float:
    done = subprocess.run([sys.executable, __file__, "--worker", family, "--length", str(length),
                           "--steps", str(steps), *(["--checkpoint"] if checkpoint else [])],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, repeats=3, lengths=("2048,4096", "tokens per step"),
                steps=(3, "timed steps per process", int))
    parser.add_argument("--checkpoint", action="store_true", help="grad_checkpoint on both")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.length, args.steps, args.checkpoint)
    if args.smoke:
        args.lengths, args.repeats, args.steps = "64", 1, 1
    lengths = [int(n) for n in args.lengths.split(",") if n]
    rounds: dict[int, list[dict[str, float]]] = {n: [] for n in lengths}
    for length in lengths:
        for r in range(args.repeats):
            row = {}
            for family in in_round(list(PAIR), r):
                row[family] = timed(family, length, args.steps, args.checkpoint)
            rounds[length].append(row)
            print(f"{length} round {r + 1}: " + "  ".join(f"{k} {v:.2f} s" for k, v in row.items()),
                  flush=True)

    def ratios(length: int) -> list[float]:
        return sorted(row[PAIR[1]] / row[PAIR[0]] for row in rounds[length])

    shown = {"head": ["tokens", "plain qwen3 s / step", "hybrid s / step", "hybrid / plain"],
             "rows": [[f"{n:,}", *(f"{statistics.median(r[f] for r in rounds[n]):.2f}" for f in PAIR),
                       f"{statistics.median(ratios(n)):.2f}x ({ratios(n)[0]:.2f}-{ratios(n)[-1]:.2f})"]
                      for n in lengths]}
    print_table(shown)
    longest = lengths[-1]
    write_record("hybrid-step", {"rounds": rounds, "table": shown, "steps": args.steps,
                                 "grad_checkpoint": args.checkpoint},
                 question="speed-mlx", reference="a plain qwen3 of the same width and depth",
                 ratio=round(statistics.median(ratios(longest)), 3), smoke=args.smoke,
                 summary=f"LoRA step time (loss + gradient), Qwen3.5-shaped hybrid over plain "
                         f"Qwen3, {longest:,} tokens (lower is better)")


if __name__ == "__main__":
    main()
