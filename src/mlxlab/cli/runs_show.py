"""One run in detail, or runs side by side; best-checkpoint and last-logged values apart.

    mlxlab runs show <run id>                     # params, metrics (best | last), checkpoints
    mlxlab runs show outputs/train/<time>         # a run folder: its MLflow run and checkpoints
    mlxlab runs compare <run id> <run id> ...     # metrics (best and last) and differing params

A metric's `best` value is the best checkpoint's (`best/<metric>`: what the run's closing line,
`mlxlab predict/eval` and `mlxlab register` use by default); `last` is the last value logged.
A sweep's parent run also shows the sweep table. The store is --uri, else
$MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db.
"""

from __future__ import annotations

from pathlib import Path

from mlxlab.cli.common import guarded, parser_for
from mlxlab.cli.runs_list import (
    KEY_METRICS,
    format_duration,
    format_number,
    format_time,
    print_table,
    show_sweep,
)
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import resolve_uri, sqlite_path
from mlxlab.tracking.mlflow.stale import mark_dead_runs_quietly


def main(argv: list[str], action: str = "show") -> int:
    parser = parser_for(f"runs {action}", __doc__)
    many = action == "compare"
    parser.add_argument("runs", nargs="+" if many else None, metavar="RUN",
                        help="MLflow run id(s) or run folder(s) (outputs/<task>/<time>)")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    if many:
        parser.add_argument("--all-params", action="store_true",
                            help="every param, not only those that differ")
    args = parser.parse_args(argv)
    if many and len(args.runs) < 2:
        parser.error("compare needs two or more runs")
    return guarded(f"runs {action}", lambda: compare(args) if many else show(args))


def _client(uri_arg: str | None):
    from mlflow import MlflowClient  # ~2 s to import: not for --help or a usage error

    uri = resolve_uri(uri_arg)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(f"no MLflow store at {db}: train a tracked run first, or pass --uri")
    mark_dead_runs_quietly(uri)  # what it shows says the truth about runs whose process died
    return MlflowClient(tracking_uri=uri), uri


def checkpoints(folder: Path) -> dict[str, tuple[int, Path]]:
    """{"best": (step, path), "last": (step, path)} of a run folder's committed checkpoints."""
    # checkpoint/ and runs/ load MLX (~0.2 s): only for a run folder
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.runs import choose_checkpoint

    found = {}
    for which in ("best", "last"):
        try:
            ckpt = choose_checkpoint(folder, which)
        except (FileNotFoundError, ValueError):
            continue
        found[which] = (CheckpointState.read(ckpt).step, ckpt)
    return found


def _resolve(client, uri: str, ref: str):
    """(MLflow run or None, run folder or None) for a run id or a run folder."""
    from mlxlab.checkpoint import CheckpointState  # loads MLX (~0.1 s): as checkpoints() below

    folder = Path(ref).expanduser()
    if folder.is_dir():
        run_id = None
        for _, ckpt in checkpoints(folder).values():
            run_id = run_id or CheckpointState.read(ckpt).run_id
        run = None
        if run_id:
            try:
                run = client.get_run(run_id)
            except Exception:  # an untracked run, or one tracked in another store
                run = None
        return run, folder
    try:
        run = client.get_run(ref)
    except Exception:
        raise ValueError(f"{ref} is neither a run folder nor a run id in {uri}: `mlxlab runs "
                         "list` shows the run ids") from None
    tagged = run.data.tags.get(T.RUN_DIR)
    return run, Path(tagged) if tagged and Path(tagged).is_dir() else None


def metric_names(runs: list) -> list[str]:
    """Key metrics first, then any other logged metric; best/ copies are shown beside them."""
    names = {m for r in runs if r is not None for m in r.data.metrics}
    plain = {m[len("best/"):] if m.startswith("best/") else m for m in names}
    return [m for m in KEY_METRICS if m in plain] + sorted(plain - set(KEY_METRICS))


def _best(run, metric: str) -> str:
    return format_number(run.data.metrics.get(f"best/{metric}")) if run is not None else "-"


def _last(run, metric: str) -> str:
    return format_number(run.data.metrics.get(metric)) if run is not None else "-"


def show(args) -> int:
    client, uri = _client(args.uri)
    run, folder = _resolve(client, uri, args.runs)
    if run is not None:
        info = run.info
        print(f"run {info.run_id} {info.run_name!r} ({info.status}), started "
              f"{format_time(info.start_time)}, {format_duration(run)}")
        print(f"  experiment {client.get_experiment(info.experiment_id).name!r}; store {uri}")
    else:
        print(f"run folder {folder}: no MLflow run of it in {uri} (trained with tracking=none?)")
    if folder is not None:
        found = checkpoints(folder)
        print(f"  folder {folder}")
        for which, (step, ckpt) in found.items():
            print(f"  {which} checkpoint: step {step} ({ckpt})")
        if not found:
            print("  no committed checkpoint")
    if run is None:
        return 0
    metrics = metric_names([run])
    if metrics:
        print("\nmetrics (best = the best checkpoint's value, last = the last logged)")
        print_table(["metric", "best", "last"], [[m, _best(run, m), _last(run, m)] for m in metrics])
    if run.data.params:
        print("\nparams")
        print_table(["param", "value"], [[k, v] for k, v in sorted(run.data.params.items())])
    if run.data.tags.get(T.ROLE) == "sweep":
        print()
        show_sweep(client, [client.get_experiment(run.info.experiment_id)], run.info.run_id, None)
    return 0


def compare(args) -> int:
    client, uri = _client(args.uri)
    pairs = [_resolve(client, uri, ref) for ref in args.runs]
    runs = [run for run, _ in pairs]
    missing = [ref for ref, run in zip(args.runs, runs) if run is None]
    if missing:
        raise ValueError(f"{', '.join(missing)}: no MLflow run in {uri} to compare")
    header = ["", *(r.info.run_id[:12] for r in runs)]
    rows = [["name", *(r.info.run_name or "" for r in runs)],
            ["status", *(r.info.status for r in runs)]]
    for metric in metric_names(runs):
        for kind, value, key in (("best", _best, f"best/{metric}"), ("last", _last, metric)):
            if any(key in r.data.metrics for r in runs):  # no row of dashes
                rows.append([f"{kind} {metric}", *(value(r, metric) for r in runs)])
    keys = sorted({k for r in runs for k in r.data.params})
    if not args.all_params:
        keys = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    rows += [[k, *(r.data.params.get(k, "-") for r in runs)] for k in keys]
    print_table(header, rows)
    print(f"  best = the best checkpoint's value, last = the last logged; "
          f"{'all params' if args.all_params else 'params that differ'} below the metrics")
    return 0
