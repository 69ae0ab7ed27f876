"""Curriculum vs none at equal steps: TinyStories sample (LM) and Titanic (classification).

    OPENBLAS_NUM_THREADS=1 python benchmarks/quality/bench_curriculum.py [--seeds 0 1 2] [--jobs 2]
        [--root DIR] [--only titanic|tinystories]

Every run goes through the real CLI (`python -m mlxlab.train`, tracking=none) with the same
model, steps, batch size and learning rate; the curriculum runs only add `data.curriculum=...`.
Each seed sets `seed=` (init, dropout, data order, curriculum draws). The numbers are read from
the final checkpoint's state.json: the validation metrics at the last step ("last", equal steps)
and the KL(seen || corpus) of the tokens trained on at the end. At most `--jobs` runs at a time.
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
from benchmarks.common import SMOKE_RUN, add_smoke, cpu_model

SETUPS = {
    "titanic": [
        "trainer.max_epochs=6", "callbacks.early_stopping.patience=0",
        "callbacks.progress.enabled=false", "checkpoint.save_every_minutes=null",
    ],
    "tinystories": [
        "experiment=tinystories_nano", "model.dim=128", "model.num_layers=2", "model.num_heads=4",
        "trainer.max_steps=150", "trainer.eval_every_steps=75", "trainer.schedule.warmup_steps=15",
        "callbacks.progress.enabled=false", "checkpoint.save_every_minutes=null",
    ],
}
CONDITIONS = {
    "titanic": {"none": "{score: none}", "rarity-root": "{score: rarity, pacing: root}",
                "length-root": "{score: length, pacing: root}"},
    "tinystories": {"none": "{score: none}", "length-root": "{score: length, pacing: root}"},
}
METRICS = {"titanic": ("val/accuracy", "val/loss"), "tinystories": ("val/loss",)}


def launch(root: Path, setup: str, cond: str, seed: int) -> tuple[subprocess.Popen, Path]:
    run_dir = root / f"{setup}-{cond}-{seed}"
    args = [*SETUPS[setup], f"data.curriculum={CONDITIONS[setup][cond]}", f"seed={seed}",
            "tracking=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "MLXLAB_ROOT": str(root), "OPENBLAS_NUM_THREADS": "1"}
    with open(root / f"{run_dir.name}.log", "w") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "mlxlab.train", *args], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, run_dir


def result(run_dir: Path, setup: str) -> dict[str, float]:
    last = max((run_dir / "checkpoints").glob("step_*"))
    state = json.loads((last / "state.json").read_text())
    out = {k: state["history"][k][-1][1] for k in METRICS[setup]}
    out["steps"] = state["step"]
    out["kl_end"] = json.loads((run_dir / "curriculum" / "summary.json").read_text())["kl_seen_corpus"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--only", choices=list(SETUPS), default=None)
    add_smoke(ap)
    args = ap.parse_args()
    if args.smoke:  # Titanic's three conditions, one seed, 4 steps each
        args.seeds, args.only = [0], "titanic"
        SETUPS["titanic"] = [*SETUPS["titanic"], *SMOKE_RUN]
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-curriculum-"))
    root.mkdir(parents=True, exist_ok=True)
    todo = [(s, c, seed) for s in SETUPS if args.only in (None, s) for c in CONDITIONS[s]
            for seed in args.seeds]
    running: list = []
    results: dict = {}
    start = time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            job = todo.pop(0)
            running.append((job, *launch(root, *job)))
        time.sleep(2)
        for item in list(running):
            (setup, cond, seed), proc, run_dir = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                print(f"FAILED {run_dir} (see {run_dir}.log)", flush=True)
                continue
            results[(setup, cond, seed)] = result(run_dir, setup)
            print(f"[{time.time() - start:6.0f}s] {setup} {cond} seed {seed}: "
                  f"{results[(setup, cond, seed)]}", flush=True)
    print(f"\nCPU: {cpu_model()}; runs in {root}\n")
    for setup in SETUPS:
        rows = [(c, [results[(setup, c, s)] for s in args.seeds if (setup, c, s) in results])
                for c in CONDITIONS[setup]]
        if not any(r for _, r in rows):
            continue
        keys = (*METRICS[setup], "kl_end")
        print(f"| {setup} | " + " | ".join(f"{k} (last, mean ± sd)" for k in keys) + " | per seed |")
        print("|---" * (len(keys) + 2) + "|")
        for cond, rs in rows:
            cells = []
            for k in keys:
                vals = [r[k] for r in rs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}")
            per = ", ".join("/".join(f"{r[k]:.4f}" for k in keys) for r in rs)
            print(f"| {cond} | " + " | ".join(cells) + f" | {per} |")
        print()



if __name__ == "__main__":
    main()
