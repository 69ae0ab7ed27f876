"""A sweep's runs as groups of replicates, and their summary on the sweep's parent run.

Children of a sweep that differ only in the seed are one group (`g1`, `g2`, ... in launch
order, labelled by the swept values: `model.pooler=true`). For the optimized metric and the
other validation metrics, each group gets n, mean, std and the 95 % interval of the best
checkpoint's value (`best/<metric>`) and of the last logged one; per evaluation step, the mean
and interval of each curve. The parent run holds them as ordinary MLflow metrics (so MLflow's
own charts draw each band's mean, ci_low and ci_high as three lines; sweeps/verdict.py draws
them as one shaded band in a PNG), a table (CSV and markdown) and a PNG; `mlxlab runs list --sweep`
and `mlxlab runs compare` read the same groups.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlab.stats import Summary, bands, summarize
from mlxlab.sweeps.store import run_value
from mlxlab.tracking import tags as T

SEED_KEY = "seed"
WHICH = ("best", "last")  # the best checkpoint's value, the last logged one


@dataclass
class Group:
    """Runs of one config (every swept key but the seed equal)."""

    gid: str
    label: str
    values: dict[str, str | None]
    runs: list = field(default_factory=list)

    def metric(self, metric: str, which: str = "best") -> dict[str, float]:
        """{seed: value} of the finished runs that have the metric."""
        found = {}
        for run in self.runs:
            if run.info.status != "FINISHED":
                continue
            value = metric_value(run, metric, which)
            if value is not None and math.isfinite(value):
                found[seed_of(run)] = value
        return found

    def summary(self, metric: str, which: str = "best") -> Summary:
        """n, mean, std and the t interval over the seeds, cut to the metric's range."""
        return summarize(self.metric(metric, which).values(), bounds=metric_bounds(metric))


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric's values can take (an accuracy's [0, 1]), None when unbounded."""
    from mlxlab.objectives.catalog import metric_definition  # the objectives' imports: when asked

    definition = metric_definition(metric)
    return definition.bounds if definition is not None else None


def seed_of(run: Any) -> str:
    return str(run.data.params.get(SEED_KEY, run.info.run_id))


def metric_value(run: Any, metric: str, which: str = "best") -> float | None:
    """The best checkpoint's value (`best/<metric>`, else the last when the run logged no
    best), or the last logged value."""
    metrics = run.data.metrics
    if which == "best" and f"best/{metric}" in metrics:
        return metrics[f"best/{metric}"]
    return metrics.get(metric)


def group_runs(runs: Sequence, keys: Sequence[str]) -> list[Group]:
    """Runs grouped by their values of `keys` minus the seed, groups in order of first run."""
    keys = [k for k in keys if k != SEED_KEY]
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {k: run_value(run, k) for k in keys}
        key = tuple(values.values())
        if key not in groups:
            label = " ".join(f"{k}={v}" for k, v in values.items()) or "all runs"
            groups[key] = Group(f"g{len(groups) + 1}", label, values)
        groups[key].runs.append(run)
    return list(groups.values())


def monitored(runs: Sequence, metric: str) -> list[str]:
    """The optimized metric first, then every other validation metric the runs logged."""
    names = {k for r in runs for k in r.data.metrics if k.startswith("val/")}
    return [metric, *sorted(names - {metric})]


def rank(groups: Sequence[Group], metric: str, mode: str, min_n: int = 1) -> list[Group]:
    """Groups with at least `min_n` finished replicates, best mean first."""
    scored = [(g, g.summary(metric)) for g in groups]
    scored = [(g, s) for g, s in scored if s.n >= min_n and math.isfinite(s.mean)]
    scored.sort(key=lambda gs: -gs[1].mean if mode == "max" else gs[1].mean)
    return [g for g, _ in scored]


def winner(groups: Sequence[Group], metric: str, mode: str) -> Group | None:
    """The best mean among the groups with the most evidence: those with >= 2 replicates when
    any has them (a search's re-run configs), else every group."""
    replicated = rank(groups, metric, mode, min_n=2)
    ranked = replicated or rank(groups, metric, mode)
    return ranked[0] if ranked else None


# --- tables ------------------------------------------------------------------------------------


def table_rows(groups: Sequence[Group], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """A row per group, metric and which (best | last): n, mean, std, ci_low, ci_high."""
    rows = []
    for g in groups:
        for metric in metrics:
            for which in WHICH:
                s = g.summary(metric, which)
                if s.n:
                    rows.append({"group": g.gid, "config": g.label, "metric": metric,
                                 "which": which, **s.as_dict()})
    return rows


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def table_markdown(groups: Sequence[Group], metrics: Sequence[str]) -> str:
    """One line per group and metric: `mean ± half-width (n)` for best and last."""
    lines = ["| group | config | metric | best checkpoint: mean ± 95 % CI (n) | last: mean ± 95 % CI (n) |",
             "|---|---|---|---|---|"]
    for g in groups:
        for metric in metrics:
            best, last = g.summary(metric, "best"), g.summary(metric, "last")
            if best.n or last.n:
                lines.append(f"| {g.gid} | `{g.label}` | {metric} | {best.text()} | {last.text()} |")
    return "\n".join(lines) + "\n"


# --- the parent run ------------------------------------------------------------------------------


def curve(client: Any, run_id: str, metric: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)
            if math.isfinite(m.value)}


def summary_metrics(client: Any, groups: Sequence[Group], metrics: Sequence[str],
                    now_ms: int) -> list:
    """MLflow Metric entities for the parent: per group `g1/best/<metric>/mean` (and std,
    ci_low, ci_high, n) and the per-step bands `g1/<metric>/mean|ci_low|ci_high`."""
    from mlflow.entities import Metric

    out = []
    for g in groups:
        for metric in metrics:
            for which in WHICH:
                s = g.summary(metric, which)
                if not s.n:
                    continue
                for name, value in s.as_dict().items():
                    if not isinstance(value, bool) and math.isfinite(value):  # not ci_cut
                        out.append(Metric(f"{g.gid}/{which}/{metric}/{name}", float(value), now_ms, 0))
            finished = [r for r in g.runs if r.info.status == "FINISHED"]
            if len(finished) < 2:
                continue
            for step, s in bands([curve(client, r.info.run_id, metric) for r in finished],
                                   bounds=metric_bounds(metric)).items():
                for name, value in (("mean", s.mean), ("ci_low", s.low), ("ci_high", s.high)):
                    if math.isfinite(value):
                        out.append(Metric(f"{g.gid}/{metric}/{name}", float(value), now_ms, step))
    return out


def log_summary(client: Any, parent_id: str, runs: Sequence, keys: Sequence[str], metric: str,
                mode: str, folder: Path, now_ms: int) -> Group | None:
    """Everything above onto the parent run, each child tagged with its group; returns the
    group with the best mean (None: no values), which only sweeps/verdict.py may call better."""
    from mlflow.entities import RunTag

    from mlxlab.tracking.mlflow.calls import MAX_TAGS_PER_BATCH, chunks
    from mlxlab.tracking.plots import replicates_png

    groups = group_runs(runs, keys)
    metrics = monitored(runs, metric)
    best = winner(groups, metric, mode)
    # tags, not params: a continued sweep may label its groups otherwise
    labels = [RunTag(f"{T.GROUP_PREFIX}{g.gid}", g.label[:6000]) for g in groups]
    for part in chunks(labels, MAX_TAGS_PER_BATCH):
        client.log_batch(parent_id, tags=part)
    for g in groups:  # each child says which config it replicates (the parent's group.gN)
        for run in g.runs:
            client.set_tag(run.info.run_id, T.GROUP, g.gid)
    for part in chunks(summary_metrics(client, groups, metrics, now_ms), 1000):
        client.log_batch(parent_id, metrics=part)
    rows = table_rows(groups, metrics)
    (folder / "groups.csv").write_text(table_csv(rows))
    (folder / "groups.md").write_text(table_markdown(groups, metrics))
    client.log_artifact(parent_id, str(folder / "groups.csv"), "replicates")
    client.log_artifact(parent_id, str(folder / "groups.md"), "replicates")
    png = replicates_png(
        [(g.label, g.metric(metric, "best")) for g in groups], metric,
        folder / f"replicates_{metric.replace('/', '_')}.png")
    client.log_artifact(parent_id, str(png), "plots")
    return best
