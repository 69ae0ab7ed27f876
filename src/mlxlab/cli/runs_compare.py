"""Is one config better than another, by how much, and how sure are we?

    mlxlab runs compare latest                   # every config of the newest sweep, pairwise
    mlxlab runs compare latest --baseline g1     # each config against g1
    mlxlab runs compare latest:g1 latest:g2      # two configs of one sweep
    mlxlab runs compare <sweep id> <sweep id>    # two sweeps of one config each, seed by seed
    mlxlab runs compare <run id> <run id> ...    # single runs side by side (metrics, params)
    mlxlab runs compare <base eval run> <fine-tune run> --json   # evaluation tasks, per example
    mlxlab runs compare <base eval run> latest   # the base against a sweep's seeds, per example

Two runs that scored the same evaluation tasks (`mlxlab eval`, or training with eval.tasks) are
paired example by example instead: McNemar's exact test for accuracies, a paired bootstrap for
continuous scores, B - A with its 95 % interval and a verdict (cli/runs_compare_tasks.py).

A config is a group of a sweep's runs that differ only in the seed (`mlxlab-train -m
replicates=10 model.pooler=null,true`); SWEEP:GROUP names one by its id (g1) or its swept
values (latest:model.pooler=true). For each pair: the difference of the means with its 95 %
interval, the paired t test and the Wilcoxon signed-rank test over the seeds both ran (Welch's
t when they share fewer than two), for classifiers scored on the same validation rows a
paired bootstrap over the rows and McNemar's test per seed, and a verdict; with more than one
pair, Holm-corrected p-values. When no difference is detected it says how many seeds would
resolve one (--delta, default the observed difference). --json prints it all as JSON.

Which way the metric improves is the sweep's optimized_mode for its optimized metric, else the
metric's definition (its objective's, objectives/catalog.py: val/logps/rejected is
lower-is-better), never a guess from its name; --mode min|max says it for any metric. On the sweep's own metric (its
optimized_metric, best checkpoints) the sweep's verdict (its leader against every other config)
is written again onto the sweep's parent run: its MLflow description, tags mlxlab.verdict and
mlxlab.leader, comparison.json and a band PNG (--no-record leaves the store as it is). A
comparison on another metric, or of the last logged values, leaves the recorded verdict alone
unless --record asks for it to be replaced.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mlxlab.cli.common import guarded, parser_for
from mlxlab.cli.runs_list import format_number, print_table
from mlxlab.tracking import tags as T

GROUP_SEPARATOR = ":"


def main(argv: list[str]) -> int:
    parser = parser_for("runs compare", __doc__)
    parser.add_argument("refs", nargs="+", metavar="SWEEP[:GROUP]|RUN",
                        help="sweeps (run id or latest), groups of a sweep, or runs")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    parser.add_argument("--metric", help="metric (default: the one the sweep optimized)")
    parser.add_argument("--last", action="store_true",
                        help="compare the last logged values, not the best checkpoint's")
    parser.add_argument("--baseline", metavar="GROUP",
                        help="compare every other group against this one (g1, or swept values)")
    parser.add_argument("--delta", type=float,
                        help="the difference a power estimate is for (default: the observed one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--all-params", action="store_true",
                        help="runs side by side: every param, not only those that differ")
    parser.add_argument("--mode", choices=("min", "max"),
                        help="which way the metric improves (default: the sweep's optimized_mode "
                        "for its metric, else the metric's definition)")
    record = parser.add_mutually_exclusive_group()
    record.add_argument("--no-record", action="store_true",
                        help="do not write the verdict onto the sweep's parent run")
    record.add_argument("--record", action="store_true",
                        help="write this comparison's verdict onto the sweep's parent run even "
                        "on another metric than the sweep's (replacing the recorded one)")
    args = parser.parse_args(argv)
    return guarded("runs compare", lambda: run(args))


def run(args) -> int:
    """`mlxlab runs compare REF...`: which comparison the references ask for (a run against a
    sweep's config, runs side by side or paired by example, a sweep's configs), and it."""
    from mlxlab.cli.runs_show import _client

    client, uri = _client(args.uri)
    sweeps = [_is_sweep_ref(client, ref) for ref in args.refs]
    if len(args.refs) == 2 and sweeps.count(True) == 1:  # a base run against a sweep's config
        return run_against_sweep(client, uri, args, sweeps)
    if not any(sweeps):
        return compare_runs(client, uri, args)
    return compare_sweep_groups(client, args)


def compare_runs(client: Any, uri: str, args) -> int:
    """Runs side by side, or two runs that scored evaluation tasks paired by example."""
    from mlxlab.cli.runs_show import compare as side_by_side

    if len(args.refs) == 2:  # two runs that scored evaluation tasks: paired by example
        from mlxlab.cli.runs_compare_tasks import compare_examples

        done = compare_examples(client, uri, args.refs, args.last, args.metric, args.json)
        if done is not None:
            return done
    if len(args.refs) < 2:
        raise ValueError("compare needs two or more runs, or a sweep (e.g. latest)")
    args.runs = args.refs
    return side_by_side(args)


def compare_sweep_groups(client: Any, args) -> int:
    """A sweep's configs compared over their seeds (and their evaluation tasks by example), the
    verdict recorded where it is the sweep's own; printed as a table or JSON."""
    groups, metric, mode, optimized = resolve_groups(client, args.refs, args.metric, args.mode)
    baseline = pick(groups, args.baseline) if args.baseline else None
    if len(groups) < 2:
        raise ValueError(f"one config ({groups[0].gid}: {groups[0].label}) found: compare needs "
                         "two, e.g. a sweep over two values with replicates=N")
    from mlxlab.sweeps.compare import compare_groups

    which = "last" if args.last else "best"
    # the row-level tests compare the best checkpoints' correctness: they answer for accuracy
    rows_client = client if metric.endswith("accuracy") and not args.last else None
    results = compare_groups(groups, metric, which, baseline, args.delta, rows_client)
    from mlxlab.cli.runs_compare_tasks import replicate_tasks

    tasks = [replicate_tasks(client, c.a, c.b, which) for c in results]  # evaluation tasks
    own = metric == optimized and not args.last
    recorded = maybe_record(client, args, metric, mode, which, own)
    if args.json:
        out = as_json(groups, results, metric, which, mode)
        for entry, paired in zip(out["comparisons"], tasks):
            if paired:
                entry["tasks"] = [p.as_dict() for p in paired]
        if recorded is not None:  # what the parent run now holds (comparison.json)
            out["sweep_verdict"] = {"parent_run_id": recorded[0], **recorded[1]}
        print(json.dumps(out, indent=2, default=str))
        return 0
    print_group_comparisons(groups, results, tasks, metric, mode, args.last)
    print_recorded(recorded, own, args.no_record, optimized)
    return 0


