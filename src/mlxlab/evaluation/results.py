"""Per-example scores on disk: one folder per evaluation, a `<task>.jsonl` of rows (id and
scores) per task and `summary.json` (each task's kind, metrics and example count). A training run
keeps `eval_tasks/best/` and `eval_tasks/last/` in its folder and its MLflow artifacts; `mlxlab
eval` logs `eval_tasks/`. Pairing two runs (paired.py) and the model card (export/) read them; the summary
says how prompts were written (plain, or through the model's chat template).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxlab.evaluation.scoring import TaskScores
from mlxlab.evaluation.speech.word_errors import RATES
from mlxlab.evaluation.tasks import BINARY_SCORES, PERPLEXITY, TRANSCRIPTION
from mlxlab.stats import CONFIDENCE, proportion_interval

FOLDER = "eval_tasks"
SUMMARY = "summary.json"


def write_scores(scores: Sequence[TaskScores], folder: str | Path, step: int | None = None
                 ) -> Path:
    """Write each task's rows and the summary into `folder` (replaced whole, atomically enough
    for a reader: each file renamed into place)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"step": step, "tasks": {}}
    for s in scores:
        _write(folder / f"{s.task}.jsonl", "".join(json.dumps(r) + "\n" for r in s.rows))
        summary["tasks"][s.task] = {"kind": s.kind, "metrics": s.metrics, "n": len(s.rows),
                                    "prompts": s.prompts,
                                    **({"higher_is_better": s.higher_is_better}
                                       if s.higher_is_better else {}),
                                    **({"corpus": s.corpus} if s.corpus else {})}
    _write(folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return folder


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class SavedTask:
    """A task's scores read back: kind, metrics, rows (one dict per example)."""

    task: str
    kind: str
    metrics: dict[str, float]
    rows: list[dict]
    prompts: str = "plain"
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # TaskScores'
    corpus: dict[str, str] = field(default_factory=dict)  # TaskScores'

    def by_id(self) -> dict[str, dict]:
        return {str(r["id"]): r for r in self.rows}


def read_scores(folder: str | Path) -> dict[str, SavedTask]:
    """The tasks of a folder write_scores wrote; {} when there is none."""
    folder = Path(folder)
    if not (folder / SUMMARY).is_file():
        return {}
    summary = json.loads((folder / SUMMARY).read_text())
    out = {}
    for name, info in summary["tasks"].items():
        lines = (folder / f"{name}.jsonl").read_text().splitlines()
        out[name] = SavedTask(name, info["kind"], info["metrics"],
                              [json.loads(line) for line in lines if line.strip()],
                              info.get("prompts", "plain"), info.get("higher_is_better", {}),
                              info.get("corpus", {}))
    return out


def intervals(task: SavedTask | TaskScores, confidence: float = CONFIDENCE, rounds: int = 2000,
              seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """(value, low, high) of each metric over the task's examples: Wilson's interval of k right
    of n for accuracies (stats.proportion_interval: inside [0, 1], honest at 0/n and n/n); a
    bootstrap over texts of the token-weighted loss for perplexity tasks (an lm-eval task's
    other scores: none here; its examples still pair) (perplexity and bits
    per byte follow from the loss's bounds); a bootstrap over utterances of a transcription task's
    corpus WER and CER."""
    rows = task.rows
    if task.kind == TRANSCRIPTION:
        return _rate_intervals(rows, confidence, rounds, seed)
    if task.kind != PERPLEXITY:
        out = {}
        for key in task.metrics:
            values = [float(r[key]) for r in rows if key in r]
            # right/wrong scores: mlxlab's own, or an lm-eval task's whose every value is 0 or 1
            if values and len(values) == len(rows) and (key in BINARY_SCORES or (
                    key in task.higher_is_better and set(values) <= {0.0, 1.0})):
                right = sum(v > 0.5 for v in values)
                low, high = proportion_interval(right, len(rows), confidence)
                out[key] = (right / len(rows), low, high)
        return out
    nll = np.array([r["nll"] for r in rows], np.float64)
    tokens = np.array([r["tokens"] for r in rows], np.float64)
    nbytes = float(sum(r["bytes"] for r in rows))
    picks = np.random.default_rng(seed).integers(0, len(rows), size=(rounds, len(rows)))
    losses = nll[picks].sum(axis=1) / tokens[picks].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(losses, [tail, 1 - tail]))
    loss = float(nll.sum() / tokens.sum())
    per_byte = tokens.sum() / nbytes / math.log(2)
    return {"loss": (loss, low, high),
            "perplexity": (math.exp(loss), math.exp(low), math.exp(high)),
            "bits_per_byte": (loss * per_byte, low * per_byte, high * per_byte)}


def _rate_intervals(rows: Sequence[dict], confidence: float, rounds: int, seed: int
                    ) -> dict[str, tuple[float, float, float]]:
    """(rate, low, high) of a transcription task's WER and CER: the percentile bootstrap over
    utterances of the sum of the errors over the sum of the reference lengths."""
    picks = np.random.default_rng(seed).integers(0, len(rows), size=(rounds, len(rows)))
    tail = (1 - confidence) / 2
    out = {}
    for rate, (errors, length) in RATES.items():
        e = np.array([r[errors] for r in rows], np.float64)
        n = np.array([r[length] for r in rows], np.float64)
        boot = e[picks].sum(axis=1) / n[picks].sum(axis=1)
        low, high = (float(v) for v in np.quantile(boot, [tail, 1 - tail]))
        out[rate] = (float(e.sum() / n.sum()), low, high)
    return out
