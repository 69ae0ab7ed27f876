"""Any CSV by overrides alone: `mlxlab-train data=csv` on public tables vs scikit-learn baselines.

    OPENBLAS_NUM_THREADS=1 nice -n 5 python benchmarks/quality/bench_tabular.py [override ...]
        [--tables iris wine ...] [--seeds 1 2 3] [--jobs 2] [--root DIR] [--write]

Tables that install with the project's dependencies: iris, wine and breast cancer (files inside
scikit-learn, label values by their target names) and the Titanic file shipped with mlxlab (its
id column and the seven columns the classical baselines use named, as a Kaggle user would; the
tuned data=titanic preset is benchmarks/quality/bench_titanic.py). Each is written to a CSV and trained
as a new user would, a subprocess `mlxlab-train data=csv data.path=<csv> data.label_column=<label>
seed=<S>` with the default settings (tracking=none, no progress bar) plus any Hydra overrides
given. `seed=S` sets the split too (data.seed follows seed), so every seed is another split and
another initialisation; logistic regression (scaled) and gradient boosting are fitted on that
same split (the data module's own: split_module), on numeric columns imputed with the training
median (+ a missing flag) and the other columns one-hot.

"best" is the val accuracy of the run's best evaluation (the checkpoint it keeps, selected on the
validation rows), "last" the accuracy at its final evaluation. Finished runs are kept in
<root>/results.jsonl and not run again (same table, overrides and seed); --root keeps them.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import (
    SMOKE_RUN,
    TABLES_PAGE,
    add_smoke,
    cpu_model,
    write_between_markers,
    write_record,
)
from benchmarks.quality.bench_titanic import accuracy_history, baselines, mean_std, split_module
from mlxlab.config import asset_path
from mlxlab.data.numeric import numeric_values

TITANIC_COLUMNS = "[Pclass,Sex,Age,SibSp,Parch,Fare,Embarked]"
# name -> (scikit-learn loader or None for the shipped Titanic, label column, extra overrides)
TABLES = {
    "iris": ("load_iris", "species", []),
    "wine": ("load_wine", "cultivar", []),
    "breast_cancer": ("load_breast_cancer", "diagnosis", []),
    "titanic": (None, "Survived",
                ["data.id_column=PassengerId", f"data.feature_columns={TITANIC_COLUMNS}"]),
}
MARKER = "benchmarks/bench_tabular.py"  # the key of its table on the history page
TITLE = "## Any CSV: `data=csv` defaults vs logistic regression and gradient boosting"


def write_table(name: str, folder: Path) -> Path:
    """The table as the CSV a user would have: feature columns and a named label column."""
    path = folder / f"{name}.csv"
    loader, label, _ = TABLES[name]
    if loader is None:
        frame = pd.read_csv(asset_path("titanic/train.csv"))
    else:
        from sklearn import datasets

        bunch = getattr(datasets, loader)(as_frame=True)
        frame = bunch.frame.rename(columns={"target": label})
        frame[label] = [str(bunch.target_names[i]) for i in frame[label]]
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def table_overrides(name: str, path: Path, seed: int, overrides: list[str]) -> list[str]:
    _, label, extra = TABLES[name]
    return ["data=csv", f"data.path={path}", f"data.label_column={label}", *extra,
            f"seed={seed}", *overrides]


def baseline_features(columns: list[str]):
    """Inputs of the classical models: the module's text columns, numbers imputed with the
    training median plus a missing flag, anything else one-hot (missing its own category)."""
    def features(df: pd.DataFrame, train_idx: np.ndarray) -> pd.DataFrame:
        parts = []
        for column in columns:
            numbers = numeric_values(df[column])
            if numbers is None:
                parts.append(pd.get_dummies(df[column].astype(str), prefix=column, dtype=float))
                continue
            values = pd.Series(numbers, name=column)
            if values.isna().any():
                parts.append(values.isna().astype(float).rename(f"{column}_missing"))
            parts.append(values.fillna(values.iloc[train_idx].median()))
        return pd.concat(parts, axis=1)

    return features


def train_one(root: Path, name: str, path: Path, seed: int, overrides: list[str]) -> dict:
    """One `mlxlab-train` subprocess; its best and last val accuracy from the checkpoints."""
    run_dir = root / "runs" / f"{name}_s{seed}_{time.time_ns()}"
    command = [str(Path(sys.executable).parent / "mlxlab-train"),
               *table_overrides(name, path, seed, overrides), f"task_name=tabular_{name}",
               "tracking=none", "callbacks.progress.enabled=false", f"paths.root_dir={root}",
               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    history = accuracy_history(run_dir)
    best_step, best = max(history, key=lambda h: (h[1], -h[0]))  # the first best, as kept
    return {"table": name, "overrides": overrides, "seed": seed, "best": best,
            "last": history[-1][1], "best_step": best_step, "evals": len(history),
            "seconds": round(seconds, 1)}


def load_results(file: Path) -> list[dict]:
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def report(tables: list[str], seeds: list[int], runs: list[dict], base: dict) -> str:
    """The markdown table: per table, mlxlab best/last over seeds beside the baselines (means
    over the same seeds' splits)."""
    lines = ["| table | rows (train / val; 1 val row =) | mlxlab best | mlxlab last | "
             "logistic regression | gradient boosting | best - better baseline | per seed: "
             "best (LR, GB) | s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in tables:
        mine = sorted((r for r in runs if r["table"] == name), key=lambda r: r["seed"])
        b = [base[(name, s)] for s in seeds]
        lr = [x["logistic regression"] for x in b]
        gb = [x["gradient boosting"] for x in b]
        better = max(statistics.mean(lr), statistics.mean(gb))
        gap = 100 * (statistics.mean(r["best"] for r in mine) - better)
        n_train, n_val = b[0]["rows"]
        per_seed = ", ".join(f"{100 * r['best']:.1f} ({100 * x['logistic regression']:.1f}, "
                             f"{100 * x['gradient boosting']:.1f})" for r, x in zip(mine, b))
        lines.append(
            f"| {name} | {n_train} / {n_val}; {100 / n_val:.2f} pts | "
            f"{mean_std([r['best'] for r in mine])} | {mean_std([r['last'] for r in mine])} | "
            f"{mean_std(lr)} | {mean_std(gb)} | {gap:+.1f}{' (within 1)' if gap >= -1 else ''} "
            f"| {per_seed} | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every mlxlab run")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="seed=S per run: the split, the initialisation and the batch order")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--root", type=Path, default=None,
                        help="tables, runs, caches and results.jsonl (default: a new temp folder)")
    parser.add_argument("--write", action="store_true",
                        help="put the table into --out between its markers")
    parser.add_argument("--out", type=Path, default=TABLES_PAGE)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # iris, one seed, 4 steps, nothing written
        args.tables, args.seeds, args.write = ["iris"], [1], False
        args.overrides = [*args.overrides, *SMOKE_RUN]
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench_tabular_"))).resolve()
    results = root / "results.jsonl"
    paths = {name: write_table(name, root / "tables") for name in args.tables}

    base = {}
    for name in args.tables:
        for seed in args.seeds:
            data = split_module(root, table_overrides(name, paths[name], seed, args.overrides))
            scores = baselines(data, baseline_features(list(data.columns)))
            base[(name, seed)] = {**scores, "rows": (len(data.train_idx), len(data.val_idx))}

    done = load_results(results)
    have = {(r["table"], tuple(r["overrides"]), r["seed"]) for r in done}
    todo = [(n, s) for n in args.tables for s in args.seeds
            if (n, tuple(args.overrides), s) not in have]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(train_one, root, n, paths[n], s, args.overrides) for n, s in todo]
        for future in futures:
            run = future.result()
            with results.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"  {run['table']} seed {run['seed']}: best {100 * run['best']:.1f} "
                  f"(step {run['best_step']}), last {100 * run['last']:.1f}, {run['seconds']}s",
                  flush=True)
    runs = [r for r in load_results(results) if tuple(r["overrides"]) == tuple(args.overrides)
            and r["table"] in args.tables and r["seed"] in args.seeds]

    shown = " ".join(args.overrides) or "(none: the defaults)"
    tables = "" if args.tables == list(TABLES) else f"--tables {' '.join(args.tables)} "
    command = ("OPENBLAS_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/quality/bench_tabular.py "
               + "".join(f"{o} " for o in args.overrides)  # first: --seeds would take them
               + f"{tables}--seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs}")
    text = (f"Validation accuracy (%), mean ± std over seeds {', '.join(map(str, args.seeds))} "
            f"(each seed its own split), overrides: {shown}.\n`{command}` on {cpu_model()}, "
            f"{time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f}.\n\n"
            f"{report(args.tables, args.seeds, runs, base)}")
    print(f"\nruns in {root}\n\n{text}")
    write_record("tabular", {"runs": runs, "table": text,
                             "baselines": {f"{t}/{s}": v for (t, s), v in base.items()}},
                 question="quality",
                 smoke=args.smoke)
    if args.write:
        write_between_markers(args.out, MARKER, text, TITLE)


if __name__ == "__main__":
    main()
