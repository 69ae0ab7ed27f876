"""Searches started at the same moment on a fresh root: how many starts succeed. Each round:
`--procs` processes of `mlxlab-train -m hparams_search=titanic_optuna debug=fast` released
together at a file barrier; a round succeeds when every process exits 0, the study holds N
distinct finished trials, the store one sweep parent run, and nothing is RUNNING.

    python benchmarks/faults/bench_parallel_start.py [--procs 4] [--rounds 3] [--src OTHER/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks.*
from benchmarks.harness import add_options, write_record  # noqa: E402

# A process that waits at the barrier, then runs mlxlab-train's Hydra app with these arguments:
# every process has imported Python and its modules first, so the race is Hydra's start itself.
LAUNCH = """
import os, sys, time
barrier = sys.argv[1]
open(barrier + f".{os.getpid()}", "w").close()
while not os.path.exists(barrier + ".go"):
    time.sleep(0.002)
sys.argv = ["mlxlab-train", *sys.argv[2:]]
from mlxlab.train import main
main(supervised=False)  # the Hydra app in this process (its imports are done), no parent
"""


def search_args(n_trials: int, steps: int) -> list[str]:
    return ["-m", "hparams_search=titanic_optuna", "debug=fast", f"hydra.sweeper.n_trials={n_trials}",
            f"trainer.max_steps={steps}", f"trainer.eval_every_steps={steps}",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2"]


def start_together(roots: list[Path], args: list[str], src: Path) -> list[subprocess.Popen]:
    """One process per entry of `roots` (its MLXLAB_ROOT and folder; a root may repeat), all
    released together once every one is up."""
    barrier = roots[0] / "barrier"
    started = []
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONPATH": str(src),
               "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        started.append(subprocess.Popen([sys.executable, "-c", LAUNCH, str(barrier), *args],
                                        cwd=root, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 120
    while len(list(roots[0].glob("barrier.*"))) < len(roots) and time.monotonic() < deadline:
        time.sleep(0.01)
    (roots[0] / "barrier.go").touch()
    return started


def check_round(root: Path, n_trials: int) -> dict:
    import optuna
    from mlflow import MlflowClient

    found: dict = {"trials": 0, "distinct": 0, "parents": 0, "running": -1}
    db = root / "mlruns" / "optuna.db"
    if db.exists():
        storage = f"sqlite:///{db}"
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        trials = [t for n in names
                  for t in optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)]
        found["trials"] = sum(t.state.is_finished() for t in trials)
        found["distinct"] = len({json.dumps(t.params, sort_keys=True) for t in trials})
        found["running_trials"] = sum(not t.state.is_finished() for t in trials)
    store = root / "mlruns" / "mlflow.db"
    if store.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{store}")
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, max_results=10000)
        found["parents"] = sum(r.data.tags.get("mlxlab.role") == "sweep" for r in runs)
        found["running"] = sum(r.info.status == "RUNNING" for r in runs)
    found["ok"] = (found["trials"] == found["distinct"] == n_trials and found["parents"] == 1
                   and found["running"] == 0 and found.get("running_trials") == 0)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_options(parser, procs=4, rounds=3, n_trials=4, steps=2, src=REPO / "src")
    opts = parser.parse_args()
    if opts.smoke:  # one round of 2 processes, 2 trials
        opts.procs, opts.rounds, opts.n_trials = 2, 1, 2
    rounds = []
    for i in range(opts.rounds):
        with tempfile.TemporaryDirectory(prefix="parallel-start-") as tmp:
            root = Path(tmp)
            begin = time.perf_counter()
            procs = start_together([root] * opts.procs, search_args(opts.n_trials, opts.steps),
                                   opts.src)
            outputs = [p.communicate(timeout=1800)[0] for p in procs]
            codes = [p.returncode for p in procs]
            found = check_round(root, opts.n_trials)
            found.update(codes=codes, seconds=round(time.perf_counter() - begin, 1))
            found["ok"] = found["ok"] and all(c == 0 for c in codes)
            errors = sorted({line for out in outputs for line in out.splitlines()
                             if line.startswith("mlxlab: error") or "Error" in line[:40]})
            found["errors"] = errors[:5]
            rounds.append(found)
            print(f"round {i + 1}: {'ok' if found['ok'] else 'FAILED'} exit codes {codes}, "
                  f"{found['trials']} finished trials ({found['distinct']} distinct), "
                  f"{found['parents']} parent runs, {found['running']} runs RUNNING, "
                  f"{found['seconds']} s" + (f"; {errors[:2]}" if errors else ""), flush=True)
    ok = sum(r["ok"] for r in rounds)
    print(f"{opts.procs} processes, n_trials={opts.n_trials}: {ok} of {len(rounds)} rounds ok")
    write_record("parallel-start", {"procs": opts.procs, "n_trials": opts.n_trials,
                                    "rounds_ok": ok, "rounds": rounds},
                 question="faults", smoke=opts.smoke)


if __name__ == "__main__":
    main()