def print_group_comparisons(groups: list, results: list, tasks: list, metric: str, mode: str,
                            last: bool) -> None:
    """Each config's mean and interval, then each comparison: the difference, its tests, the
    rows' and the tasks' pairings, the verdict."""
    from mlxlab.cli.runs_compare_tasks import print_replicate_tasks
    from mlxlab.sweeps.compare import verdict

    which = "last" if last else "best"
    print(f"{metric} ({'last logged' if last else 'best checkpoint'}), "
          f"{'higher' if mode == 'max' else 'lower'} is better; means with 95 % Student-t "
          "intervals over seeds (cut to the metric's range where they would leave it)")
    print_table(["group", "config", "n", "mean", "95 % CI", "sd"], [
        [g.gid, g.label, str(s.n), format_number(s.mean),
         f"[{format_number(s.low)}, {format_number(s.high)}]", format_number(s.std)]
        for g in groups for s in [g.summary(metric, which)]])
    several = len(results) > 1
    for c, paired in zip(results, tasks):
        d = c.diff
        print(f"\n{c.b.gid} - {c.a.gid}: {d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]  "
              + (f"paired t p={d.t_p:.3g}" if d.paired else f"Welch t p={d.t_p:.3g}")
              + (f" (Holm {c.t_p_holm:.3g})" if several else "")
              + (f", Wilcoxon p={d.wilcoxon_p:.3g} ({d.wilcoxon_method}, n={d.wilcoxon_n})"
                 if d.wilcoxon_p is not None else "")
              + (f" (Holm {c.wilcoxon_p_holm:.3g})" if several and c.wilcoxon_p_holm is not None
                 else "")
              + (f", {d.n_pairs} seed pairs" if d.paired else f", n={d.n_a} and {d.n_b}"))
        print_rows(c.rows)
        print_replicate_tasks(paired)
        print(f"  verdict: {verdict(c, metric, mode)}")


