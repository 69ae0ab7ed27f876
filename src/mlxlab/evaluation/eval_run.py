"""Evaluation tasks on any model: `mlxlab eval MODEL TASK...`.

MODEL is what runs/named_model.py loads (a Hugging Face or mlx-lm folder, or a finished run's
best or last checkpoint). The tasks are scored as a training run scores them at an evaluation
(scoring.py), the per-example scores written to a folder (results.py) and the whole logged as an
MLflow run of its own (tag mlxlab.role=eval, metrics eval/<task>/<metric> at step 0, the folder
as the artifacts eval_tasks/), so a base model and its fine-tunes sit side by side in the store
and `mlxlab runs compare` pairs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.evaluation.results import FOLDER, write_scores
from mlxlab.evaluation.scoring import TaskScores, metric_keys, score_tasks
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import TRANSCRIPTION, Task
from mlxlab.runs.named_model import EvalModel
from mlxlab.tracking import tags as T


def evaluate_tasks(source: EvalModel, tasks: Sequence[Task], settings: TaskSettings,
                   folder: str | Path, scored: Sequence[TaskScores] = ()) -> list[TaskScores]:
    """Every task scored on the model, the per-example scores written to `folder` with those
    of tasks `scored` already (lm-eval's)."""
    scores = [*scored, *score_tasks(source.model, source.tokenizer, tasks, settings,
                                    source.template)]
    names = [s.task for s in scores]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"two tasks named {', '.join(twice)} (their metrics "
                          f"eval/{twice[0]}/...): rename the jsonl file")
    write_scores(scores, folder)
    return scores


def eval_tags(source: EvalModel) -> dict[str, str]:
    """What the eval run says about the model it scored (tracking/tags.py EVAL_*)."""
    tags = {T.ROLE: "eval", T.EVAL_MODEL: str(source.path), T.EVAL_MODEL_KIND: source.kind}
    if source.checkpoint is not None:
        tags[T.EVAL_CHECKPOINT] = str(source.checkpoint)
    if source.run_id:
        tags[T.EVAL_SOURCE_RUN] = source.run_id
    return tags


def log_eval_run(tracker, source: EvalModel, tasks: Sequence[Task], settings: TaskSettings,
                 scores: Sequence[TaskScores], folder: str | Path,
                 harness: Sequence[str] = (), options: Any = None,
                 groups: dict[str, float] | None = None) -> str | None:
    """The scores as a finished run of `tracker` (started here): params (the model, tasks and
    settings; lm-eval's or MTEB's `harness` entries, lm-eval's `options`), tags (eval_tags), metrics at step 0
    (lm-eval's `groups` too), the folder as artifacts eval_tasks/. Returns the run's id."""
    params = {"model": str(source.path), "model_kind": source.kind,
              "checkpoint": str(source.checkpoint or ""),
              "tasks": ",".join([*(str(t.path) for t in tasks), *harness]),
              **({f"lm_eval.{k}": v for k, v in asdict(options).items()}
                 if harness and options is not None else {}),
              "eval.batch_size": settings.batch_size,
              "eval.max_new_tokens": settings.max_new_tokens,
              "eval.stop": repr(list(settings.stop)),
              "prompts": "plain" if source.template is None else "chat template",
              **({"eval.language": settings.language or "en",
                  "eval.beam_size": settings.beam_size, "eval.normalizer": settings.normalizer}
                 if any(s.kind == TRANSCRIPTION for s in scores) else {}),
              **{f"model_source.{k}": v for k, v in source.provenance.items()}}
    tracker.start(params, eval_tags(source))
    status = "FAILED"
    try:
        tracker.log_metrics({**metric_keys(scores), **(groups or {})}, 0)
        tracker.log_artifact(str(folder), FOLDER)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return tracker.run_id
