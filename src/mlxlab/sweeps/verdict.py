"""The verdict of a sweep, kept where people look: on its parent run in the store.

When a sweep ends (sweeps/callback.py), and again each time `mlxlab runs compare` reads it, the
parent run gets the comparison of its configs (groups of seeds) on one metric:

- the run's description (the `mlflow.note.content` tag, which MLflow shows on the run's
  Overview): each config's mean ± 95 % CI with n, the paired difference with its interval,
  the p-values with the test named, the verdict and the seeds that would resolve it;
- the same numbers as the artifact `comparison.json`;
- tags that never name a bare winner where the test finds none: `mlxlab.verdict` ("no
  detectable difference", "g1 better than g2", "too few replicates") and `mlxlab.leader`
  ("g1 (not significant)", "g1 (significant)", with its interval);
- a band picture per metric (`plots/bands_<metric>.png`): each config's mean per evaluation
  step with its interval shaded.

The leader is the config with the best mean among those with at least two finished seeds (a
search's re-run trials); every other such config is compared with it (compare.compare_groups:
paired t + Wilcoxon over seeds, the per-row tests for accuracy, Holm over the comparisons). The
leader is called better only when every comparison's Holm-adjusted paired t p is below alpha
and the seed pairs are enough for the signed-rank test to reach alpha at all (6 at 0.05):
below that the verdict is "too few replicates" and each comparison's line says why first.
Configs whose means are equal tie: none of them is the leader (`mlxlab.leader` says "none: g1
and g2 tie ..."); the first of them is the baseline the others are compared with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxlab import stats
from mlxlab.stats import bands
from mlxlab.sweeps.compare import Comparison, compare_groups, too_few, verdict
from mlxlab.sweeps.groups import Group, curve, metric_bounds
from mlxlab.tracking import tags as T

COMPARISON_FILE = "comparison.json"
NO_DIFFERENCE = "no detectable difference"
TOO_FEW = "too few replicates"
MAX_NOTE = 7900  # MLflow keeps tag values up to 8000 characters



def assess(groups: Sequence[Group], metric: str, mode: str, which: str = "best",
           client: Any = None, alpha: float = stats.ALPHA) -> dict[str, Any]:
    """The comparison of `groups` on `metric` as one JSON-able dict (comparison.json): the
    groups' summaries, the leader, each comparison with it, the verdict."""
    summaries = {g.gid: g.summary(metric, which) for g in groups}
    replicated = sorted((g for g in groups if summaries[g.gid].n >= 2
                         and math.isfinite(summaries[g.gid].mean)),
                        key=lambda g: -summaries[g.gid].mean if mode == "max"
                        else summaries[g.gid].mean)
    result: dict[str, Any] = {
        "metric": metric, "which": which, "mode": mode, "alpha": alpha,
        "conventions": stats.CONVENTIONS,
        "groups": [{"group": g.gid, "config": g.label, "values": g.metric(metric, which),
                    **summaries[g.gid].as_dict()} for g in groups],
    }
    if len(replicated) < 2:
        leader = replicated[0] if replicated else None
        return {**result, "leader": leader.gid if leader else None, "significant": False,
                "verdict": TOO_FEW, "summary": f"{TOO_FEW}: a comparison needs two configs with "
                f"at least two finished seeds each (replicates=N)", "comparisons": []}
    leader = replicated[0]
    # configs whose mean equals the best one's: a tie, never a leader by the order of a sort
    tied = [g.gid for g in replicated if stats.snap_ties(
        [summaries[g.gid].mean - summaries[leader.gid].mean], summaries[leader.gid].mean)[0] == 0]
    # each other config as B against the leader as A: diff = other - leader
    rows_client = client if metric.endswith("accuracy") and which == "best" else None
    comparisons = compare_groups(replicated, metric, which, baseline=leader,
                                 client=rows_client)
    # too few seed pairs for the signed-rank test to reach alpha: the verdict says so first
    unsettled = any(too_few(c, alpha) for c in comparisons)
    significant = all(c.t_p_holm < alpha for c in comparisons) and not unsettled
    runner_up = comparisons[0].b
    if significant:
        word = (f"{leader.gid} better than {runner_up.gid}" if len(comparisons) == 1
                else f"{leader.gid} better than every other config")
    else:
        word = TOO_FEW if unsettled else NO_DIFFERENCE
    return {**result, "leader": None if len(tied) > 1 else leader.gid, "baseline": leader.gid,
            "tied": tied if len(tied) > 1 else [], "significant": significant, "verdict": word,
            "summary": "; ".join(verdict(c, metric, mode, alpha) for c in comparisons),
            "comparisons": [{**c.as_dict(), "verdict": verdict(c, metric, mode, alpha),
                             **_tests(c)} for c in comparisons]}


def _tests(c: Comparison) -> dict[str, Any]:
    d = c.diff
    return {"t_test": d.t_test, "wilcoxon_smallest_p": (
        stats.smallest_signed_rank_p(d.wilcoxon_n) if d.wilcoxon_n else None)}


def leader_tag(result: dict[str, Any]) -> str:
    """`g1 (not significant): val/accuracy 0.8146 ± 0.0123 (95% CI, n=3)`."""
    gid = result["leader"]
    if result.get("tied"):
        g = next(g for g in result["groups"] if g["group"] == result["tied"][0])
        names = ", ".join(result["tied"][:-1]) + f" and {result['tied'][-1]}"
        return f"none: {names} tie at {result['metric']} {g['mean']:.4f}"
    if gid is None:
        return "none (no config has two finished seeds)"
    g = next(g for g in result["groups"] if g["group"] == gid)
    word = "significant" if result["significant"] else "not significant"
    return f"{gid} ({word}): {result['metric']} {_summary_text(g, result['metric'])}"


