"""Replicates summarized: n, mean, standard deviation and a Student-t confidence interval.

A config trained on n seeds gives n values of a metric; what a reader needs is their mean and
how far the mean could be off: mean +- t(0.975, n-1) * s / sqrt(n), the interval the replicates
support (95 % by default). One value has no interval (NaN bounds, never a fake zero width).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (scipy.stats.t)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Summary:
    """n values of one metric: mean, sample standard deviation (ddof=1), the mean's interval."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.low,
                "ci_high": self.high}

    def text(self, scale: float = 1.0, digits: int = 4) -> str:
        """`83.6 ± 0.9 (95 % CI, n=10)`; `scale=100` shows a fraction as points."""
        if self.n == 0:
            return "-"
        mean = f"{self.mean * scale:.{digits}f}"
        if self.n < 2 or not math.isfinite(self.half_width):
            return f"{mean} (n={self.n})"
        return (f"{mean} ± {self.half_width * scale:.{digits}f} "
                f"({self.confidence:.0%} CI, n={self.n})")


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Summary of the finite values (NaN and inf, failed runs, are left out)."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, confidence)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan, confidence)
    from scipy.stats import sem, t

    std = float(x.std(ddof=1))
    if std == 0:  # every replicate equal: scipy's interval is (nan, nan); the mean is exact
        return Summary(n, mean, 0.0, mean, mean, confidence)
    low, high = t.interval(confidence, n - 1, loc=mean, scale=sem(x))
    return Summary(n, mean, std, float(low), float(high), confidence)


def bands(curves: Sequence[Mapping[int, float]], confidence: float = CONFIDENCE
          ) -> dict[int, Summary]:
    """Per step, the summary of the curves that have a value there (replicates stopped early
    by early stopping or pruning count only where they ran): {step: Summary}."""
    steps = sorted({s for curve in curves for s in curve})
    return {s: summarize([c[s] for c in curves if s in c], confidence) for s in steps}
