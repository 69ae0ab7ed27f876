"""Two models' scores on the same task, paired example by example (by id).

Right/wrong scores (acc, acc_norm, exact_match, contains) get McNemar's exact test (the
binomial test on the examples only one model got right); every score gets a paired bootstrap
over the examples for the difference's 95 % interval (and, for continuous scores such as a
perplexity task's per-text loss, its p-value). lm-eval's corpus-level scores (word and byte
perplexity, bits per byte, BLEU, chrF, TER: evaluation/lm_eval/corpus.py) are paired as lm-eval
reports them, each run's aggregate over the shared documents, with the bootstrap and a
randomization test over documents of that aggregate. A transcription task's word and character
error rates are paired the same way, as corpus rates: each utterance's errors and reference length
are its statistics, the rate their sums' ratio, and two runs pair only when they transcribed the
same utterances against the same normalized references. `mlxlab runs compare A B` prints them
with a one-line verdict each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from mlxlab.evaluation.lm_eval.corpus import CORPUS_AGGREGATIONS, corpus_statistics
from mlxlab.evaluation.results import SavedTask
from mlxlab.evaluation.speech.word_errors import RATES
from mlxlab.evaluation.tasks import BINARY_SCORES, PAIRED_SCORES, TRANSCRIPTION
from mlxlab.stats import ALPHA, CONFIDENCE, SCORE_DEFINITIONS, mcnemar_exact, paired_bootstrap


def higher_is_better(score: str) -> bool:
    """A task score's direction from its definition (stats' SCORE_DEFINITIONS)."""
    definition = SCORE_DEFINITIONS.get(score)
    return definition is None or definition.mode == "max"


def paired_scores(task: SavedTask) -> dict[str, bool]:
    """The scores of a task that pair, each with its direction (True: higher is better): the
    kind's (tasks.PAIRED_SCORES), or those the task carries (an lm-eval task's, its
    higher_is_better)."""
    if task.higher_is_better:
        return dict(task.higher_is_better)
    return {metric: higher_is_better(metric) for metric in PAIRED_SCORES[task.kind]}


def is_binary(*columns: np.ndarray) -> bool:
    """Right/wrong scores (McNemar's test pairs them): every value 0 or 1."""
    return all(bool(np.isin(c, (0.0, 1.0)).all()) for c in columns)


@dataclass(frozen=True)
class PairedScore:
    """B against A on one score of one task over the `n` examples both scored."""

    task: str
    metric: str
    test: str            # "mcnemar" | "bootstrap"
    n: int
    a: float             # A's mean over the paired examples
    b: float
    diff: float          # b - a
    low: float           # the difference's 95 % interval (paired bootstrap over examples)
    high: float
    p: float
    only_a: int | None = None   # McNemar: examples only A got right
    only_b: int | None = None
    higher_is_better: bool = True

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": verdict(self)}


def pair_task(a: SavedTask, b: SavedTask, rounds: int = 10_000, seed: int = 0
              ) -> list[PairedScore]:
    """Each paired score of the task (PAIRED_SCORES) over the examples both have (a
    transcription task: pair_transcriptions); a task of another kind, or no shared ids, is a
    ValueError naming why."""
    if a.kind != b.kind:
        raise ValueError(f"task {a.task}: one run scored it as {a.kind}, the other as {b.kind}")
    if a.kind == TRANSCRIPTION:
        return pair_transcriptions(a, b, rounds, seed)
    if a.prompts != b.prompts:
        raise ValueError(f"task {a.task}: A's prompts were {a.prompts}, B's {b.prompts}: score "
                         "both the same way (eval.chat / mlxlab eval --chat)")
    rows_a, rows_b = a.by_id(), b.by_id()
    ids = [i for i in rows_a if i in rows_b]
    if not ids:
        raise ValueError(f"task {a.task}: the two runs share no example ids")
    out = []
    for metric, higher in paired_scores(a).items():
        if not all(metric in rows_a[i] and metric in rows_b[i] for i in ids):
            continue  # a score one run has not (another filter, another lm-eval version)
        corpus = _corpus(a, b, metric, [rows_a[i] for i in ids] + [rows_b[i] for i in ids])
        if corpus is not None:  # lm-eval's aggregate over the documents, not a mean of theirs
            (sa, score), (sb, _) = (corpus_statistics(corpus, [rows[i]["pieces"][metric]
                                                               for i in ids])
                                    for rows in (rows_a, rows_b))
            out.append(_pair_statistics(a.task, metric, sa, sb, score, higher, rounds, seed))
            continue
        va = np.array([float(rows_a[i][metric]) for i in ids])
        vb = np.array([float(rows_b[i][metric]) for i in ids])
        diff, low, high, p = paired_bootstrap(va, vb, rounds=rounds, seed=seed)
        only_a = only_b = None
        test = "bootstrap"
        if metric in BINARY_SCORES or (a.higher_is_better and is_binary(va, vb)):
            only_a, only_b, p = mcnemar_exact(va > 0.5, vb > 0.5)
            test = "mcnemar"
        out.append(PairedScore(a.task, metric, test, len(ids), float(va.mean()), float(vb.mean()),
                               diff, low, high, float(p), only_a, only_b, higher))
    return out


def pair_weighted_loss(a: SavedTask, b: SavedTask, rounds: int = 2000, seed: int = 0
                       ) -> PairedScore:
    """B - A on a perplexity task's reported loss, the token-weighted mean (sum of the texts'
    NLL over the sum of their tokens), over the texts both scored: what the model card shows
    beside the two losses (the mean of per-text differences, pair_task's, is another number).
    A paired percentile bootstrap over texts for the interval; for p, the paired randomization
    test (each text's two scores swapped with probability 1/2)."""
    rows_a, rows_b = a.by_id(), b.by_id()
    ids = [i for i in rows_a if i in rows_b]
    if not ids:
        raise ValueError(f"task {a.task}: the two runs share no example ids")
    sa, sb = (np.array([[float(rows[i]["nll"]), float(rows[i]["tokens"])] for i in ids])
              for rows in (rows_a, rows_b))
    return _pair_statistics(a.task, "loss", sa, sb, lambda total: total[0] / total[1], False,
                            rounds, seed)


def same_utterances(tasks: list[SavedTask]) -> list[str]:
    """The utterance ids every run's scores of one transcription task hold, in the first's
    order; a ValueError unless they transcribed the same utterances against the same normalized
    references (another task file, a subset, or another eval.normalizer would pair rates of
    different texts)."""
    first = tasks[0].by_id()
    for other in tasks[1:]:
        if other.prompts != tasks[0].prompts:  # the language and normalizer (speech/scoring.py)
            raise ValueError(f"task {other.task}: one run transcribed and normalized it as "
                             f"{tasks[0].prompts}, the other as {other.prompts}: score both "
                             "with the same eval.language and eval.normalizer")
        rows = other.by_id()
        if set(rows) != set(first):
            raise ValueError(
                f"task {tasks[0].task}: the runs transcribed different utterances ({len(first)} "
                f"and {len(rows)}, {len(set(first) - set(rows))} and "
                f"{len(set(rows) - set(first))} of them not in the other): score both on the "
                "same task file")
        differ = [i for i in first if first[i].get("reference") != rows[i].get("reference")]
        if differ:
            raise ValueError(
                f"task {tasks[0].task}: {len(differ)} utterance(s) ({differ[0]} first) have "
                "another normalized reference in each run: score both on the same task file "
                "with the same eval.normalizer")
    return list(first)


def utterance_statistics(task: SavedTask, rate: str, ids: list[str]) -> np.ndarray:
    """(utterances, 2): each utterance's errors and reference length for `rate` (wer, cer)."""
    errors, length = RATES[rate]
    rows = task.by_id()
    return np.array([[float(rows[i][errors]), float(rows[i][length])] for i in ids])


def _rate(total: np.ndarray) -> float:
    return float(total[0] / total[1])


def pair_transcriptions(a: SavedTask, b: SavedTask, rounds: int = 10_000, seed: int = 0
                        ) -> list[PairedScore]:
    """B - A on a transcription task's WER and CER, the corpus rates (sum of the errors over the
    sum of the reference lengths) over the utterances both transcribed (same_utterances): a
    paired bootstrap over utterances for the interval, the paired randomization test for p."""
    ids = same_utterances([a, b])
    return [_pair_statistics(a.task, rate, utterance_statistics(a, rate, ids),
                             utterance_statistics(b, rate, ids), _rate, higher_is_better(rate),
                             rounds, seed) for rate in RATES]


def _corpus(a: SavedTask, b: SavedTask, metric: str, rows: list[dict]) -> str | None:
    """The lm-eval aggregation both runs score `metric` by from per-document pieces (every
    row keeping its piece), else None (a mean of the rows' values)."""
    name = a.corpus.get(metric)
    if name is None or b.corpus.get(metric) != name or name not in CORPUS_AGGREGATIONS:
        return None
    return name if all(metric in (r.get("pieces") or {}) for r in rows) else None


def _pair_statistics(task: str, metric: str, sa: np.ndarray, sb: np.ndarray,
                     score: Callable[[np.ndarray], float], higher: bool, rounds: int,
                     seed: int) -> PairedScore:
    """B - A on a score that is a function of per-document statistics' sums, (documents, k)
    each (a token-weighted loss, lm-eval's corpus scores), over the documents both scored: a
    paired percentile bootstrap over documents for the interval; for p, the paired
    randomization test (each document's two sets of statistics swapped with probability 1/2)."""
    value_a, value_b = score(sa.sum(0)), score(sb.sum(0))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sa), size=(rounds, len(sa)))
    boot = np.array([score(sb[p].sum(0)) - score(sa[p].sum(0)) for p in picks])
    low, high = (float(v) for v in np.quantile(boot, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]))
    swaps = rng.random((rounds, len(sa), 1)) < 0.5
    flipped = np.array([score(np.where(s, sa, sb).sum(0)) - score(np.where(s, sb, sa).sum(0))
                        for s in swaps])
    diff = float(value_b - value_a)
    p = (1 + int((np.abs(flipped) >= abs(diff) - 1e-15).sum())) / (rounds + 1)
    return PairedScore(task, metric, "bootstrap", len(sa), float(value_a), float(value_b), diff,
                       low, high, float(p), higher_is_better=higher)


