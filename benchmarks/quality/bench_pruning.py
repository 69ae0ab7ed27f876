"""Does pruning pay? The same Optuna search of tinystories_nano with and without a pruner.

Two searches of N trials over the learning rate and the width (model.dim), the same sampler
seed and budget per trial (trainer.max_steps, evaluated every --eval-every steps); each then
re-runs its best trial on --seeds seeds (hydra.sweeper.rerun_top_k=1), so both winners come with
a mean and a 95 % interval over the same seeds. Prints the steps each search trained, its best
trial and its winner's replicates, and the paired comparison of the two winners:

    .venv/bin/python benchmarks/quality/bench_pruning.py --root /tmp/bench_pruning \
        --trials 16 --steps 150 --eval-every 25 --seeds 5 [--pruner hyperband]
    .venv/bin/python benchmarks/quality/bench_pruning.py --root /tmp/bench_pruning300 --trials 16 \
        --steps 300 --eval-every 10 --seeds 5 --pruner successive_halving \
        --min-resource 20 --reduction-factor 4 --label min20_rf4

The question it answers (issue 38): total training steps with pruning <= 50 % of the unpruned
search's, and the pruned search's winner inside the unpruned winner's interval. A study that is
already complete in --root is not run again (the sweeper resumes it: nothing is left), so a
second call with another --pruner reuses the unpruned search.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke, smoke_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPACE = ["optimizer.learning_rate=tag(log,interval(3e-4,1e-2))", "model.dim=choice(128,192,256)"]


def search(root: Path, name: str, pruner: str, args: argparse.Namespace) -> float:
    """One search (a study called `name` in root/mlruns/optuna.db); its wall seconds. The log
    is appended to: a resumed or reused search keeps what the first start wrote."""
    cmd = [
        sys.executable, "-m", "mlxlab.train", "-m", "experiment=tinystories_nano", *SPACE,
        f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.study_name={name}",
        f"hydra.sweep.dir=multirun/{name}", f"hydra.sweeper.sampler.seed={args.sampler_seed}",
        "hydra.sweeper.sampler.n_startup_trials=6", f"hydra.sweeper.pruner={pruner}",
        "hydra.sweeper.rerun_top_k=1", f"hydra.sweeper.rerun_seeds={args.seeds}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every_steps={args.eval_every}",
        "trainer.schedule.warmup_steps=15", "callbacks.progress.enabled=false",
    ]
    rung = args.min_resource or args.eval_every
    if pruner == "hyperband":
        cmd.append(f"hydra.sweeper.pruner_args={{min_resource: {rung}, "
                   f"max_resource: {args.steps}, reduction_factor: {args.reduction_factor}}}")
    elif pruner == "successive_halving":
        cmd.append(f"hydra.sweeper.pruner_args={{min_resource: {rung}, "
                   f"reduction_factor: {args.reduction_factor}}}")
    elif pruner == "median":
        cmd.append("hydra.sweeper.pruner_args={n_startup_trials: 5, n_warmup_steps: "
                   f"{args.eval_every}}}")
    env = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(root / f"{name}.log", "a") as log:
        subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def summarize(root: Path, name: str, wall_s: float) -> dict:
    import optuna

    from mlxlab.stats import summarize as interval

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/mlruns/optuna.db")
    trials = study.trials
    best = study.best_trial
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    reruns = {k: v for k, v in study.user_attrs.items() if k.startswith("mlxlab:rerun:")}
    winner = {"42": best.value, **{k.rsplit(":", 1)[1]: v for k, v in reruns.items()}}
    s = interval(winner.values())
    return {"study": name, "trials": len(trials), **states, "wall_s": round(wall_s),
            "steps": sum(int(t.user_attrs.get("steps_trained", 0)) for t in trials),
            "best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "winner_seeds": winner, "winner_mean": s.mean, "winner_ci": [s.low, s.high]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sampler-seed", type=int, default=42)
    parser.add_argument("--pruner", default="hyperband")
    parser.add_argument("--min-resource", type=int, default=None,
                        help="the first rung's step (default: --eval-every); put it after the "
                             "warm-up, where the losses already rank the trials")
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--label", default="",
                        help="appended to the pruned study's name, to run another pruner setting "
                             "in the same --root (the unpruned search is reused)")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # 2 trials of 4 steps each way, the winner rerun on 2 more seeds
        args.root, args.trials, args.steps, args.eval_every, args.seeds = (
            smoke_dir("pruning"), 2, 4, 2, 2)
    if args.root is None:
        parser.error("--root is required")
    args.root.mkdir(parents=True, exist_ok=True)
    results = []
    pruned = f"pruned_{args.pruner}" + (f"_{args.label}" if args.label else "")
    for name, pruner in (("unpruned", "none"), (pruned, args.pruner)):
        wall = search(args.root, name, pruner, args)
        results.append(summarize(args.root, name, wall))
        print(json.dumps(results[-1]), flush=True)
    from mlxlab.stats import compare

    full, pruned = results
    d = compare(full["winner_seeds"], pruned["winner_seeds"])
    print(f"\nsteps: pruned {pruned['steps']} / unpruned {full['steps']} = "
          f"{pruned['steps'] / full['steps']:.0%}")
    for r in results:
        print(f"{r['study']}: {r['COMPLETE']} complete, {r['PRUNED']} pruned, {r['FAIL']} failed; "
              f"best trial {r['best_trial']} val/loss {r['best_value']:.4f} {r['best_params']}; "
              f"winner on {len(r['winner_seeds'])} seeds {r['winner_mean']:.4f} "
              f"[{r['winner_ci'][0]:.4f}, {r['winner_ci'][1]:.4f}]; {r['wall_s']} s")
    inside = full["winner_ci"][0] <= pruned["winner_mean"] <= full["winner_ci"][1]
    print(f"pruned winner inside the unpruned winner's interval: {inside}; paired difference "
          f"{d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}], t p={d.t_p:.3g}")
    (args.root / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
