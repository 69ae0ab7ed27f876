"""The default experiment's mlxlab rows under environment variants, interleaved (issue 24).

    python benchmarks/bench_env.py --variants "28:OPENBLAS_THREAD_TIMEOUT=28,4:OPENBLAS_THREAD_TIMEOUT=4"
        [--epochs 8] [--repeats 3]

Each variant (`name:VAR=VALUE[;VAR=VALUE...]`, an empty assignment list for the environment as
it is) runs the `readme` and `bare` rows of bench_default_run.py (fresh folder and process each,
timed from outside, first epoch and training loop from the run's log) in rounds whose order
reverses every other round, so a slow spell of a shared machine hits every variant alike. Prints
each run as it ends and then each row's medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench_common import cpu_model
from bench_default_run import BARE, interleave, run_mlxlab


def parse(variants: str) -> list[tuple[str, dict[str, str]]]:
    parsed = []
    for variant in variants.split(","):
        name, _, assignments = variant.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(";") if a)
        parsed.append((name, env))
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    epochs = [f"trainer.max_epochs={args.epochs}"]
    with tempfile.TemporaryDirectory() as tmp:
        def row(env: dict[str, str], extra: list[str]) -> Callable[[], dict]:
            return lambda: run_mlxlab(extra, Path(tmp), env={**os.environ, **env})

        rows = {f"{name}/{kind}": row(env, epochs + (BARE if kind == "bare" else []))
                for name, env in parse(args.variants) for kind in ("readme", "bare")}
        results = interleave(rows, args.repeats)
    print(f"\nCPU: {cpu_model()}; {args.repeats} rounds; {args.epochs} epochs; medians")
    print("| row | wall (s) | training loop (s) | first epoch (s) |\n|---|---:|---:|---:|")
    for key, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "loop_s", "first_epoch_s")}
        print(f"| {key} | {med['wall_s']:.2f} | {med['loop_s']:.2f} | {med['first_epoch_s']:.2f} |")


if __name__ == "__main__":
    main()