def pair_runs(a: Mapping[str, SavedTask], b: Mapping[str, SavedTask], rounds: int = 10_000
              ) -> list[PairedScore]:
    """Every task both runs scored, paired (pair_task); none in common is a ValueError."""
    common = [t for t in a if t in b and a[t].rows and b[t].rows]
    if not common:
        raise ValueError(f"the runs scored no task in common (A: {sorted(a) or 'none'}, B: "
                         f"{sorted(b) or 'none'}): score both on the same task files")
    return [s for t in common for s in pair_task(a[t], b[t], rounds)]


def verdict(s: PairedScore, alpha: float = ALPHA) -> str:
    """One line: which is better on this score and how sure, or that no difference shows."""
    test = (f"McNemar exact p={s.p:.3g}, {s.only_a} only A right, {s.only_b} only B right"
            if s.test == "mcnemar" else f"paired bootstrap p={s.p:.3g}")
    change = f"{s.diff:+.4f} [{s.low:+.4f}, {s.high:+.4f}] over {s.n} examples"
    if s.p >= alpha or s.diff == 0:
        return f"no difference detected on {s.task} {s.metric}: {change} ({test})"
    better = "B" if (s.diff > 0) == s.higher_is_better else "A"
    return f"{better} is better on {s.task} {s.metric}: {change} ({test})"


