"""What MLflow tracking costs a training step: back-to-back pairs of fresh processes that train the
same preset with tracking=none and tracking=mlflow, each reporting its median step time.

    python benchmarks/bench_tracking.py [--pairs 4] [--steps 200] [--experiment titanic_bert]

Pairs, not one long run each, because this shared machine drifts by several percent over minutes
(docs/benchmarks.md): a pair's two runs see the same machine. Steps right after an evaluation
(which also writes a checkpoint) and the first 3 steps (compiles) are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(experiment: str, steps: int, tracking: str) -> None:
    import mlxlab  # noqa: F401  (fast BLAS before mlx.core)
    from bench_callbacks import OVERRIDE, RECORD
    from mlxlab.config import compose_config
    from mlxlab.train import train

    root = Path(tempfile.mkdtemp(prefix="mlxlab-bench-tracking-"))
    cfg = compose_config(root, [
        f"experiment={experiment}", f"tracking={tracking}", f"trainer.max_steps={steps + 3}",
        "trainer.max_epochs=1000", "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
        "trainer.eval_every_steps=null", "checkpoint.save_every_minutes=null", OVERRIDE,
    ])
    train(cfg)
    times, evals = RECORD["times"], set(RECORD["evals"])
    ms = [1e3 * (times[k] - times[k - 1]) for k in range(4, len(times)) if k - 1 not in evals]
    print(f"RESULT {statistics.median(ms):.3f}")


def run(experiment: str, steps: int, tracking: str) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", tracking, "--experiment", experiment,
         "--steps", str(steps)],
        capture_output=True, text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(line.split()[1])
    raise RuntimeError(f"worker tracking={tracking} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--experiment", default="titanic_bert")
    parser.add_argument("--worker", choices=["none", "mlflow"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.experiment, args.steps, args.worker)
    off, on = [], []
    print("| pair | tracking=none median ms/step | tracking=mlflow median ms/step | on / off |")
    print("|---:|---:|---:|---:|")
    for k in range(1, args.pairs + 1):
        a, b = run(args.experiment, args.steps, "none"), run(args.experiment, args.steps, "mlflow")
        off.append(a)
        on.append(b)
        print(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.3f} |", flush=True)
    ratio = statistics.mean(on) / statistics.mean(off)
    print(f"| mean | {statistics.mean(off):.1f} | {statistics.mean(on):.1f} | {ratio:.3f} |")
    print(f"\nstep time with tracking on / off: {ratio:.3f} "
          f"(per-pair ratios {min(b / a for a, b in zip(off, on)):.3f}-"
          f"{max(b / a for a, b in zip(off, on)):.3f})")


if __name__ == "__main__":
    main()
