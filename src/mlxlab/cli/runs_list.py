"""List the experiments and recent runs of the central MLflow store, or one sweep as a table.

    mlxlab runs list                                # each experiment, newest runs first
    mlxlab runs list --experiment train --limit 30
    mlxlab runs list --sweep latest                 # newest sweep, best run first
    mlxlab runs list --sweep <parent run id> --metric val/loss

The store is --uri, else $MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db.
Validation metrics are the best checkpoint's (`best/<metric>`, what a run's closing line and
the sweep table show) unless --last asks for the last logged values; every column says which.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from mlxlab.cli.common import guarded, parser_for
from mlxlab.sweeps.groups import group_runs
from mlxlab.sweeps.store import (
    find_sweep_parent,
    metric_mode,
    sweep_children,
    sweep_table,
    swept_keys,
)
from mlxlab.tracking import tags as T
from mlxlab.tracking.mlflow import resolve_uri, sqlite_path
from mlxlab.tracking.mlflow.stale import mark_dead_runs

KEY_METRICS = ["val/accuracy", "val/f1", "val/roc_auc", "val/loss", "val/perplexity", "train/loss"]
MAX_METRIC_COLUMNS = 4


def main(argv: list[str]) -> int:
    parser = parser_for("runs list", __doc__)
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument("--experiment", help="only this experiment (name)")
    parser.add_argument("--limit", type=int, default=10, help="runs shown per experiment")
    parser.add_argument("--sweep", metavar="RUN_ID|latest", help="show one sweep as a table")
    parser.add_argument("--metric", help="sweep metric (default: the one the sweep optimized)")
    parser.add_argument("--last", action="store_true",
                        help="show the last logged metric values instead of the best checkpoint's")
    args = parser.parse_args(argv)
    return guarded("runs list", lambda: list_runs(args))


def list_runs(args) -> int:
    uri = resolve_uri(args.uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():  # don't create an empty store just to list it
        print(f"no MLflow store at {db} (run a training first, or pass --uri)")
        return 0
    from mlflow import MlflowClient  # ~2 s to import: not for --help or a usage error

    client = MlflowClient(tracking_uri=uri)
    mark_dead_runs(uri, args.experiment)  # RUNNING runs whose process died: KILLED
    experiments = client.search_experiments()
    if args.experiment:
        experiments = [e for e in experiments if e.name == args.experiment]
        if not experiments:
            raise ValueError(f"no experiment named {args.experiment!r} in {uri}: "
                             "`mlxlab runs list` shows the experiments")
    if args.sweep:
        return show_sweep(client, experiments, args.sweep, args.metric)
    print(f"MLflow store: {uri}")
    for experiment in experiments:
        runs = client.search_runs(
            [experiment.experiment_id],
            max_results=args.limit,
            order_by=["attributes.start_time DESC"],
        )
        if not runs and experiment.name == "Default":
            continue
        print(
            f"\nexperiment {experiment.name!r} (id {experiment.experiment_id}, "
            f"artifacts {experiment.artifact_location})"
        )
        if not runs:
            print("  no runs")
            continue
        metrics = [m for m in KEY_METRICS if any(m in r.data.metrics for r in runs)]
        metrics = metrics[:MAX_METRIC_COLUMNS]
        best = {m: not args.last and any(f"best/{m}" in r.data.metrics for r in runs)
                for m in metrics}
        header = ["run_id", "name", "status", "started", "duration", "sweep",
                  *(f"{'best' if best[m] else 'last'} {m}" for m in metrics)]
        rows = [
            [
                r.info.run_id,
                r.info.run_name or "",
                r.info.status,
                format_time(r.info.start_time),
                format_duration(r),
                _sweep_role(r),
                *(_shown(r, m, best[m]) for m in metrics),
            ]
            for r in runs
        ]
        print_table(header, rows)
        if any(cell.endswith("*") for row in rows for cell in row[6:]):
            print("  * no best checkpoint yet (unfinished run): the last logged value")
    return 0


def _shown(run, metric: str, best: bool) -> str:
    """The best checkpoint's value of `metric` (best=True), else its last logged value."""
    if best and f"best/{metric}" in run.data.metrics:
        return format_number(run.data.metrics[f"best/{metric}"])
    value = run.data.metrics.get(metric)
    return format_number(value) + ("*" if best and value is not None else "")


