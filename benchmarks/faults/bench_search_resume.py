"""A search SIGKILLed mid-trial (after its first checkpoint) and started again with the same command
vs the same search uninterrupted (`hparams_search=titanic_optuna`, sampler seed fixed): no
finished trial runs again, the study holds the trials asked for, the best is the same.

    python benchmarks/faults/bench_search_resume.py --root /tmp/bench_resume --trials 6 --kill-at 3
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, smoke_dir, write_record  # noqa: E402


def command(name: str, trials: int, epochs: int = 20) -> list[str]:
    return [sys.executable, "-m", "mlxlab.train", "-m", "hparams_search=titanic_optuna",
            f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.study_name={name}",
            f"hydra.sweep.dir=multirun/{name}", "hydra.sweeper.sampler.seed=7",
            "callbacks.progress.enabled=false", f"trainer.max_epochs={epochs}",
            "checkpoint.save_every_steps=20"]


def run(root: Path, name: str, trials: int, kill_at: int | None = None, epochs: int = 20) -> str:
    env = {**os.environ, "MLXLAB_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    log = root / f"{name}.log"
    with open(log, "a") as out:
        proc = subprocess.Popen(command(name, trials, epochs), cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        if kill_at is not None:
            checkpoints = root / "multirun" / name / str(kill_at) / "checkpoints"
            while not any(checkpoints.glob("step_*/COMMITTED")):
                if proc.poll() is not None:
                    raise SystemExit(f"the search ended before trial {kill_at} saved: see {log}")
                time.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            print(f"{name}: SIGKILL while trial {kill_at} trains ({time.strftime('%T')})",
                  flush=True)
        proc.wait()
    return log.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args()
    epochs = 20
    if args.smoke:  # 2 trials of 2 epochs, the second killed after its first checkpoint
        args.root, args.trials, args.kill_at, epochs = smoke_dir("search_resume"), 2, 1, 2
    if args.root is None:
        parser.error("--root is required")
    args.root.mkdir(parents=True, exist_ok=True)
    run(args.root, "whole", args.trials, epochs=epochs)
    run(args.root, "killed", args.trials, kill_at=args.kill_at, epochs=epochs)
    log = run(args.root, "killed", args.trials, epochs=epochs)
    import optuna

    storage = f"sqlite:///{args.root}/mlruns/optuna.db"
    whole = optuna.load_study(study_name="whole", storage=storage).trials
    killed = optuna.load_study(study_name="killed", storage=storage).trials
    print(f"{'trial':>5}  {'launched':>8}  {'state':<9} {'value (killed)':>15} {'value (whole)':>14}"
          "  same params")
    for a, b in zip(killed, whole):
        launches = log.count(f"search: trial {a.number}: ")  # both starts: one log
        print(f"{a.number:>5}  {launches:>8}  {a.state.name:<9} {a.value:>15.4f} {b.value:>14.4f}"
              f"  {a.params == b.params}")
    kb, wb = (max(trials, key=lambda t: t.value) for trials in (killed, whole))  # val/accuracy
    write_record("search-resume", {
        "asked": args.trials, "resumed_from_checkpoint": "resumes from its checkpoint" in log,
        "trials": [{"number": a.number, "launches": log.count(f"search: trial {a.number}: "),
                    "state": a.state.name, "value_killed": a.value, "value_whole": b.value,
                    "same_params": a.params == b.params} for a, b in zip(killed, whole)],
        "best_killed": [kb.number, kb.value], "best_whole": [wb.number, wb.value]},
        question="faults", smoke=args.smoke)
    print(f"trials: killed study {len(killed)}, whole {len(whole)} (asked {args.trials}); "
          f"best: trial {kb.number} {kb.value:.4f} vs trial {wb.number} {wb.value:.4f}; "
          f"resumed from checkpoint: {'resumes from its checkpoint' in log}")


if __name__ == "__main__":
    main()
