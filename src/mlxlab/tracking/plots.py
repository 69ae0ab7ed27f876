"""PNG plots logged as MLflow artifacts: loss curves of a run, metric vs swept params of a sweep."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in workers
    import matplotlib.pyplot as plt

    return plt


def loss_curve_png(
    history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
    title: str = "loss by step",
) -> Path:
    """One line per loss ("train/loss", "val/loss", ...) over steps; returns the PNG path.

    `history` maps metric names to (step, value) pairs; metrics without "loss" in their name
    (accuracy, learning rate) are left out, unless there is no loss at all.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    losses = {k: v for k, v in history.items() if "loss" in k} or dict(history)
    for name, points in sorted(losses.items()):
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, label=name, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    return _save(fig, path, title)


def sweep_plot_png(
    rows: Sequence[Mapping], metric: str, params: Sequence[str], path: str | Path
) -> Path:
    """One panel per swept param: the metric of each run against that param's value.

    `rows` are dicts holding `metric` and each param (strings are fine: numbers are parsed,
    anything else is drawn as a category). Wide positive numeric ranges (learning rates) get a
    log x axis.
    """
    plt = _pyplot()
    params = list(params) or ["run"]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.8), squeeze=False)
    for ax, param in zip(axes[0], params):
        points = [
            (row.get(param, i), _number(row.get(metric)))
            for i, row in enumerate(rows)
            if _number(row.get(metric)) is not None
        ]
        xs = [_number(x) for x, _ in points]
        if points and all(x is not None for x in xs):
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        elif points:
            categories = sorted({str(x) for x, _ in points})
            ax.scatter([categories.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    title = f"{metric} over {len(rows)} runs"
    fig.suptitle(title)
    return _save(fig, path, title)


def replicates_png(
    groups: Sequence[tuple[str, Mapping[object, float]]], metric: str, path: str | Path
) -> Path:
    """Each group's seeds as dots and its mean with the 95 % interval as whiskers.

    `groups` are (label, {seed: value}) pairs; a group of one value gets a dot and no whisker.
    """
    import numpy as np

    from mlxlab.stats import summarize

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.5))
    jitter = np.random.default_rng(0)  # the same picture for the same numbers
    for i, (_, values) in enumerate(groups):
        ys = [v for v in values.values() if math.isfinite(v)]
        if not ys:
            continue
        ax.scatter(i + jitter.uniform(-0.12, 0.12, len(ys)), ys, s=18, alpha=0.55,
                   color="tab:blue", zorder=2)
        s = summarize(ys)
        if s.n >= 2:
            ax.errorbar([i + 0.28], [s.mean], yerr=[[s.mean - s.low], [s.high - s.mean]],
                        fmt="o", color="black", capsize=6, zorder=3)
            ax.annotate(f"{s.mean:.4f}\n±{s.half_width:.4f}", (i + 0.34, s.mean), fontsize=8,
                        va="center")
    labels = [_wrap(label) for label, _ in groups]
    ax.set_xticks(range(len(groups)), labels, rotation=20 if len(groups) > 3 else 0, ha="right"
                  if len(groups) > 3 else "center", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.2)
    ax.set_ylabel(f"{metric} (best checkpoint)")
    ax.grid(alpha=0.3, axis="y")
    n = max((len(v) for _, v in groups), default=0)
    title = f"{metric} by config: seeds (dots), mean and 95 % CI (bars)\nup to {n} seeds per config"
    ax.set_title(title, fontsize=10)
    return _save(fig, path, title, description="; ".join(label for label, _ in groups))


def bands_png(groups: Sequence[tuple[str, Mapping[int, Any]]], metric: str,
              path: str | Path) -> Path:
    """Each group's curve over the evaluation steps: the mean across its seeds as a line and
    the 95 % interval as a shaded band (MLflow's charts draw a band's mean, ci_low and ci_high
    as three separate lines). `groups` are (label, {step: stats.Summary}) pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    n = 0
    for label, band in groups:
        steps = sorted(band)
        if not steps:
            continue
        mean = [band[s].mean for s in steps]
        low = [band[s].low if math.isfinite(band[s].low) else band[s].mean for s in steps]
        high = [band[s].high if math.isfinite(band[s].high) else band[s].mean for s in steps]
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=_wrap(label, 40))
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        n = max(n, max(band[s].n for s in steps))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = (f"{metric} per evaluation: mean across seeds (line), 95 % CI (band)\n"
             f"up to {n} seeds per config; n counts the seeds that reached each step")
    ax.set_title(title, fontsize=10)
    return _save(fig, path, title, description="; ".join(label for label, _ in groups))


def _wrap(label: str, width: int = 28) -> str:
    words, lines, line = label.split(" "), [], ""
    for word in words:
        if line and len(line) + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def confusion_matrix_png(
    matrix: Sequence[Sequence[int]], path: str | Path, labels: Sequence[str] | None = None,
    title: str = "confusion matrix",
) -> Path:
    """Counts of (true label, predicted label) as an annotated heat map."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix)
    names = [str(x) for x in labels] if labels is not None else [str(i) for i in range(len(counts))]
    size = 2.5 + 0.6 * len(counts)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    for (i, j), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path, title, description="labels: " + ", ".join(names))


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _save(fig, path: str | Path, title: str, description: str | None = None) -> Path:
    """The figure as a PNG whose text chunks carry its title (and description)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    metadata = {"Title": title, **({"Description": description} if description else {})}
    fig.savefig(path, dpi=100, metadata=metadata)
    _pyplot().close(fig)  # figures live until closed; sweeps draw many
    return path
