"""Replicates summarized: n, mean, standard deviation and a Student-t confidence interval;
a proportion's interval.

A config trained on n seeds gives n values of a metric; what a reader needs is their mean and
how far the mean could be off: mean +- t(0.975, n-1) * s / sqrt(n), the interval the replicates
support (95 % by default). One value has no interval (NaN bounds, never a fake zero width).
A metric that can only take values in a range (an accuracy in [0, 1]) keeps its t interval's
bounds inside the range: over few seeds t(0.975, 1) = 12.7 carries the bound of a mean of 0.95
past 1, which no mean can reach; the bound is cut to the range and the summary says so (`cut`).

k right answers out of n examples is a proportion, not a mean of seeds: its interval is
Wilson's score interval (scipy's `binomtest(k, n).proportion_ci(method="wilson")`), which
stays in [0, 1] and keeps a width at 0/n and n/n, where the normal approximation gives
[0, 0] (and below 0 at 3/40). Wilson rather than Clopper-Pearson: its coverage is close to the
stated 95 % where Clopper-Pearson's is above it (wider than it needs to be).
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
    cut: tuple[float, float] | None = None  # the range the t bounds were cut to, when they were

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.low,
                "ci_high": self.high, "ci_cut": self.cut is not None}

    def text(self, scale: float = 1.0, digits: int = 4) -> str:
        """`83.6 ± 0.9 (95 % CI, n=10)`; `scale=100` shows a fraction as points."""
        if self.n == 0:
            return "-"
        mean = f"{self.mean * scale:.{digits}f}"
        if self.n < 2 or not math.isfinite(self.half_width):
            return f"{mean} (n={self.n})"
        if self.cut is not None:  # not symmetric any more: the bounds, and why
            lo, hi = (f"{v * scale:.{digits}f}" for v in (self.low, self.high))
            return (f"{mean} [{lo}, {hi}] ({self.confidence:.0%} Student-t CI cut to "
                    f"[{_g(self.cut[0])}, {_g(self.cut[1])}], n={self.n})")
        return (f"{mean} ± {self.half_width * scale:.{digits}f} "
                f"({self.confidence:.0%} CI, n={self.n})")


def _g(x: float) -> str:
    return f"{x:g}"


def summarize(values: Iterable[float], confidence: float = CONFIDENCE,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Summary of the finite values (NaN and inf, failed runs, are left out). `bounds`: the
    range the metric's values can take (its MetricDefinition.bounds); a t bound past it is cut to
    it (module docstring)."""
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
    low, high = (float(v) for v in t.interval(confidence, n - 1, loc=mean, scale=sem(x)))
    if bounds is not None and (low < bounds[0] or high > bounds[1]):
        low, high = max(low, bounds[0]), min(high, bounds[1])
        return Summary(n, mean, std, low, high, confidence, (float(bounds[0]), float(bounds[1])))
    return Summary(n, mean, std, low, high, confidence)


def proportion_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of k successes in n trials (scipy's binomtest; module
    docstring); (nan, nan) for n = 0."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bands(curves: Sequence[Mapping[int, float]], confidence: float = CONFIDENCE,
          bounds: tuple[float, float] | None = None) -> dict[int, Summary]:
    """Per step, the summary of the curves that have a value there (replicates stopped early
    by early stopping or pruning count only where they ran): {step: Summary}."""
    steps = sorted({s for curve in curves for s in curve})
    return {s: summarize([c[s] for c in curves if s in c], confidence, bounds) for s in steps}
