"""Titanic validation accuracy: the default experiment (BERT on row text) vs scikit-learn baselines.

    python benchmarks/quality/bench_titanic.py [--seeds 1 2 3] [--root DIR] [override ...]

Every model sees the same rows: the split is the data module's own (TabularText.setup ->
stratified_split with data.seed and data.val_fraction). The BERT runs go through the real stack,
`train(cfg)` on the composed default config (tracking=none) plus any Hydra overrides given; each
seed sets `seed=` (weight init, dropout) while `data.seed` stays at the default, so the split and
the batch order are fixed and the baselines stay comparable. Baselines: logistic regression and
gradient boosting on one-hot Sex/Pclass/Embarked, Age/Fare imputed with the training median
(+ an Age-missing flag), SibSp, Parch. scikit-learn is a benchmark-only dependency.

"best" is what a run reports: val accuracy at its best evaluation (the checkpoint it keeps), so it
is selected on the validation rows; "last" is the accuracy at its final evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mlxlab.checkpoint import CheckpointState
from mlxlab.config import compose_config, instantiate
from mlxlab.data.tabular import read_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import SMOKE_RUN, add_smoke, write_record  # noqa: E402


def compose_default(root: Path, overrides: list[str], run_name: str) -> DictConfig:
    """The default experiment's config, rooted in `root`, writing its run to outputs/<run_name>."""
    return compose_config(root, ["tracking=none", "callbacks.progress.enabled=false", *overrides],
                          root / "outputs" / run_name)


def titanic_features(df: pd.DataFrame, train_idx: np.ndarray) -> pd.DataFrame:
    """Classic tabular features; imputation uses training rows only."""
    x = df[["Age", "Fare", "SibSp", "Parch"]].astype(float)
    x = x.assign(age_missing=df["Age"].isna().astype(float))
    x = x.fillna(x.iloc[train_idx].median())
    onehot = pd.get_dummies(df[["Sex", "Pclass", "Embarked"]].astype(str), dtype=float)
    return pd.concat([x, onehot], axis=1)


def baseline_models() -> dict:
    """The two classical references, fitted fresh for every table."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "gradient boosting": GradientBoostingClassifier(random_state=0),
    }


def baselines(data, features=None) -> dict[str, float]:
    """Validation accuracy of the scikit-learn baselines on the data module's own split (after
    data.setup()): `features(df, train_idx)` builds their inputs (default: titanic_features)."""
    df = read_csv(data.path)
    df = df[df[data.label_column].notna()].reset_index(drop=True)  # as setup() does
    y = df[data.label_column].map({v: i for i, v in enumerate(data.label_values)}).to_numpy()
    if not np.array_equal(y[data.val_idx], data.val[2]):
        raise RuntimeError("baseline rows differ from the data module's validation rows")
    x = (features or titanic_features)(df, data.train_idx)
    tr, va = data.train_idx, data.val_idx
    return {name: float(m.fit(x.iloc[tr], y[tr]).score(x.iloc[va], y[va]))
            for name, m in baseline_models().items()}


def split_module(root: Path, overrides: list[str]):
    """The data module of the composed config, set up: its train_idx/val_idx are the split
    every model of the benchmark sees."""
    data = instantiate(compose_default(root, overrides, "bench_split").data)
    data.setup(None)
    return data


def accuracy_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val accuracy) of every evaluation of a finished run: the newest step
    checkpoint's history covers them all (best/ stops at the best one)."""
    newest = max((Path(run_dir) / "checkpoints").glob("step_*"))
    return [(int(step), float(acc)) for step, acc in
            CheckpointState.read(newest).history["val/accuracy"]]


def run_bert(root: Path, overrides: list[str], seed: int, split_seed: int) -> dict:
    from mlxlab.train import train

    cfg = compose_default(root, [*overrides, f"seed={seed}", f"data.seed={split_seed}"],
                          f"bench_seed{seed}_{time.strftime('%H%M%S')}")
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    accuracies = accuracy_history(Path(cfg.paths.output_dir))
    return {"seed": seed, "best": metrics["val/accuracy"], "last": accuracies[-1][1],
            "best_step": int(metrics["best_step"]), "last_step": int(accuracies[-1][0]),
            "evals": len(accuracies), "seconds": seconds}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the BERT runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                        help="training seeds (init, dropout); the split keeps data.seed")
    parser.add_argument("--root", type=Path, default=None,
                        help="where runs and caches go (default: a new temp folder)")
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one seed, 4 steps, the baselines on the same split
        args.seeds, args.overrides = [1], [*args.overrides, *SMOKE_RUN]
    root = (args.root or Path(tempfile.mkdtemp(prefix="bench_titanic_"))).resolve()

    data = split_module(root, args.overrides)
    split_seed = int(data.settings.seed)
    base = baselines(data)
    print(f"split: data.seed={split_seed}, {len(data.train_idx)} train / {len(data.val_idx)} val "
          f"rows of {data.path}")

    runs = [run_bert(root, args.overrides, s, split_seed) for s in args.seeds]
    for r in runs:
        # the last evaluation's step is where the run ended (early stopping: `patience`
        # evaluations after the best one)
        print(f"  seed {r['seed']}: best {100 * r['best']:.1f} (step {r['best_step']}), "
              f"last {100 * r['last']:.1f} (step {r['last_step']}), {r['evals']} evals, "
              f"{r['seconds']:.0f}s")

    target = max(base.values()) - 0.02
    best_mean = statistics.mean(r["best"] for r in runs)
    shown = " ".join(args.overrides) or "(none)"
    print(f"\nTitanic validation accuracy (%), overrides: {shown}, runs in {root}\n")
    print("| model | accuracy | seeds |")
    print("|---|---|---|")
    seeds = ",".join(str(s) for s in args.seeds)
    print(f"| BERT default, best eval | {mean_std([r['best'] for r in runs])} | {seeds} |")
    print(f"| BERT default, last eval | {mean_std([r['last'] for r in runs])} | {seeds} |")
    for name, acc in base.items():
        print(f"| {name} | {100 * acc:.1f} | - |")
    write_record("titanic", {"runs": runs, "baselines": base, "overrides": args.overrides},
                 question="quality", reference="the better of gradient boosting and logistic "
                 "regression on the same split", ratio=round(best_mean / max(base.values()), 3),
                 summary="the default experiment's best validation accuracy (higher is better)",
                 smoke=args.smoke)
    verdict = "reached" if best_mean >= target else "NOT reached"
    print(f"\ntarget (better baseline - 2 points): {100 * target:.1f} -> {verdict} "
          f"(BERT mean {100 * best_mean:.1f})")


if __name__ == "__main__":
    main()
