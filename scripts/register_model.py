"""Register a finished run's model in the MLflow model registry, with an alias.

    python scripts/register_model.py outputs/train/2026-01-01_12-00-00_000000 --name titanic-bert
    python scripts/register_model.py <run dir> --name tiny-lm --alias staging --uri http://127.0.0.1:5000
    python scripts/register_model.py --best-of-sweep latest --name titanic-bert

Then, in any process with mlxlab installed:
    mlflow.pyfunc.load_model("models:/titanic-bert@champion").predict(pandas_rows)
The store is --uri, else $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys


def best_run_dir(uri: str, sweep: str) -> str:
    """The run folder of a sweep's best child (`latest` = the newest sweep in the store)."""
    from mlflow import MlflowClient

    from mlxlab.tracking.mlflow import RUN_DIR_TAG, find_sweep_parent

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = find_sweep_parent(client, sweep)
    best = parent.data.tags.get("mlxlab.best_run_id")
    if not best:
        raise SystemExit(
            f"sweep {parent.info.run_id} has no best run (still running, or all failed)"
        )
    run_dir = client.get_run(best).data.tags.get(RUN_DIR_TAG)
    if not run_dir:
        raise SystemExit(f"run {best} has no {RUN_DIR_TAG} tag: pass its run folder instead")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run folder (outputs/<task>/<time>)")
    parser.add_argument(
        "--best-of-sweep", metavar="RUN_ID|latest", help="register a sweep's best run"
    )
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias for the new version")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.best_of_sweep is None):
        parser.error("give a run folder or --best-of-sweep (one of them)")

    from mlxlab.tracking.mlflow import resolve_uri
    from mlxlab.tracking.registry import register_run

    uri = resolve_uri(args.uri)
    run_dir = args.run_dir or best_run_dir(uri, args.best_of_sweep)
    try:
        version = register_run(run_dir, args.name, args.alias or None, uri)
    except (FileNotFoundError, ValueError) as err:
        print(f"register_model: error: {err}", file=sys.stderr)
        return 2
    target = (
        f"models:/{args.name}@{args.alias}"
        if args.alias
        else f"models:/{args.name}/{version.version}"
    )
    print(f"registered {args.name} version {version.version} (run {version.run_id})")
    print(f"load it with mlflow.pyfunc.load_model({target!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
