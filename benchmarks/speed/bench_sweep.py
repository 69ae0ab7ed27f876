"""Sweep throughput and tracking overhead.

    python benchmarks/speed/bench_sweep.py                     # the numbers for docs/benchmarks.md
    python benchmarks/speed/bench_sweep.py --tiny              # seconds: checks the script itself

1. Wall clock of a 4-job Titanic multirun (model.hidden_size x optimizer.learning_rate, 2 x 2) on
   the joblib launcher with 1 worker, then 2 workers (then 1 again with --repeats 2, to cancel
   drift), each against a fresh sqlite store; every sweep must leave 4 finished child runs.
2. Tracking overhead per logged step, in this process:
   - the step loop's share: MlflowTracker.log_metrics vs NullTracker.log_metrics for the same
     metrics dicts (the background thread sends them), and the final flush in end();
   - a whole run: train() with trainer.log_every_steps=1 under tracking=mlflow and tracking=none,
     alternated; (t_mlflow - t_none) / steps, and the fixed per-run cost that includes.
Prints a markdown table; --json writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def sweep_args(steps: int, tiny: bool) -> list[str]:
    sizes = "16,32" if tiny else "64,128"
    args = [
        "--multirun",
        "hydra/launcher=joblib",
        f"model.hidden_size={sizes}",
        "optimizer.learning_rate=1e-3,3e-3",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={steps}",
        "callbacks.progress.enabled=false",
        "checkpoint.save_every_minutes=null",
    ]
    if tiny:
        args += ["model.num_layers=1", "model.num_heads=2", "trainer.batch_size=64"]
    return args


def time_sweep(workers: int, steps: int, tiny: bool, root: Path) -> float:
    from mlflow import MlflowClient

    from mlxlab.sweeps.store import sweep_children
    from mlxlab.tracking.mlflow import ensure_store

    root.mkdir(parents=True)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    ensure_store(uri, "train")  # schema migration is a one-time cost, not the sweep's
    env = {**os.environ, "MLXLAB_ROOT": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlxlab.train", *sweep_args(steps, tiny)]
    cmd.append(f"hydra.launcher.n_jobs={workers}")
    begin = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if proc.returncode != 0:
        raise SystemExit(f"sweep with {workers} worker(s) failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("train")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`mlxlab.role` = 'sweep'")
    statuses = [r.info.status for r in sweep_children(client, parent.info.run_id)]
    if statuses != ["FINISHED"] * 4:
        raise SystemExit(
            f"sweep with {workers} worker(s) left child runs {statuses}, not 4 finished"
        )
    return seconds


def log_metrics_cost(tracker, steps: int) -> tuple[float, float]:
    """(ms per log_metrics call as the step loop sees it, ms spent in end())."""
    tracker.start({"bench": {"steps": steps}}, {})
    metrics = {
        "train/loss": 0.5,
        "train/grad_norm": 1.0,
        "train/lr": 1e-3,
        "train/tokens_per_sec": 1e4,
    }
    spent = 0.0
    for step in range(steps):
        begin = time.perf_counter()
        tracker.log_metrics(metrics, step)
        spent += time.perf_counter() - begin
    begin = time.perf_counter()
    tracker.end()
    return 1000 * spent / steps, 1000 * (time.perf_counter() - begin)


def compose(root: Path, overrides: list[str], name: str):
    from mlxlab.config import compose_config

    return compose_config(root, overrides, root / "outputs" / name)


def run_overhead(steps: int, tiny: bool, repeats: int, root: Path) -> dict:
    """train() with every step logged, under tracking=mlflow and tracking=none, alternated."""
    import contextlib
    import io

    from mlxlab.tracking.mlflow import ensure_store
    from mlxlab.train import train

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    ensure_store(uri, "train")
    common = [
        f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={steps}",
        "trainer.log_every_steps=1",
        "callbacks.progress.enabled=false",
        "callbacks.early_stopping.patience=0",
        "checkpoint.save_every_minutes=null",
    ]
    tracking_args = {
        "mlflow": ["tracking=mlflow", f"tracking.uri={uri}"],
        "none": ["tracking=none"],
    }
    if tiny:
        common += ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2"]
    times: dict[str, list[float]] = {"mlflow": [], "none": []}
    with contextlib.redirect_stdout(io.StringIO()):
        train(compose(root, [*common, "tracking=none"], "warmup"))  # tokenizer + token cache
    for i in range(repeats):
        for tracking in ("mlflow", "none") if i % 2 == 0 else ("none", "mlflow"):
            cfg = compose(root, [*common, *tracking_args[tracking]], f"{tracking}{i}")
            begin = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                train(cfg)
            times[tracking].append(time.perf_counter() - begin)
    mlflow_s, none_s = statistics.median(times["mlflow"]), statistics.median(times["none"])
    return {
        "steps": steps,
        "mlflow_s": mlflow_s,
        "none_s": none_s,
        "overhead_s": mlflow_s - none_s,
        "overhead_ms_per_step": 1000 * (mlflow_s - none_s) / steps,
        "all": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, few steps: checks only")
    parser.add_argument("--steps", type=int, help="training steps per sweep job (default 150)")
    parser.add_argument("--repeats", type=int, default=1, help="sweeps per worker count")
    parser.add_argument("--log-steps", type=int, help="logged steps, micro benchmark (5000)")
    parser.add_argument("--skip-sweeps", action="store_true", help="only the tracking overhead")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    add_smoke(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # --tiny, one sweep per worker count, 20 logged steps
        args.tiny, args.repeats, args.log_steps = True, 1, 20
    steps = args.steps or (3 if args.tiny else 150)
    log_steps = args.log_steps or (200 if args.tiny else 5000)

    from mlxlab.tracking.base import NullTracker
    from mlxlab.tracking.mlflow import MlflowTracker

    results: dict = {"cpus": os.cpu_count(), "steps": steps, "tiny": args.tiny}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        tmp = Path(tmp)
        if not args.skip_sweeps:
            order = [1, 2] if args.repeats == 1 else [1, 2, 2, 1] * (args.repeats // 2)
            walls: dict[int, list[float]] = {1: [], 2: []}
            for i, workers in enumerate(order):
                walls[workers].append(time_sweep(workers, steps, args.tiny, tmp / f"sweep{i}"))
                print(f"  sweep, {workers} worker(s): {walls[workers][-1]:.1f} s", file=sys.stderr)
            results["sweep_s"] = {w: statistics.median(v) for w, v in walls.items()}
            results["sweep_all_s"] = walls
        uri = f"sqlite:///{tmp}/micro/mlflow.db"
        from mlxlab.tracking.mlflow import ensure_store

        ensure_store(uri, "bench")
        results["log_metrics_ms"] = {
            "mlflow": log_metrics_cost(MlflowTracker(uri=uri, experiment_name="bench"), log_steps),
            "none": log_metrics_cost(NullTracker(), log_steps),
            "steps": log_steps,
        }
        results["run"] = run_overhead(steps, args.tiny, max(args.repeats, 1), tmp / "run")

    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"{r['cpus']} CPUs, {r['steps']} training steps per job{' (tiny)' if r['tiny'] else ''}",
        "",
    ]
    if "sweep_s" in r:
        one, two = r["sweep_s"][1], r["sweep_s"][2]
        lines += [
            "| 4-job Titanic sweep (joblib) | wall clock | speed-up |",
            "|---|---|---|",
            f"| 1 worker | {one:.1f} s | 1.00x |",
            f"| 2 workers | {two:.1f} s | {one / two:.2f}x |",
            "",
        ]
    micro, run = r["log_metrics_ms"], r["run"]
    (m_step, m_end), (n_step, _) = micro["mlflow"], micro["none"]
    lines += [
        "| tracking overhead | MlflowTracker | NullTracker | difference |",
        "|---|---|---|---|",
        f"| log_metrics, step loop's share ({micro['steps']} steps x 4 metrics) | "
        f"{1000 * m_step:.1f} us/step | {1000 * n_step:.2f} us/step | {m_step - n_step:.4f} ms/step |",
        f"| final flush in end() | {m_end:.0f} ms | - | - |",
        f"| whole run, {run['steps']} steps, every step logged | {run['mlflow_s']:.2f} s | "
        f"{run['none_s']:.2f} s | {run['overhead_s']:.2f} s/run = "
        f"{run['overhead_ms_per_step']:.1f} ms/step |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