def print_recorded(recorded: tuple[str, dict] | None, own: bool, no_record: bool,
                   optimized: str) -> None:
    """Where the sweep's verdict now stands: recorded on its parent run, or left as it was."""
    if recorded is not None:
        from mlxlab.sweeps.verdict import leader_tag

        parent_id, result = recorded
        print(f"\nsweep verdict ({len(result['comparisons'])} comparison(s) with the leader): "
              f"{result['verdict']}; leader {leader_tag(result).split(':')[0]}; recorded on parent run "
              f"{parent_id} (its description, tags mlxlab.verdict / mlxlab.leader, "
              f"comparison.json)")
    elif not own and not no_record:
        print(f"\nthe sweep's recorded verdict (on {optimized}, best checkpoints) is left as it "
              "is: --record replaces it with this comparison's")


def maybe_record(client: Any, args, metric: str, mode: str, which: str, own: bool
                 ) -> tuple[str, dict] | None:
    """The verdict recorded on the sweep's parent run when it is on the sweep's own metric
    (`own`) or --record asks; a store that refuses the write is a warning."""
    if not (args.record or (own and not args.no_record)):
        return None
    try:
        return record_verdict(client, args.refs, metric, mode, which)
    except Exception as e:  # noqa: BLE001 - a read-only store: the comparison still prints
        print(f"mlxlab runs compare: warning: the verdict was not recorded on the sweep's "
              f"parent run ({type(e).__name__}: {e}); --no-record skips it", file=sys.stderr)
        return None


def run_against_sweep(client: Any, uri: str, args, sweeps: list[bool]) -> int:
    """`compare <run> <sweep>` (either order): the run's evaluation-task scores against the
    sweep's one config over its seeds (runs_compare_tasks.compare_run_with_sweep)."""
    from mlxlab.cli.runs_compare_tasks import compare_run_with_sweep

    run_ref, sweep_ref = args.refs if sweeps[1] else args.refs[::-1]
    groups, *_ = resolve_groups(client, [sweep_ref], args.metric, args.mode)
    if len(groups) != 1:
        raise ValueError(f"{sweep_ref} has {len(groups)} configs: name one to compare the run "
                         f"with, e.g. {sweep_ref}:{groups[0].gid}")
    return compare_run_with_sweep(client, uri, run_ref, groups[0],
                                  "last" if args.last else "best", args.metric, args.json)


def record_verdict(client: Any, refs: list[str], metric: str, mode: str, which: str
                   ) -> tuple[str, dict] | None:
    """The verdict of the one sweep `refs` name, over all its configs, onto its parent run
    (sweeps/verdict.py); None when the refs name several sweeps."""
    import shlex
    import tempfile
    from pathlib import Path

    from mlxlab.sweeps.store import find_sweep_parent
    from mlxlab.sweeps.verdict import record

    sweeps = {ref.split(GROUP_SEPARATOR, 1)[0] for ref in refs}
    if len(sweeps) != 1:
        return None
    parent = find_sweep_parent(client, sweeps.pop())
    command = "`mlxlab runs compare " + " ".join(shlex.quote(r) for r in refs) + "`"
    with tempfile.TemporaryDirectory() as tmp:
        result = record(client, parent.info.run_id, sweep_groups(client, parent), metric, mode,
                        Path(tmp), which, command=command)
    return parent.info.run_id, result


def print_rows(rows: dict[str, Any] | None) -> None:
    if not rows:
        return
    if "skipped" in rows:
        print(f"  per row: {rows['skipped']}")
        return
    b = rows["bootstrap"]
    print(f"  per row ({rows['rows']} validation rows, correctness averaged over seeds): "
          f"accuracy {b['diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}], paired "
          f"bootstrap interval, randomization test p={b['p']:.3g}")
    for m in rows.get("mcnemar", [])[:3]:
        print(f"  McNemar, seed {m['seed']}: {m['only_a']} rows only A right, {m['only_b']} only "
              f"B right, exact p={m['p']:.3g}")
    if len(rows.get("mcnemar", [])) > 3:
        print(f"  ... {len(rows['mcnemar']) - 3} more seeds in --json")