@dataclass(frozen=True)
class ReplicatePaired:
    """Two groups of replicate runs (seeds) on one score of one task: each example's score
    averaged over a group's seeds, B - A over the `n` examples every run scored with a paired
    bootstrap interval and p; McNemar's exact test per seed both groups ran (right/wrong scores)."""

    task: str
    metric: str
    n: int
    seeds_a: int
    seeds_b: int
    a: float
    b: float
    diff: float
    low: float
    high: float
    p: float
    mcnemar: tuple[dict, ...] = ()
    higher_is_better: bool = True

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mcnemar"] = list(self.mcnemar)
        return {**out, "verdict": replicate_verdict(self)}


def pair_replicates(a: Mapping[str, Mapping[str, SavedTask]],
                    b: Mapping[str, Mapping[str, SavedTask]], rounds: int = 10_000,
                    seed: int = 0) -> list[ReplicatePaired]:
    """Groups of runs, each {seed: {task: SavedTask}}: every task all their runs scored, each
    paired score over the examples every run has."""
    runs = [*a.values(), *b.values()]
    if not a or not b:
        return []
    common = [t for t in next(iter(a.values())) if all(t in r for r in runs)]
    out = []
    for task in common:
        tasks = [r[task] for r in runs]
        kinds, prompts = {t.kind for t in tasks}, {t.prompts for t in tasks}
        if len(kinds) > 1 or len(prompts) > 1:
            raise ValueError(f"task {task}: the runs scored it as {sorted(kinds)} with "
                             f"{sorted(prompts)} prompts: score every run the same way")
        if tasks[0].kind == TRANSCRIPTION:
            out += _replicate_transcriptions(a, b, task, rounds, seed)
            continue
        ids = [i for i in tasks[0].by_id() if all(i in t.by_id() for t in tasks[1:])]
        if not ids:
            continue
        for metric, higher in paired_scores(tasks[0]).items():
            ma, mb = (_matrix(group, task, metric, ids) for group in (a, b))
            diff, low, high, p = paired_bootstrap(ma, mb, rounds=rounds, seed=seed)
            per_seed = []
            if metric in BINARY_SCORES or (tasks[0].higher_is_better and is_binary(ma, mb)):
                for s in sorted(set(a) & set(b)):
                    only_a, only_b, mp = mcnemar_exact(
                        [a[s][task].by_id()[i][metric] > 0.5 for i in ids],
                        [b[s][task].by_id()[i][metric] > 0.5 for i in ids])
                    per_seed.append({"seed": s, "only_a": only_a, "only_b": only_b, "p": mp})
            out.append(ReplicatePaired(task, metric, len(ids), len(a), len(b),
                                       float(ma.mean()), float(mb.mean()), diff, low, high,
                                       float(p), tuple(per_seed), higher))
    return out


