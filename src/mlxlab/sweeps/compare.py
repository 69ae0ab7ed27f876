"""Groups of replicates compared: the numbers and the verdict behind `mlxlab runs compare`.

Two groups (configs) are compared on one metric across their seeds (stats.compare: the paired
t test and Wilcoxon on seeds both ran, Welch otherwise) and, for classifiers whose runs were
scored on the same validation rows (the `mlxlab.val_fingerprint` tag), row by row from the
per-row predictions each run stores (`predictions/val_best.csv`): a paired bootstrap over rows
and McNemar's exact test. Several comparisons get Holm's correction; a non-result says how
many seeds would resolve the difference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab import stats
from mlxlab.sweeps.groups import Group, seed_of
from mlxlab.tracking import tags as T

PREDICTIONS = "predictions/val_best.csv"


@dataclass
class Comparison:
    """B against A on `metric`: `diff` is mean(B) - mean(A)."""

    a: Group
    b: Group
    diff: stats.Difference
    t_p_holm: float
    wilcoxon_p_holm: float | None
    rows: dict[str, Any] | None  # the per-row tests, when they apply
    seeds_needed: int | None
    delta: float | None

    def as_dict(self) -> dict[str, Any]:
        d = self.diff
        return {"a": self.a.gid, "b": self.b.gid, "diff": d.diff, "ci_low": d.low,
                "ci_high": d.high, "paired": d.paired, "n_pairs": d.n_pairs,
                "t_p": d.t_p, "t_p_holm": self.t_p_holm, "wilcoxon_p": d.wilcoxon_p,
                "wilcoxon_p_holm": self.wilcoxon_p_holm, "wilcoxon_n": d.wilcoxon_n,
                "wilcoxon_method": d.wilcoxon_method, "sd_diff": d.sd_diff,
                "rows": self.rows, "delta": self.delta, "seeds_needed": self.seeds_needed}


def compare_groups(groups: Sequence[Group], metric: str, which: str = "best",
                   baseline: Group | None = None, delta: float | None = None,
                   client: Any = None) -> list[Comparison]:
    """Each group against `baseline` (else every pair), Holm-corrected over all of them."""
    pairs = ([(baseline, g) for g in groups if g is not baseline] if baseline is not None
             else list(itertools.combinations(groups, 2)))
    diffs = [stats.compare(a.metric(metric, which), b.metric(metric, which)) for a, b in pairs]
    t_holm = stats.holm([d.t_p for d in diffs])
    w_raw = [d.wilcoxon_p for d in diffs]
    w_holm = stats.holm([p for p in w_raw if p is not None])
    w_iter = iter(w_holm)
    out = []
    for (a, b), d, tp in zip(pairs, diffs, t_holm):
        wp = next(w_iter) if d.wilcoxon_p is not None else None
        rows = row_tests(client, a, b) if client is not None else None
        target = delta if delta is not None else abs(d.diff)
        needed = stats.seeds_needed(target, d.sd_diff) if d.paired else None
        out.append(Comparison(a, b, d, tp, wp, rows, needed, target))
    return out


# --- row by row --------------------------------------------------------------------------------


def row_tests(client: Any, a: Group, b: Group) -> dict[str, Any] | None:
    """The per-row tests of two classifier groups on the same validation rows, else None (with
    the reason in {"skipped": ...})."""
    runs = [r for r in (*a.runs, *b.runs) if r.info.status == "FINISHED"]
    prints = {r.data.tags.get(T.VAL_FINGERPRINT) for r in runs}
    if None in prints:
        return None  # not classifiers, or runs from before the tag
    if len(prints) > 1:
        return {"skipped": "the runs were scored on different validation rows (data.split_seed "
                           "or the data differ): no row-level test"}
    correct_a = {seed_of(r): c for r in a.runs if (c := correctness(client, r)) is not None}
    correct_b = {seed_of(r): c for r in b.runs if (c := correctness(client, r)) is not None}
    if not correct_a or not correct_b:
        return None
    diff, low, high, p = stats.paired_bootstrap(np.stack(list(correct_a.values())),
                                                np.stack(list(correct_b.values())))
    result: dict[str, Any] = {"rows": int(len(next(iter(correct_a.values())))),
                              "bootstrap": {"diff": diff, "ci_low": low, "ci_high": high, "p": p}}
    common = sorted(set(correct_a) & set(correct_b), key=str)
    mcnemar = [(s, *stats.mcnemar_exact(correct_a[s], correct_b[s])) for s in common]
    if mcnemar:
        result["mcnemar"] = [{"seed": s, "only_a": x, "only_b": y, "p": p}
                             for s, x, y, p in mcnemar]
    return result


def correctness(client: Any, run: Any) -> np.ndarray | None:
    """0/1 per validation row of a run's best checkpoint: its run folder's predictions, else
    the ones logged with the run (downloaded)."""
    path = _predictions_file(client, run)
    if path is None:
        return None
    data = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    return (np.atleast_1d(data["label"]) == np.atleast_1d(data["prediction"])).astype(np.float64)


def _predictions_file(client: Any, run: Any) -> Path | None:
    folder = run.data.tags.get(T.RUN_DIR)
    if folder and (Path(folder) / PREDICTIONS).is_file():
        return Path(folder) / PREDICTIONS
    try:
        import tempfile

        target = tempfile.mkdtemp(prefix="mlxlab-predictions-")
        return Path(client.download_artifacts(run.info.run_id, PREDICTIONS, target))
    except Exception:  # noqa: BLE001 - a run without predictions: no row-level test
        return None


# --- words -------------------------------------------------------------------------------------


def too_few(c: Comparison, alpha: float = stats.ALPHA) -> str | None:
    """What a verdict says first when its seed pairs are too few for the signed-rank test to
    reach alpha at all (stats.signed_rank_reach), else None."""
    d = c.diff
    reach = stats.signed_rank_reach(alpha)
    if not d.paired or d.n_pairs >= reach:
        return None
    return (f"too few seeds to settle it: at {d.n_pairs} seed pairs the Wilcoxon signed-rank "
            f"test's smallest p is {_p(stats.smallest_signed_rank_p(d.n_pairs))} (it can reach "
            f"p < {alpha:g} from {reach} pairs), so no config is called better")


def verdict(c: Comparison, metric: str, mode: str, alpha: float = stats.ALPHA) -> str:
    """One line: which is better, by how much and how sure, or what would resolve it; first,
    when the seeds are too few for both tests to reach alpha, that they are."""
    head = too_few(c, alpha)
    line = _verdict(c, metric, mode, alpha, head is not None)
    return f"{head}; {line}" if head else line


def _verdict(c: Comparison, metric: str, mode: str, alpha: float, unsettled: bool) -> str:
    d = c.diff
    how = (f"paired over {d.n_pairs} seeds, t p={_p(c.t_p_holm)}" if d.paired
           else f"unpaired (Welch), p={_p(c.t_p_holm)}")
    if c.wilcoxon_p_holm is not None:
        how += f", Wilcoxon p={_p(c.wilcoxon_p_holm)} ({d.wilcoxon_method}, n={d.wilcoxon_n})"
    interval = (f"{_n(abs(d.diff))} (95 % CI of {c.b.gid}-{c.a.gid} {_n(d.low)} to "
                f"{_n(d.high)}; {how})")
    if c.t_p_holm < alpha:
        b_better = (d.diff > 0) == (mode == "max")
        better, worse = (c.b, c.a) if b_better else (c.a, c.b)
        note = ""
        if c.wilcoxon_p_holm is not None and c.wilcoxon_p_holm >= alpha:
            note = " (Wilcoxon does not confirm it at this n)"
        word = "is ahead of" if unsettled else "beats"
        return (f"{better.gid} ({better.label}) {word} {worse.gid} ({worse.label}) on {metric} "
                f"by {interval}{note}{_needed(c) if unsettled else ''}")
    return (f"no detectable difference between {c.a.gid} and {c.b.gid} on {metric}: "
            f"{interval}{_needed(c)}")


def _needed(c: Comparison) -> str:
    """How many seeds would settle it (stats.seeds_needed: never fewer than both tests need)."""
    d = c.diff
    if c.seeds_needed is not None and c.delta:
        return (f"; {c.seeds_needed} seeds per config would detect a difference of "
                f"{_n(c.delta)} with 80 % power (sd of the per-seed differences {_n(d.sd_diff)})")
    if d.paired and c.delta:
        return "; more than 10,000 seeds would be needed to detect it"
    return ""


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _n(x: float) -> str:
    return f"{x:+.4f}".replace("+", "") if math.isfinite(x) else "nan"
