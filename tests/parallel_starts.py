"""Searches started at the same moment: processes of `mlxlab-train -m hparams_search=titanic_optuna
debug=fast` released together at a file barrier, and what their roots hold afterwards (the study's
finished and distinct trials, the store's sweep parent runs, anything left RUNNING). Used by
tests/test_search_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def check_round(root: Path) -> dict:
    """What `root` holds after a round: the study's finished and distinct trials and those not
    finished, the store's sweep parent runs and runs left RUNNING."""
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
    return found
