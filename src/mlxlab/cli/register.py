"""Register a finished run's model in the MLflow model registry, with an alias.

    mlxlab register outputs/train/<time> --name titanic-bert --alias champion
    mlxlab register RUN --name tiny-lm --alias staging --uri http://127.0.0.1:5000
    mlxlab register --best-of-sweep latest --name titanic-bert

Then, in any process with mlxlab installed: mlxlab.load_model("titanic-bert@champion") or
mlflow.pyfunc.load_model("models:/titanic-bert@champion"), .predict(pandas_rows); or
`mlxlab serve models:/titanic-bert@champion`. The store is --uri, else $MLFLOW_TRACKING_URI,
else <project>/mlruns/mlflow.db.
"""

from __future__ import annotations

from mlxlab.cli.common import CHECKPOINT_CHOICES, CHECKPOINT_HELP, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("register", __doc__)
    parser.add_argument("run", nargs="?", help="a finished run folder (outputs/<task>/<time>)")
    parser.add_argument("--best-of-sweep", metavar="RUN_ID|latest",
                        help="register a sweep's best run instead")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", default="champion", help="alias for the new version ('' = none)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help=CHECKPOINT_HELP)
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.best_of_sweep is None):
        parser.error("give a run folder or --best-of-sweep (one of them)")

    def body() -> int:
        from mlxlab.serving.registry import best_run_dir, register_run
        from mlxlab.tracking.mlflow import resolve_uri

        uri = resolve_uri(args.uri)
        run_dir = args.run or best_run_dir(uri, args.best_of_sweep)
        version = register_run(run_dir, args.name, args.alias or None, uri, args.checkpoint)
        target = (f"models:/{args.name}@{args.alias}" if args.alias
                  else f"models:/{args.name}/{version.version}")
        print(f"registered {args.name} version {version.version} (run {version.run_id})")
        print(f"load it with mlflow.pyfunc.load_model({target!r}); serve it with "
              f"`mlxlab serve {target}`")
        return 0

    return guarded("register", body)