def show_sweep(client, experiments: list, sweep: str, metric: str | None) -> int:
    parent = find_sweep_parent(client, sweep, [e.experiment_id for e in experiments])
    tags = parent.data.tags
    children = sweep_children(client, parent.info.run_id)
    present = [m for m in KEY_METRICS if any(m in r.data.metrics for r in children)]
    metric = metric or tags.get(T.OPTIMIZED_METRIC) or (present[0] if present else "val/accuracy")
    # the sweep's mode is its optimized metric's; another metric's comes from its definition
    mode = metric_mode(metric, tags.get(T.OPTIMIZED_MODE)
                       if metric == tags.get(T.OPTIMIZED_METRIC) else None)
    keys = swept_keys(children, json.loads(tags.get(T.SWEEP_PARAMS, "[]")))
    print(
        f"sweep {parent.info.run_id} {parent.info.run_name!r} ({parent.info.status}), "
        f"started {format_time(parent.info.start_time)}"
    )
    print(
        f"  {len(children)} runs, sorted by the best checkpoint's {metric} ({mode}); "
        f"dir {tags.get(T.SWEEP_DIR, '?')}"
    )
    top = parent.data.metrics.get(f"top_run/{metric}", parent.data.metrics.get(f"best/{metric}"))
    if top is not None:  # one seed's maximum; the verdict says whether any config is better
        top_id = tags.get(T.TOP_RUN_ID, tags.get(T.BEST_RUN_ID, "?"))
        print(f"  top single run {metric} = {format_number(top)} (run {top_id})")
    if tags.get(T.VERDICT):
        print(f"  verdict on {tags.get(T.VERDICT_METRIC, metric)}: {tags[T.VERDICT]}; "
              f"leader {tags.get(T.LEADER, '-')}")
    groups = group_runs(children, keys)
    if any(len(g.runs) > 1 for g in groups):
        print_groups(groups, metric)
    gid = {r.info.run_id: g.gid for g in groups for r in g.runs}
    rows = sweep_table(children, metric, keys, mode)
    seeds = any(row.get("seed") for row in rows)  # a seed column where the runs logged one
    header = ["rank", "run_id", "group", "status", f"best {metric}", *(["seed"] if seeds else []),
              *(k for k in keys if k != "seed")]
    print_table(header, [
        [str(i + 1), row["run_id"], gid.get(row["run_id"], "-"), _state(row),
         format_number(row[metric]), *([str(row.get("seed") or "-")] if seeds else []),
         *(str(row[k]) for k in keys if k != "seed")]
        for i, row in enumerate(rows)])
    return 0


def print_groups(groups: list, metric: str) -> None:
    """Configs of the sweep (runs differing only in the seed): mean, 95 % interval, n."""
    print(f"\n  configs (groups of seeds): {metric}, mean ± 95 % CI half-width (n); "
          "`mlxlab runs compare` tests them")
    print_table(["group", "config", "best checkpoint", "last logged"], [
        [g.gid, g.label, g.summary(metric, "best").text(), g.summary(metric, "last").text()]
        for g in groups])
    print()


def _state(row: dict) -> str:
    """The run's status, PRUNED for a search's pruned trial."""
    return row.get("state") or row["status"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def format_number(value: float | None) -> str:
    """A metric value for a table: 4 decimals, or 4 significant digits when large; - for none."""
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"


def format_time(ms: int | None) -> str:
    """An MLflow timestamp (ms) as local date and time; - for none."""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def format_duration(run: Any) -> str:
    """How long a run took (s or min), `running` while it runs, - when it never ended."""
    if not run.info.end_time:
        return "running" if run.info.status == "RUNNING" else "-"
    seconds = (run.info.end_time - run.info.start_time) / 1000
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _sweep_role(run) -> str:
    if run.data.tags.get(T.ROLE) == "sweep":
        return "parent"
    parent = run.data.tags.get(T.PARENT_RUN)
    return f"child of {parent[:8]}" if parent else ""
