"""`mlxlab runs compare A B` on two runs that scored the same evaluation tasks: their scores
paired example by example (evaluation/paired.py), B against A.

    mlxlab runs compare <base eval run> <fine-tune run>          # the best evaluation's scores
    mlxlab runs compare <run> <run> --last --json                # the last evaluation's

Two configs of a sweep whose runs scored tasks (`mlxlab runs compare latest:g1 latest:g2`) get
the same over their seeds (`replicate_tasks`): each example's score averaged over a group's
seeds, a paired bootstrap over the examples, McNemar's test per seed both ran.

A and B are MLflow run ids or run folders: an `mlxlab eval` run, or a training run with
eval.tasks (its best evaluation, or --last). For each task both scored and each score: the
examples both have (by id), A's and B's means, B - A with its 95 % interval (paired bootstrap
over the examples), McNemar's exact test for right/wrong scores (the bootstrap's p for
continuous ones, a perplexity task's loss per text) and a one-line verdict.
"""

from __future__ import annotations

import json
from typing import Any

from mlxlab.cli.runs_list import print_table


def compare_examples(client: Any, uri: str, refs: list[str], last: bool, metric: str | None,
                     as_json: bool) -> int | None:
    """Print the paired comparison and return 0; None when either run scored no task (the
    caller shows the runs side by side instead)."""
    from mlxlab.cli.runs_show import _resolve
    from mlxlab.evaluation.paired import pair_runs
    from mlxlab.evaluation.run_scores import run_scores

    which = "last" if last else "best"
    sides = [_resolve(client, uri, ref) for ref in refs]
    scores = [run_scores(client, run, folder, which) for run, folder in sides]
    if not all(scores):
        return None
    paired = pair_runs(*scores)
    if metric:
        wanted = metric.removeprefix("eval/")
        paired = [p for p in paired if f"{p.task}/{p.metric}" == wanted or p.metric == wanted]
        if not paired:
            raise ValueError(f"--metric {metric}: no paired score of that name (e.g. "
                             f"eval/<task>/acc)")
    names = [_name(run, ref) for (run, _), ref in zip(sides, refs)]
    if as_json:
        print(json.dumps({"a": names[0], "b": names[1], "which": which,
                          "paired": [p.as_dict() for p in paired]}, indent=2))
        return 0
    from mlxlab.evaluation.paired import verdict

    print(f"A = {names[0]}\nB = {names[1]}\ntask scores paired by example id "
          f"({which} evaluation of a training run); B - A with its 95 % interval")
    print_table(["task", "score", "n", "A", "B", "B - A", "95 % CI", "test", "p", "verdict"], [
        [p.task, p.metric, str(p.n), f"{p.a:.4f}", f"{p.b:.4f}", f"{p.diff:+.4f}",
         f"[{p.low:+.4f}, {p.high:+.4f}]", p.test, f"{p.p:.3g}", short_verdict(p)]
        for p in paired])
    for p in paired:
        print(f"  verdict: {verdict(p)}")
    return 0


def short_verdict(p: Any) -> str:
    """The verdict in the table's words: B gained, B lost, or no difference detected (the
    forgetting check reads the fine-tune's task and a general task in one table)."""
    from mlxlab.evaluation.paired import verdict

    line = verdict(p)
    if line.startswith("B is better"):
        return "B gained"
    if line.startswith("A is better"):
        return "B lost"
    return "no difference"


def _name(run: Any, ref: str) -> str:
    if run is None:
        return ref
    return f"{run.info.run_id} ({run.info.run_name})"


def replicate_tasks(client: Any, a: Any, b: Any, which: str) -> list | None:
    """Two groups of a sweep (tracking/mlflow/replicates.py Group) paired over the examples of
    the tasks their finished runs scored (evaluation/paired.py pair_replicates); None when
    they scored none."""
    from mlxlab.evaluation.paired import pair_replicates

    a_scores, b_scores = group_scores(client, a, which), group_scores(client, b, which)
    if not a_scores or not b_scores:
        return None
    return pair_replicates(a_scores, b_scores) or None


def group_scores(client: Any, group: Any, which: str) -> dict:
    """{seed: {task: SavedTask}} of a group's finished runs that scored evaluation tasks."""
    from mlxlab.evaluation.run_scores import run_scores
    from mlxlab.sweeps.groups import seed_of

    found = {}
    for run in group.runs:
        if run.info.status == "FINISHED" and any(m.startswith("eval/") for m in run.data.metrics):
            saved = run_scores(client, run, None, which)
            if saved:
                found[seed_of(run)] = saved
    return found


def compare_run_with_sweep(client: Any, uri: str, run_ref: str, group: Any, which: str,
                           metric: str | None, as_json: bool) -> int:
    """`mlxlab runs compare <base run> <sweep>`: a run that scored evaluation tasks (a base
    model's `mlxlab eval`, or a training run with eval.tasks) against one config of a sweep over
    its seeds, on the examples all of them scored: each example's score averaged over the seeds,
    B - A with its paired bootstrap interval over the examples, and each seed against the base
    on its own (McNemar's exact test for right/wrong scores)."""
    from mlxlab.cli.runs_show import _resolve
    from mlxlab.evaluation.paired import pair_replicates, pair_runs, replicate_verdict, verdict
    from mlxlab.evaluation.run_scores import run_scores

    run, folder = _resolve(client, uri, run_ref)
    base, seeds = run_scores(client, run, folder, which), group_scores(client, group, which)
    if not base or not seeds:
        raise ValueError(f"{run_ref if not base else 'the sweep'} scored no evaluation task: "
                         "score both with the same eval.tasks (or mlxlab eval --tasks)")
    wanted = (metric or "").removeprefix("eval/")

    def keep(p: Any) -> bool:
        return not wanted or f"{p.task}/{p.metric}" == wanted or p.metric == wanted

    paired = [p for p in pair_replicates({"base": base}, seeds) if keep(p)]
    per_seed = {s: [p for p in pair_runs(base, scores) if keep(p)] for s, scores in seeds.items()}
    if as_json:
        print(json.dumps({"a": _name(run, run_ref), "b": group.label, "which": which,
                          "paired": [p.as_dict() for p in paired],
                          "per_seed": {s: [p.as_dict() for p in ps] for s, ps in per_seed.items()}},
                         indent=2, default=str))
        return 0
    print(f"A = {_name(run, run_ref)}\nB = {group.gid}: {group.label}, {len(seeds)} seeds\n"
          f"task scores paired by example id, B averaged over its seeds; B - A with its 95 % "
          f"interval (paired bootstrap over the examples)")
    print_table(["task", "score", "n", "A", "B", "B - A", "95 % CI", "p"], [
        [p.task, p.metric, str(p.n), f"{p.a:.4f}", f"{p.b:.4f}", f"{p.diff:+.4f}",
         f"[{p.low:+.4f}, {p.high:+.4f}]", f"{p.p:.3g}"] for p in paired])
    for p in paired:
        print(f"  verdict: {replicate_verdict(p)}")
    for s, ps in per_seed.items():
        for p in ps:
            print(f"  seed {s}: {verdict(p)}")
    return 0


def print_replicate_tasks(paired: list | None) -> None:
    for p in paired or []:
        from mlxlab.evaluation.paired import replicate_verdict

        print(f"  task {p.task} {p.metric}: A {p.a:.4f}, B {p.b:.4f} (per example, averaged "
              f"over seeds); {replicate_verdict(p)}")
        for m in p.mcnemar[:3]:
            print(f"    McNemar, seed {m['seed']}: {m['only_a']} only A right, {m['only_b']} "
                  f"only B right, exact p={m['p']:.3g}")
