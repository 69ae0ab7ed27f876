"""The default experiment's (or the nano LM's) mlxlab rows under environment variants,
interleaved, optionally beside their PyTorch twin (issues 24, 39).

    python benchmarks/speed/bench_env.py --variants "28:OPENBLAS_THREAD_TIMEOUT=28,4:OPENBLAS_THREAD_TIMEOUT=4"
        [--epochs 8] [--repeats 3] [--rows readme,bare] [--twin] [--nano STEPS] [--threads N]

Each variant (`name:VAR=VALUE[;VAR=VALUE...]`, an empty assignment list for the environment as
it is) runs the `readme` and `bare` rows of bench_default_run.py (fresh folder and process each,
timed from outside, first epoch and training loop from the run's log) in rounds whose order
reverses every other round, so a slow spell of a shared machine hits every variant alike. Prints
each run as it ends and then each row's medians. A variant can be another checkout's code
(`PYTHONPATH=<its src>;MLXLAB_KERNELS_CACHE=<its own cache>`: the before/after of a change).

--twin adds the PyTorch twin in the same rounds: the default run's (torch_bert_run.py, the run's
own batches) or, with --nano, benchmarks/speed/torch_plain.py at nano's shapes for the same steps;
each row's wall is then also given per round as a ratio to the twin's. --nano STEPS times
`experiment=tinystories_nano trainer.max_steps=STEPS` instead of the default run (the training
loop: its log's first line to its last step). --threads sets OPENBLAS_NUM_THREADS,
MLXLAB_KERNEL_THREADS and the twin's torch threads (default: the cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, cpu_model
from benchmarks.speed.bench_default_run import (
    BARE,
    HERE,
    TRAINING_LINE,
    interleave,
    run_mlxlab,
    run_twin,
    stamp,
    timed,
)

STEP_LINE = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[mlxlab\.training\]\[INFO\] - step (\d+)/")
NANO = {"vocab": 3776, "dim": 256, "layers": 4, "heads": 4, "batch": 16, "seq": 128}  # the preset


def parse(variants: str) -> list[tuple[str, dict[str, str]]]:
    parsed = []
    for variant in variants.split(","):
        name, _, assignments = variant.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(";") if a)
        parsed.append((name, env))
    return parsed


def run_nano(extra: list[str], tmp: Path, env: dict[str, str]) -> dict:
    """`mlxlab-train experiment=tinystories_nano *extra` in a fresh folder, timed from outside;
    the training loop from its log (first line to the last step's)."""
    folder = Path(tempfile.mkdtemp(dir=tmp))
    cmd = [str(Path(sys.executable).with_name("mlxlab-train")), "experiment=tinystories_nano", *extra]
    done, wall, cpu = timed(cmd, cwd=folder, env=env)
    lines = (done.stdout + done.stderr).splitlines()
    begin = next(stamp(m.group(1)) for m in map(TRAINING_LINE.match, lines) if m)
    last = [m for m in map(STEP_LINE.match, lines) if m][-1]
    return {"wall_s": wall, "cpu_s": cpu, "loop_s": stamp(last.group(1)) - begin,
            "first_epoch_s": math.nan,
            "best_accuracy": math.nan, "last_accuracy": math.nan}


def run_plain_twin(steps: int, threads: int) -> dict:
    """benchmarks/speed/torch_plain.py at nano's shapes for `steps` steps, timed from outside."""
    cmd = [sys.executable, str(HERE / "torch_plain.py"), *(f"--{k}={v}" for k, v in NANO.items()),
           f"--steps={steps}", f"--threads={threads}"]
    done, wall, cpu = timed(cmd)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": cpu, "loop_s": sum(res["step_s"]), "first_epoch_s": math.nan,
            "best_accuracy": math.nan, "last_accuracy": math.nan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="readme,bare", help="readme, bare or both")
    parser.add_argument("--twin", action="store_true", help="add the PyTorch twin's row")
    parser.add_argument("--nano", type=int, metavar="STEPS", help="the nano LM for STEPS steps")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one variant, the bare nano row and its twin, 2 steps, one round
        args.variants, args.rows, args.twin, args.nano, args.repeats = "base:", "bare", True, 2, 1
    if not args.variants:
        parser.error("--variants is required")
    threads = {"OPENBLAS_NUM_THREADS": str(args.threads), "MLXLAB_KERNEL_THREADS": str(args.threads)}
    if args.nano:
        extra = [f"trainer.max_steps={args.nano}", f"trainer.eval_every_steps={args.nano}"]
    else:
        extra = [f"trainer.max_epochs={args.epochs}"]
    if args.twin and not args.nano and args.epochs != 40:
        parser.error("--twin with the default run trains all 40 epochs: --epochs 40")
    with tempfile.TemporaryDirectory() as tmp:
        def row(env: dict[str, str], more: list[str]) -> Callable[[], dict]:
            run = run_nano if args.nano else run_mlxlab
            return lambda: run(extra + more, Path(tmp), env={**os.environ, **threads, **env})

        rows = {f"{name}/{kind}": row(env, BARE if kind == "bare" else [])
                for name, env in parse(args.variants) for kind in args.rows.split(",")}
        if args.twin and args.nano:
            rows["twin"] = lambda: run_plain_twin(args.nano, args.threads)
        elif args.twin:
            data = Path(tmp) / "twin-data"
            data.mkdir()
            subprocess.run([sys.executable, str(HERE / "bench_default_run.py"), "--dump", str(data)],
                           check=True, capture_output=True)
            rows["twin"] = lambda: run_twin(data, args.threads)
        results = interleave(rows, args.repeats)
    what = f"nano, {args.nano} steps" if args.nano else f"{args.epochs} epochs"
    print(f"\nCPU: {cpu_model()}; {args.threads} thread(s); {args.repeats} rounds; {what}; medians")
    print("| row | wall (s) | CPU (s) | training loop (s) | first epoch (s) | wall / twin | "
          "CPU / twin |\n|---|---:|---:|---:|---:|---|---|")

    def versus(runs: list[dict], key: str) -> str:
        # per round, median (range): the twin ran in the same rounds
        per_round = sorted(r[key] / t[key] for r, t in zip(runs, results["twin"]))
        return f"{statistics.median(per_round):.2f}x ({per_round[0]:.2f}-{per_round[-1]:.2f})"

    for key, runs in results.items():
        med = {k: statistics.median(math.nan if r[k] is None else r[k] for r in runs)
               for k in ("wall_s", "cpu_s", "loop_s", "first_epoch_s")}  # the twin: no first epoch
        twin = "twin" in results and key != "twin"
        print(f"| {key} | {med['wall_s']:.2f} | {med['cpu_s']:.2f} | {med['loop_s']:.2f} | "
              f"{med['first_epoch_s']:.2f} | {versus(runs, 'wall_s') if twin else '-'} | "
              f"{versus(runs, 'cpu_s') if twin else '-'} |")


if __name__ == "__main__":
    main()
