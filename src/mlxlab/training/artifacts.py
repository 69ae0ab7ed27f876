"""What a finished fit leaves beside its checkpoints (rank 0): the loss curve and, for classifiers,
the best evaluation's confusion matrix and per-row predictions as artifacts, and with
trainer.quantize_bits the best weights quantized, evaluated and saved as checkpoints/quantized."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import mlx.nn as nn
import numpy as np

from mlxlab.checkpoint import CheckpointManager, CheckpointState
from mlxlab.checkpoint.layout import QUANTIZED
from mlxlab.models.quantized.quantize import GROUP_SIZE, parameter_mb, quantize_linears
from mlxlab.objectives import metrics
from mlxlab.objectives.base import Evaluation
from mlxlab.tracking.base import Tracker
from mlxlab.training.state import RunState

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions/val_best.csv"


def log_artifacts(tracker: Tracker, run_dir: Path, state: RunState, data,
                  best: Path | None) -> None:
    """Plots, predictions, the run's Hydra config, best checkpoint and tokenizer, as artifacts."""
    from mlxlab.tracking import plots  # matplotlib: only at the end of a run

    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    tracker.log_artifact(plots.loss_curve_png(state.history, plot_dir / "loss_curve.png"), "plots")
    best_eval = state.best_eval
    if data.task == "classification" and best_eval is not None:
        labels, probs = best_eval.labels, best_eval.probs
        cm = metrics.confusion_matrix(labels, probs.argmax(axis=1), probs.shape[1])
        step = int(state.best_metrics.get("best_step", state.step))
        png = plots.confusion_matrix_png(cm, plot_dir / "confusion_matrix.png",
                                         data.label_names or None,
                                         title=f"validation confusion matrix, step {step}")
        tracker.log_artifact(png, "plots")
        # per-row predictions: `mlxlab runs compare` tests two configs row by row from these
        tracker.log_artifact(write_predictions(labels, probs, run_dir), "predictions")
    if (run_dir / ".hydra").is_dir():
        tracker.log_artifact(run_dir / ".hydra", ".hydra")
    if best is not None:
        tracker.log_artifact(best, "checkpoint")
    if (run_dir / "tokenizer.json").exists():
        tracker.log_artifact(run_dir / "tokenizer.json")


def write_predictions(labels: np.ndarray, probs: np.ndarray, run_dir: Path) -> Path:
    """The best checkpoint's validation predictions, a row per example in the validation
    order: its label, the predicted label and that label's probability."""
    path = run_dir / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(axis=1)
    lines = ["row,label,prediction,probability"]
    lines += [f"{i},{int(y)},{int(p)},{float(probs[i, p]):.6g}"
              for i, (y, p) in enumerate(zip(labels, predicted))]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_quantized(model: nn.Module, evaluate: Callable[[nn.Module, str], Evaluation], bits: int,
                   monitor: str, float_metrics: dict[str, float],
                   state_now: Callable[[], CheckpointState], manager: CheckpointManager,
                   tracker: Tracker, step: int) -> dict[str, float]:
    """trainer.quantize_bits: `model` (the best weights) quantized in place, evaluated (by
    `evaluate(model, prefix)`, the run's objective's evaluation), and saved
    beside the float ones as checkpoints/quantized (what `mlxlab predict/eval/serve --checkpoint
    quantized` load) with the state `state_now()` gives then; the sizes and metrics of both,
    logged and returned."""
    float_mb = parameter_mb(model)
    quantize_linears(model, bits)
    results = evaluate(model, f"val_q{bits}").metrics
    results["model/size_mb"] = float_mb
    results[f"model/q{bits}_size_mb"] = parameter_mb(model)
    tracker.log_metrics(results, step)
    state = state_now()
    state.extra["quantization"] = {"bits": bits, "group_size": GROUP_SIZE}
    path = manager.save_named(QUANTIZED, model, state)
    quantized_monitor = monitor.replace("val/", f"val_q{bits}/", 1)
    log.info("quantized to %d bits: %.2f MB (float %.2f MB); %s %.4f (float %.4f); saved %s",
             bits, results[f"model/q{bits}_size_mb"], float_mb, quantized_monitor,
             results.get(quantized_monitor, math.nan), float_metrics.get(monitor, math.nan), path)
    tracker.log_artifact(path, "checkpoint_quantized")
    return results