def tags(result: dict[str, Any]) -> dict[str, str]:
    return {T.VERDICT: result["verdict"], T.LEADER: leader_tag(result)[:5000],
            T.VERDICT_METRIC: f"{result['metric']} ({result['which']})"}


def markdown(result: dict[str, Any], command: str | None = None) -> str:
    """The parent run's description: what a reviewer of an ablation table asks for."""
    metric, which = result["metric"], result["which"]
    what = "best checkpoint" if which == "best" else "last logged value"
    better = "higher" if result["mode"] == "max" else "lower"
    lines = [f"### Verdict on {metric}: {result['verdict']}", "",
             f"{_escape(result['summary'])}", "",
             f"{metric} ({what}; {better} is better), mean ± 95 % Student-t CI over seeds "
             "(cut to the metric's range where it would leave it):", "",
             "| group | config | mean ± 95 % CI | n |", "|---|---|---|---|"]
    for g in result["groups"]:
        lead = (" **(leader)**" if g["group"] == result["leader"] else
                " (tied)" if g["group"] in result.get("tied", ()) else "")
        lines.append(f"| {g['group']}{lead} | `{g['config']}` | {_summary_text(g, metric, n=False)} "
                     f"| {g['n']} |")
    for c in result["comparisons"]:
        lines += ["", f"**{c['b']} − {c['a']}**: {_num(c['diff'])}, 95 % CI "
                      f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
                      + (f", paired over {c['n_pairs']} seeds" if c["paired"] else ", unpaired")]
        holm = len(result["comparisons"]) > 1
        lines.append(f"- {c['t_test']} test: p = {_p(c['t_p'])}"
                     + (f" (Holm {_p(c['t_p_holm'])})" if holm else ""))
        if c["wilcoxon_p"] is not None:
            lines.append(f"- Wilcoxon signed-rank ({c['wilcoxon_method']}, n = {c['wilcoxon_n']} "
                         f"non-zero pairs): p = {_p(c['wilcoxon_p'])}"
                         + (f" (Holm {_p(c['wilcoxon_p_holm'])})" if holm else "")
                         + (f"; the smallest p {c['wilcoxon_n']} pairs can give is "
                            f"{_p(c['wilcoxon_smallest_p'])}" if c["wilcoxon_smallest_p"] else ""))
        rows = c.get("rows") or {}
        if "bootstrap" in rows:
            b = rows["bootstrap"]
            lines.append(f"- per validation row ({rows['rows']} rows, correctness averaged over "
                         f"seeds): {_num(b['diff'])} [{_num(b['ci_low'])}, {_num(b['ci_high'])}]"
                         f" (paired bootstrap), randomization test p = {_p(b['p'])}")
            for m in rows.get("mcnemar", []):
                lines.append(f"- McNemar (exact binomial), seed {m['seed']}: {m['only_a']} rows "
                             f"only {c['a']} right, {m['only_b']} only {c['b']}, p = {_p(m['p'])}")
        elif "skipped" in rows:
            lines.append(f"- per validation row: {rows['skipped']}")
        if c["seeds_needed"] is not None:
            lines.append(f"- seeds needed: {c['seeds_needed']} per config would detect a "
                         f"difference of {abs(c['delta']):.4f} with 80 % power")
        if len(result["comparisons"]) > 1:  # one comparison: its verdict heads the note
            lines.append(f"- verdict: {_escape(c['verdict'])}")
    lines += ["", f"_Tests_: {stats.CONVENTIONS}",
              f"The same numbers: artifact `{COMPARISON_FILE}`; per-step bands: "
              f"`plots/bands_{_safe(metric)}.png`."]
    if command:
        lines.append(f"Recorded by {command}.")
    text = "\n".join(lines) + "\n"
    return text if len(text) <= MAX_NOTE else text[:MAX_NOTE - 40] + "\n\n(cut: see comparison.json)\n"


def record(client: Any, parent_id: str, groups: Sequence[Group], metric: str, mode: str,
           folder: Path, which: str = "best", command: str | None = None) -> dict[str, Any]:
    """The verdict onto the parent run: description, tags, comparison.json, the band PNG."""
    from mlflow.entities import RunTag

    from mlxlab.tracking.plots import bands_png

    result = assess(groups, metric, mode, which, client)
    all_tags = {**tags(result), T.NOTE: markdown(result, command)}
    client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in all_tags.items()])
    path = folder / COMPARISON_FILE
    path.write_text(json.dumps(_finite(result), indent=2, default=str) + "\n")
    client.log_artifact(parent_id, str(path))
    curves = [(g.label, bands([curve(client, r.info.run_id, metric) for r in g.runs
                               if r.info.status == "FINISHED"], bounds=metric_bounds(metric)))
              for g in groups]
    png = bands_png([(label, b) for label, b in curves if b], metric,
                    folder / f"bands_{_safe(metric)}.png")
    client.log_artifact(parent_id, str(png), "plots")
    return result


def _finite(obj: Any) -> Any:
    """NaN and inf (a one-seed group's interval) as null: comparison.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _summary_text(g: dict[str, Any], metric: str, n: bool = True) -> str:
    nan = math.nan
    s = stats.Summary(int(g["n"]), *(nan if g[k] is None else g[k]
                                     for k in ("mean", "std", "ci_low", "ci_high")),
                      cut=metric_bounds(metric) if g.get("ci_cut") else None)
    text = s.text()
    return text if n or s.cut else text.split(" (")[0]


def _num(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:+.4f}"


def _p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


def _safe(metric: str) -> str:
    return metric.replace("/", "_")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
