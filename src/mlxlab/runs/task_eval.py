"""Evaluation tasks on any model: `mlxlab eval MODEL TASK...`.

MODEL is a Hugging Face or mlx-lm folder (a pretrained checkpoint, or what `mlxlab export`
wrote) or a finished run (its best or last checkpoint). The tasks are scored as a training run
scores them at an evaluation (evaluation/scoring.py), the per-example scores written to a folder
(evaluation/results.py) and the whole logged as an MLflow run of its own (tag mlxlab.role=eval,
metrics eval/<task>/<metric> at step 0, the folder as the artifacts eval_tasks/), so a base model
and its fine-tunes sit side by side in the store and `mlxlab runs compare` pairs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from tokenizers import Tokenizer

from mlxlab.data.chat import ChatTemplate
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.evaluation.results import FOLDER, write_scores
from mlxlab.evaluation.scoring import TaskScores, chat_template, metric_keys, score_tasks
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import Task
from mlxlab.runs.learned_reward import is_reward_run
from mlxlab.runs.loading import load_run, require_task
from mlxlab.runs.model_source import RUN, open_model_source
from mlxlab.tracking import tags as T

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    """A model to score and where it came from: `kind` pretrained | export | run; a run's
    `checkpoint` and MLflow `run_id` (None elsewhere)."""

    model: nn.Module
    tokenizer: Tokenizer
    path: Path
    kind: str
    checkpoint: Path | None = None
    run_id: str | None = None
    template: ChatTemplate | None = None  # a chat model's: its prompts go through it
    tokenizer_folder: Path | None = None  # its tokenizer files (and end-of-text settings)
    provenance: dict = field(default_factory=dict)  # a model's (model_source.ModelSource)


def refuse_reward_model(name: str | Path, purpose: str = "scoring evaluation tasks") -> None:
    """One ConfigError line when `name` is a reward model's run (a score head: no next-token
    distribution to generate from or score choices with), before anything is loaded or logged."""
    try:
        source = open_model_source(name)
    except MissingFileError:  # the loading names it
        return
    if source.kind == RUN and is_reward_run(source.path):
        raise ConfigError(f"{source.path} is a reward model (model.head=score): it scores "
                          f"(prompt, completion) rows and cannot be used for {purpose}; give a "
                          "language model's run or folder (mlxlab eval REWARD_RUN rows.jsonl "
                          "scores rows with it)")


def load_eval_model(name: str | Path, which: str = "best", chat: str = "auto",
                    purpose: str = "scoring evaluation tasks") -> EvalModel:
    """The decoder `name` names (open_model_source: a Hugging Face / mlx-lm / exported folder,
    or a finished run, its `which` checkpoint), with the tokenizer it reads and, per `chat`
    (eval.chat), its chat template. `purpose` names the use in the error for a classifier."""
    refuse_reward_model(name, purpose)
    source = open_model_source(name)
    path = source.path
    if source.kind != RUN:
        from mlxlab.models.pretrained import pretrained_model

        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path} has no tokenizer.json: {purpose} needs the model's fast "
                              "tokenizer (saved by transformers) beside it")
        if (path / "adapters").is_dir():
            raise ConfigError(f"{path} holds a base model and LoRA adapters (mlxlab export "
                              "--adapters): use the run itself, or an export with --fuse-lora")
        model = pretrained_model(path)
        model.eval()
        return EvalModel(model, Tokenizer.from_file(str(path / "tokenizer.json")), path,
                         source.kind, template=chat_template(path, chat), tokenizer_folder=path,
                         provenance=source.provenance)
    run = load_run(path, which)
    require_task(run, "lm", purpose)
    folder = run.tokenizer_path.parent
    return EvalModel(run.model, run.tokenizer, path, RUN, run.checkpoint, run.state.run_id,
                     chat_template(folder, chat), tokenizer_folder=folder)


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
    settings; lm-eval's `harness` entries and `options`), tags (eval_tags), metrics at step 0
    (lm-eval's `groups` too), the folder as artifacts eval_tasks/. Returns the run's id."""
    params = {"model": str(source.path), "model_kind": source.kind,
              "checkpoint": str(source.checkpoint or ""),
              "tasks": ",".join([*(str(t.path) for t in tasks), *harness]),
              **({f"lm_eval.{k}": v for k, v in asdict(options).items()} if harness else {}),
              "eval.batch_size": settings.batch_size,
              "eval.max_new_tokens": settings.max_new_tokens,
              "eval.stop": repr(list(settings.stop)),
              "prompts": "plain" if source.template is None else "chat template",
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
