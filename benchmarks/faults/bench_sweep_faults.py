"""A grid killed in its 4th job and continued with the same command vs the same grid whole.

Runs `mlxlab-train -m replicates=3 model.pooler=null,true` (2 configs x 3 seeds on Titanic) in
two fresh roots: once whole, once SIGKILLed (the launcher process, as `kill -9` would) as soon as
its 4th job committed its first checkpoint, then the same command again. Prints what the issue
asks of the continued grid beside the whole one:

    .venv/bin/python benchmarks/faults/bench_sweep_faults.py --root /tmp/bench_faults

(one parent, each (config, seed) FINISHED once, the killed job resumed from its
checkpoint, nothing RUNNING, and the same per-seed values, groups and verdict as the whole grid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, smoke_dir, write_record  # noqa: E402

GRID = [
    "-m",
    "model.num_layers=1",
    "model.num_heads=2",
    "trainer.batch_size=64",
    "trainer.max_epochs=3",
    "trainer.log_every_steps=1",
    "callbacks.progress.enabled=false",
    "checkpoint.save_every_steps=6",
    "checkpoint.save_every_minutes=null",
    "optimizer.learning_rate=3e-3",
    "replicates=3",
    "model.pooler=null,true",
]


def env(root: Path) -> dict[str, str]:
    found = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    found.pop("MLFLOW_TRACKING_URI", None)
    return found


def sweep(root: Path, log: str) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mlxlab.train", *GRID],
        cwd=root,
        env=env(root),
        capture_output=True,
        text=True,
    )
    (root / log).write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - began, done.stdout + done.stderr


def killed_sweep(root: Path) -> tuple[float, int]:
    """The grid, SIGKILLed once its 4th job (folder 3) committed a checkpoint."""
    began = time.perf_counter()
    with open(root / "killed.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxlab.train", *GRID],
            cwd=root,
            env=env(root),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while True:
            steps = sorted(
                int(p.parent.name[5:])
                for p in root.glob("multirun/train/*/3/checkpoints/step_*/COMMITTED")
            )
            if steps:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return time.perf_counter() - began, steps[-1]
            assert proc.poll() is None, "the grid ended before its 4th job checkpointed"
            time.sleep(0.01)


def outcome(root: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mlxlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    compared = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxlab.cli.main",
            "runs",
            "compare",
            "latest",
            "--metric",
            "val/loss",
            "--json",
        ],
        cwd=root,
        env=env(root),
        capture_output=True,
        text=True,
    )
    result = json.loads(compared.stdout[compared.stdout.index("{") :])["comparisons"][0]
    return {
        "parents": [(p.info.run_id[:8], p.info.status) for p in parents],
        "jobs": sorted(
            (r.data.params["model.pooler"], r.data.params["seed"], r.info.status) for r in children
        ),
        "running": sum(r.info.status == "RUNNING" for r in runs),
        "values": {
            (r.data.params["model.pooler"], r.data.params["seed"]): r.data.metrics["best/val/loss"]
            for r in children
        },
        "verdict": parents[0].data.tags.get("mlxlab.verdict"),
        "compare_exit": compared.returncode,
        "t_p": result["t_p"],
        "wilcoxon_p": result["wilcoxon_p"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_sweep_faults"))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # the same 6 jobs, one epoch each (a checkpoint at step 6 of 12)
        args.root = smoke_dir("sweep_faults")
        GRID[GRID.index("trainer.max_epochs=3")] = "trainer.max_epochs=1"
    shutil.rmtree(args.root, ignore_errors=True)
    whole_root, killed_root = args.root / "whole", args.root / "killed"
    whole_root.mkdir(parents=True)
    killed_root.mkdir()
    whole_s, _ = sweep(whole_root, "whole.log")
    killed_s, step = killed_sweep(killed_root)
    again_s, log = sweep(killed_root, "again.log")
    whole, continued = outcome(whole_root), outcome(killed_root)
    print(
        f"whole grid: {whole_s:.1f} s; killed after {killed_s:.1f} s (4th job's checkpoint at "
        f"step {step}); the same command again: {again_s:.1f} s"
    )
    print(
        f"again: {log.count('kept, not run again')} jobs kept, "
        f"{log.count('was killed: its run')} resumed, line: "
        + next((line.split("] - ")[-1] for line in log.splitlines() if "resumes from" in line), "-")
    )
    for name, found in (("whole", whole), ("continued", continued)):
        print(
            f"{name}: parents {found['parents']}, {len(found['jobs'])} jobs "
            f"{sorted({s for *_, s in found['jobs']})}, RUNNING {found['running']}, verdict "
            f"{found['verdict']!r}, runs compare exit {found['compare_exit']}, t p "
            f"{found['t_p']:.6g}, Wilcoxon p {found['wilcoxon_p']:.6g}"
        )
    same = continued["values"] == whole["values"]
    print(f"per-seed best/val/loss identical to the whole grid's (bitwise): {same}")
    write_record("sweep-faults", {
        "seconds": {"whole": whole_s, "killed": killed_s, "again": again_s}, "killed_at_step": step,
        "kept": log.count("kept, not run again"), "resumed": log.count("was killed: its run"),
        "whole": whole, "continued": continued, "identical": same},
        question="faults", smoke=args.smoke)


if __name__ == "__main__":
    main()