def as_json(groups, results, metric: str, which: str, mode: str) -> dict[str, Any]:
    return {
        "metric": metric, "which": which, "mode": mode,
        "groups": [{"group": g.gid, "config": g.label, "values": g.metric(metric, which),
                    **g.summary(metric, which).as_dict()} for g in groups],
        "comparisons": [{**c.as_dict(), "verdict": _verdict(c, metric, mode)} for c in results],
    }


def _verdict(c, metric: str, mode: str) -> str:
    from mlxlab.sweeps.compare import verdict

    return verdict(c, metric, mode)


# --- which groups ------------------------------------------------------------------------------


def _is_sweep_ref(client: Any, ref: str) -> bool:
    sweep = ref.split(GROUP_SEPARATOR, 1)[0]
    if sweep == "latest" or GROUP_SEPARATOR in ref:
        return True
    try:
        return client.get_run(sweep).data.tags.get(T.ROLE) == "sweep"
    except Exception:  # noqa: BLE001 - a run folder or an unknown id: not a sweep
        return False


def resolve_groups(client: Any, refs: list[str], metric: str | None, mode: str | None = None):
    """The groups the references name, the metric, its mode (given, else the first sweep's for
    its optimized metric, else the metric's definition) and the sweep's optimized metric."""
    from mlxlab.sweeps.store import find_sweep_parent, metric_mode

    groups, seen = [], {}
    for ref in refs:
        sweep, _, name = ref.partition(GROUP_SEPARATOR)
        if sweep not in seen:
            parent = find_sweep_parent(client, sweep)
            seen[sweep] = (parent, sweep_groups(client, parent))
        parent, found = seen[sweep]
        if name:
            groups.append(pick(found, name))
        elif len(refs) == 1:
            groups.extend(found)
        elif len(found) == 1:
            groups.append(found[0])
        else:
            listed = "; ".join(f"{g.gid}: {g.label}" for g in found)
            raise ValueError(f"sweep {parent.info.run_id[:12]} has {len(found)} configs "
                             f"({listed}): name one, e.g. {sweep}:{found[0].gid}")
    if len(seen) > 1:  # the same gid in two sweeps: say which sweep
        for g in groups:
            g.gid = f"{g.gid}@{_sweep_of(g)[:8]}"
    first = next(iter(seen.values()))[0]
    optimized = first.data.tags.get(T.OPTIMIZED_METRIC)
    metric = metric or optimized or "val/accuracy"
    mode = metric_mode(metric, mode or (first.data.tags.get(T.OPTIMIZED_MODE)
                                        if metric == optimized else None))
    return groups, metric, mode, optimized or "val/accuracy"


def sweep_groups(client: Any, parent: Any) -> list:
    from mlxlab.sweeps.groups import group_runs
    from mlxlab.sweeps.store import sweep_children, swept_keys

    children = sweep_children(client, parent.info.run_id)
    if not children:
        raise ValueError(f"sweep {parent.info.run_id} has no runs")
    keys = swept_keys(children, json.loads(parent.data.tags.get(T.SWEEP_PARAMS, "[]")))
    return group_runs(children, keys)


def pick(groups: list, name: str):
    """A group by id (g2) or by its swept values (model.pooler=true; null and None alike)."""
    for g in groups:
        if g.gid.split("@")[0] == name:
            return g
    wanted = _normal(name)
    matches = [g for g in groups if wanted and set(wanted) <= set(_normal(g.label))]
    if len(matches) == 1:
        return matches[0]
    listed = "; ".join(f"{g.gid}: {g.label}" for g in groups)
    raise ValueError(f"{name!r} names {'no' if not matches else 'more than one'} config of the "
                     f"sweep: use one of {listed}")


def _normal(label: str) -> list[str]:
    out = []
    for part in label.split():
        key, _, value = part.partition("=")
        value = {"none": "null", "true": "true", "false": "false"}.get(value.lower(), value)
        out.append(f"{key}={value}")
    return out


def _sweep_of(group) -> str:
    return group.runs[0].data.tags.get(T.PARENT_RUN, "") if group.runs else ""
