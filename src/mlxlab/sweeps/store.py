"""Sweep queries: a sweep's runs and their table. Read only: a missing sqlite store or
experiment is not created here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mlxlab.tracking import tags as T

LATEST_CANDIDATES = 50  # newest sweeps looked at for "latest" (skipping failed and empty ones)


def sweep_children(client: Any, parent_run_id: str) -> list:
    """The runs tagged with `parent_run_id` as their parent, and the finished jobs of earlier
    sweeps it adopted (sweeps/jobs.py: a grown sweep), oldest first."""
    parent = client.get_run(parent_run_id)
    found = {}
    for query in (f"tags.`{T.PARENT_RUN}` = '{parent_run_id}'",
                  f"tags.`{T.ADOPTED_BY_PREFIX}{parent_run_id}` = 'true'"):
        for run in client.search_runs([parent.info.experiment_id], filter_string=query,
                                      max_results=50000):
            found[run.info.run_id] = run
    return sorted(found.values(), key=lambda r: r.info.start_time)


def run_value(run: Any, key: str) -> str | None:
    """A run's value for a config key: its param, else a tag, else its Hydra choice tag."""
    for source, name in (
        (run.data.params, key),
        (run.data.tags, key),
        (run.data.tags, T.CHOICE_PREFIX + key),
    ):
        if name in source:
            return source[name]
    return None


def swept_keys(runs: Sequence, candidates: Sequence[str] = ()) -> list[str]:
    """Which keys a sweep varied: the candidates (the sweep's overrides) that take several
    values across runs (all found candidates for a one-job sweep); without candidates, every
    param that differs between runs, bar output paths."""
    found = [k for k in candidates if any(run_value(r, k) is not None for r in runs)]
    varying = [k for k in found if len({run_value(r, k) for r in runs}) > 1]
    if found:
        return varying or found
    names = sorted({k for r in runs for k in r.data.params})
    return [
        k
        for k in names
        if len({r.data.params.get(k) for r in runs}) > 1 and "dir" not in k and "path" not in k
    ]


def metric_mode(metric: str, mode: str | None = None) -> str:
    """'max' or 'min': an explicit mode ('max'/'min'/'maximize'/'minimize') wins; else the
    metric's definition (objectives/catalog.py: `val/logps/rejected` is lower-is-better though
    its name says nothing of it); a metric mlxlab does not define is a ValueError
    asking for the mode, never a guess from its name."""
    if mode:
        mode = str(mode).lower()
        if mode not in ("max", "min", "maximize", "minimize"):
            raise ValueError(f"optimized metric mode must be 'max' or 'min', got {mode!r}")
        return mode[:3]
    from mlxlab.objectives.catalog import metric_definition  # the objectives' imports: when asked

    definition = metric_definition(metric)
    if definition is None:
        raise ValueError(f"which way {metric} improves is not known to mlxlab: say it with "
                         "--mode min|max")
    return definition.mode


def sweep_table(runs: Sequence, metric: str, keys: Sequence[str], mode: str = "max") -> list[dict]:
    """One row per run (run_id, name, status, metric, each key): finished runs best first,
    then unfinished (failed, running) ones, runs without a finite metric value last in each.
    A run's `best/<metric>` (what train.py returned, when the trainer logs it) wins over the
    metric's last logged value."""
    rows = []
    for run in runs:
        value = run.data.metrics.get(f"best/{metric}", run.data.metrics.get(metric))
        row = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "state": run.data.tags.get(T.TRIAL_STATE),  # PRUNED: a search stopped it early
            metric: value,
            "seed": run.data.params.get("seed"),
        }
        row.update({k: run_value(run, k) for k in keys})
        rows.append(row)

    def order(row: dict) -> tuple:
        value, unfinished = row[metric], row["status"] != "FINISHED"
        if value is None or not math.isfinite(value):
            return (unfinished, 1, 0.0)
        return (unfinished, 0, -value if mode == "max" else value)

    return sorted(rows, key=order)


def find_sweep_parent(client, sweep: str, experiment_ids: list[str] | None = None):
    """The parent run of a sweep: `sweep` is its run id, or "latest": the newest sweep with a
    job that finished or still runs. A sweep refused at its start, one that failed before any
    job ran, or one whose every job failed is never `latest`: it would hide the good sweep
    before it. A sweep with some failed jobs still is (its parent says FAILED, its finished
    jobs compare)."""
    if sweep != "latest":
        return client.get_run(sweep)
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{T.ROLE}` = 'sweep'",
        max_results=LATEST_CANDIDATES,
        order_by=["attributes.start_time DESC"],
    )
    for parent in parents:
        for status in ("FINISHED", "RUNNING"):
            if client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.`{T.PARENT_RUN}` = '{parent.info.run_id}' "
                f"and attributes.status = '{status}'",
                max_results=1,
            ):
                return parent
    raise SystemExit("no sweep (multirun) parent run with a finished job in this store")
