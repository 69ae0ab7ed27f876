"""Time to first training step of the default run, by phase, on a fresh clone's state.

    python benchmarks/bench_startup.py                         # this tree, 3 fresh runs
    python benchmarks/bench_startup.py --repeats 5 --base /tmp/old_tree   # old and new, interleaved

Each run is `mlxlab-train` (the default experiment, the real CLI and store) in a subprocess
rooted in an empty folder: no MLflow store, no data or tokenizer cache. The user-level cache
($MLXLAB_CACHE_DIR: the migrated empty-store template) is one folder for the whole benchmark,
filled by an untimed first run: a fresh clone on a machine that has run mlxlab before
(`--cold` gives every run an empty one: the first run on a new machine). The child records when
its imports are done, the store is ready (ensure_store), the data (tokenizer included) is set
up, the step is compiled and the first step has run, then exits. `--base` runs another source
tree (e.g. `git archive <commit>`) with the same venv, alternating with this one, so both see
the same load on a shared machine; the table gives medians.
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

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
marks = {"start": time.time()}
import mlxlab.train as train_module
import mlxlab.tracking.mlflow.tracker as tracking_mlflow  # the tracker creates the store
import mlxlab.sweeps.callback as callbacks
from mlxlab.data.tabular import TabularText
try:  # the step builder the loop calls (by its module's name)
    import mlxlab.training.loop as step_owner
except ImportError:  # a --base tree from before issue 41: Trainer.make_step
    from mlxlab.training.trainer import Trainer as step_owner
marks["imports"] = time.time()

def timed(owner, name, mark):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            marks.setdefault(mark, time.time())
    setattr(owner, name, wrapper)

timed(tracking_mlflow, "ensure_store", "store")
timed(callbacks, "ensure_store", "store")
timed(TabularText, "setup", "data")
make_step = step_owner.make_step
def make_step_timed(*args, **kwargs):
    marks["before_compile"] = time.time()
    step = make_step(*args, **kwargs)
    def first(batches):
        out = step(batches)
        marks["first_step"] = time.time()
        print("MARKS" + json.dumps(marks), flush=True)
        os._exit(0)
    return first
step_owner.make_step = make_step_timed
sys.argv = ["mlxlab-train", "callbacks.progress.enabled=false"]
train_module.main()
"""


def run_once(src: Path | None, cache: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "MLXLAB_ROOT": root, "PYTHONUNBUFFERED": "1",
               "MLXLAB_CACHE_DIR": cache or f"{root}/user-cache"}
        env.pop("MLFLOW_TRACKING_URI", None)
        if src is not None:
            env["PYTHONPATH"] = str(src / "src")
        spawned = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
        line = next((x for x in out.stdout.splitlines() if x.startswith("MARKS")), None)
        if line is None:
            raise RuntimeError(f"no timing from the child:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        marks = json.loads(line[5:])
    return {
        "interpreter": marks["start"] - spawned,
        "imports": marks["imports"] - marks["start"],
        "to store ready": marks.get("store", marks["imports"]) - marks["imports"],
        "to data ready": marks["data"] - marks.get("store", marks["imports"]),
        "to compile start": marks["before_compile"] - marks["data"],
        "first step (compile)": marks["first_step"] - marks["before_compile"],
        "total": marks["first_step"] - spawned,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", type=Path, help="another source tree to time, interleaved")
    parser.add_argument("--cold", action="store_true", help="an empty user cache for every run")
    args = parser.parse_args()
    cache = None if args.cold else tempfile.mkdtemp(prefix="mlxlab-bench-cache-")
    if cache is not None:
        run_once(None, cache)  # untimed: fills the user cache
    trees = {"this tree": None}
    if args.base is not None:
        trees = {"base": args.base.resolve(), "this tree": None}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for i in range(args.repeats):
        for name, src in trees.items():
            timing = run_once(src, cache)
            results[name].append(timing)
            print(f"[{i + 1}/{args.repeats}] {name}: " +
                  "  ".join(f"{k} {v:.2f}" for k, v in timing.items()), flush=True)
    phases = list(next(iter(results.values()))[0])
    print(f"\nmedian seconds over {args.repeats} fresh runs each"
          f" ({'empty' if args.cold else 'warm'} user cache)")
    print("| phase | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for phase in phases:
        cells = [f"{statistics.median(r[phase] for r in runs):.2f}" for runs in results.values()]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
