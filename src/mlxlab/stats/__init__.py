"""Statistics for choosing between configs: replicates summarized, groups compared.

Pure numbers in, numbers out: thin calls into `scipy.stats`, with the project's conventions
(which seeds pair up, the zero-difference and tie rules, exact vs approximate) stated once in
paired.py's docstring: no MLflow, no MLX, nothing of mlxlab above it,
so the sweep's parent run (tracking/), `mlxlab runs list` and `mlxlab runs compare` (cli/)
and the search (sweeps/search/) all call the same code.

- intervals.py: `summarize` (n, mean, std, Student-t interval, cut to the metric's range),
  `bands` (per-step intervals), `proportion_interval` (Wilson's, for k of n examples);
- definitions.py: `MetricDefinition`, a metric's direction and range, and the evaluation tasks'
  scores' (SCORE_DEFINITIONS; an objective's metrics live in its class, objectives/);
- paired.py: `compare` (paired t + Wilcoxon across seeds, Welch when unpaired), `holm`,
  `mcnemar_exact` and `paired_bootstrap` (per validation row), `seeds_needed` (power).
"""

from mlxlab.stats.definitions import LOG_PROB, LOSS, SCORE_DEFINITIONS, UNIT, MetricDefinition
from mlxlab.stats.intervals import CONFIDENCE, Summary, bands, proportion_interval, summarize
from mlxlab.stats.paired import (
    ALPHA,
    CONVENTIONS,
    POWER,
    Difference,
    Wilcoxon,
    compare,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    power_paired_t,
    seeds_needed,
    signed_rank_reach,
    smallest_signed_rank_p,
    snap_ties,
    wilcoxon_signed_rank,
)

__all__ = [
    "ALPHA", "CONFIDENCE", "CONVENTIONS", "LOG_PROB", "LOSS", "POWER", "SCORE_DEFINITIONS", "UNIT",
    "Difference",
    "MetricDefinition", "Summary", "bands", "compare", "holm",
    "mcnemar_exact", "paired_bootstrap", "power_paired_t", "proportion_interval", "seeds_needed",
    "signed_rank_reach", "smallest_signed_rank_p", "snap_ties", "summarize",
    "Wilcoxon", "wilcoxon_signed_rank",
]