def _replicate_transcriptions(a: Mapping[str, Mapping[str, SavedTask]],
                              b: Mapping[str, Mapping[str, SavedTask]], task: str, rounds: int,
                              seed: int) -> list[ReplicatePaired]:
    """A transcription task over two groups of seeds: each utterance's errors averaged over a
    group's runs, the groups' corpus rates paired as pair_transcriptions pairs two runs'."""
    ids = same_utterances([r[task] for r in (*a.values(), *b.values())])
    out = []
    for rate in RATES:
        sa, sb = (np.mean([utterance_statistics(r[task], rate, ids) for r in group.values()],
                          axis=0) for group in (a, b))
        s = _pair_statistics(task, rate, sa, sb, _rate, higher_is_better(rate), rounds, seed)
        out.append(ReplicatePaired(task, rate, s.n, len(a), len(b), s.a, s.b, s.diff, s.low,
                                   s.high, s.p, higher_is_better=s.higher_is_better))
    return out


def _matrix(group: Mapping[str, Mapping[str, SavedTask]], task: str, metric: str,
            ids: list[str]) -> np.ndarray:
    """(runs, examples) of one score: a group's runs in seed order, the examples in `ids`'."""
    return np.array([[float(r[task].by_id()[i][metric]) for i in ids] for r in group.values()])


def replicate_verdict(s: ReplicatePaired, alpha: float = ALPHA) -> str:
    change = (f"{s.diff:+.4f} [{s.low:+.4f}, {s.high:+.4f}] over {s.n} examples, "
              f"{s.seeds_a} and {s.seeds_b} seeds (paired bootstrap p={s.p:.3g})")
    if s.p >= alpha or s.diff == 0:
        return f"no difference detected on {s.task} {s.metric}: {change}"
    better = "B" if (s.diff > 0) == s.higher_is_better else "A"
    return f"{better} is better on {s.task} {s.metric}: {change}"
