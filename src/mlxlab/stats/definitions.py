"""A metric's definition: which way it improves and the values it can take.

An objective's validation metrics are defined in its class (objectives/, `Objective.metrics`);
the evaluation tasks' scores (mlxlab's jsonl tasks' and lm-eval's names) in SCORE_DEFINITIONS
below, which evaluation/ and the catalog below it both read;
`mlxlab.objectives.catalog.metric_definition` reads a logged name in all of them. Here is only the record they share: a sweep's verdict, `mlxlab runs compare`, the best
checkpoint's tie-break and a mean's interval (`summarize(bounds=)`) read the direction and the
range from it, never from the metric's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIRECTIONS = ("min", "max")


@dataclass(frozen=True)
class MetricDefinition:
    """Which way a metric improves ("min" | "max") and the range of its values."""

    mode: str
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if self.mode not in DIRECTIONS:
            raise ValueError(f"a metric's mode is 'min' or 'max', got {self.mode!r}")

    @property
    def bounds(self) -> tuple[float, float] | None:
        """(low, high) when the metric is bounded on either side, else None."""
        return None if (self.low, self.high) == (-math.inf, math.inf) else (self.low, self.high)


UNIT = MetricDefinition("max", 0.0, 1.0)      # a share of examples: accuracy, F1, AUC
LOSS = MetricDefinition("min", 0.0)           # a cross-entropy or another loss above 0
LOG_PROB = MetricDefinition("max", high=0.0)  # a log-probability

# Each evaluation task score's direction and range (eval/<task>/<score>): what runs compare, the
# model card's pairing and a mean's interval read (objectives.catalog.metric_definition).
SCORE_DEFINITIONS = {"acc": UNIT, "acc_norm": UNIT, "exact_match": UNIT, "contains": UNIT,
                     "loss": LOSS, "perplexity": MetricDefinition("min", 1.0),
                     "bits_per_byte": LOSS,
                     # a transcription task's word and character error rates (insertions can
                     # take them past 1)
                     "wer": MetricDefinition("min", 0.0), "cer": MetricDefinition("min", 0.0),
                     # lm-eval-harness's names for its tasks' scores (evaluation/lm_eval/scores.py)
                     "word_perplexity": MetricDefinition("min", 1.0),
                     "byte_perplexity": MetricDefinition("min", 1.0)}
