"""Evaluation tasks inside a training run: `eval.tasks=[a.jsonl, b.jsonl, arc_easy]` (jsonl files
and lm-eval-harness tasks, evaluation/lm_eval/scores.py) scores every task at
each evaluation of the validation split, as one more evaluation hooked onto it (a callback's
on_eval, not a second loop); ObjectiveScores keeps the per-example scores an objective's own
evaluation carries (the embedding objectives' retrieval queries) the same way.

Each evaluation logs `eval/<task>/<metric>` at its step and writes the per-example scores to
`<run dir>/eval_tasks/last/`; the evaluation that is best by the run's monitor
(optimized_metric), a tie on it broken as the loop breaks it (checkpoint.choose_best), also to
`eval_tasks/best/`, so the best folder matches the best checkpoint.
Both folders are logged as artifacts when the run ends; `mlxlab runs compare` pairs them with
another run's, `mlxlab export` writes them into the model card. Rank 0 scores (the others would
compute the same numbers). A chat model (a pretrained folder with a chat template, whose side files
the run folder keeps) sees the prompts through its template (eval.chat). A speech run (data=speech)
scores transcription tasks (audio/text rows: word and character error rates per utterance,
evaluation/speech/) with its Whisper tokenizer, in data.language unless eval.language says another.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlxlab.checkpoint import choose_best
from mlxlab.data.chat import chat_template
from mlxlab.errors import ConfigError
from mlxlab.evaluation.results import FOLDER, write_scores
from mlxlab.evaluation.scoring import TaskScores, metric_keys, score_tasks
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.tasks import read_tasks
from mlxlab.objectives.base import Evaluation
from mlxlab.training.callbacks import Callback
from mlxlab.training.state import TrainContext

log = logging.getLogger("mlxlab.training")


class TaskEvaluation(Callback):
    """Scores `settings.tasks` on the training model at each evaluation (see the module)."""

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        self.tasks: list = []
        self.model = self.tokenizer = self.tracker = self.folder = None
        self.monitor, self.mode = None, "max"
        self.enabled = True
        self.template = None
        self.harness_lm = None  # lm-eval's view of the model, for lm-eval's tasks
        self.best_metrics: dict[str, float] = {}  # the best evaluation's, as the loop picks it
        self.tie_break: tuple[str, str] | None = None

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        if context.task in ("classification", "embedding"):  # the others tune language models
            raise ConfigError(f"eval.tasks scores language models; this run's data is "
                              f"{context.task}: drop eval.tasks or train a language model")
        self.tasks = read_tasks(self.settings.files) if self.settings.files else []
        self.model, self.tokenizer = model, data.tokenizer
        from mlxlab.evaluation.speech.scoring import check_pairing

        check_pairing(model, self.tasks)  # transcription tasks on a Whisper, the rest on an LM
        if context.task == "speech":
            self._speech(data)
        if self.settings.harness:  # lm-eval's tasks: the run folder holds the tokenizer's files
            from mlxlab.evaluation.lm_eval.model import MlxlabLM, hf_tokenizer

            self.harness_lm = MlxlabLM(model, hf_tokenizer(context.run_dir),
                                       self.settings.batch_size)
        self.tracker, self.folder = context.tracker, Path(context.run_dir) / FOLDER
        self.monitor, self.mode = context.monitor, context.monitor_mode
        self.tie_break = context.tie_break
        self.enabled = context.world.is_main
        # a chat model's template: the run folder holds the pretrained folder's side files
        self.template = chat_template(context.run_dir, self.settings.chat)

    def _speech(self, data: Any) -> None:
        """A Whisper run: transcription tasks only, transcribed with the data's
        WhisperTokenizer in the data's language unless eval.language says another."""
        from dataclasses import replace

        if self.settings.harness:
            raise ConfigError(f"eval.tasks: {self.settings.harness[0]} is an lm-eval task; a "
                              "speech run scores transcription tasks (audio/text jsonl files)")
        self.tokenizer = data.whisper_tokenizer
        if self.settings.language is None:
            self.settings = replace(self.settings, language=data.language or "en")

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        scores = score_tasks(self.model, self.tokenizer, self.tasks, self.settings,
                             self.template)
        groups: dict[str, float] = {}
        if self.harness_lm is not None:
            from mlxlab.evaluation.lm_eval.scores import score_harness

            harness, groups = score_harness(self.harness_lm, self.settings.harness,
                                            self.settings.harness_options())
            scores = [*harness, *scores]
        logged = {**metric_keys(scores), **groups}
        self.tracker.log_metrics(logged, step)
        write_scores(scores, self.folder / "last", step)
        if choose_best(metrics, self.best_metrics, self.monitor, self.mode, step,
                       self.tie_break).better:
            self.best_metrics = {**metrics, "best_step": float(step)}
            write_scores(scores, self.folder / "best", step)
        log.info("step %d tasks: %s", step, "  ".join(f"{k[5:]} {v:.4f}" for k, v in logged.items()))

    def on_train_end(self) -> None:
        if not self.enabled or self.folder is None:
            return
        for which in ("best", "last"):
            if (self.folder / which).is_dir():
                self.tracker.log_artifact(str(self.folder / which), f"{FOLDER}/{which}")

    def state_dict(self) -> dict:
        return {"best_metrics": self.best_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.best_metrics = dict(state.get("best_metrics") or {})


class ObjectiveScores(Callback):
    """The per-example task scores an objective's evaluation carries (Evaluation.tasks: the
    embedding objectives' retrieval set, per query), kept as eval.tasks' are: eval_tasks/last at
    every evaluation, eval_tasks/best at the run's best one, both logged when the run ends."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.tracker = None
        self.enabled = False
        self.written = False

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        self.folder, self.tracker = Path(context.run_dir) / FOLDER, context.tracker
        self.enabled = context.world.is_main

    def on_evaluation(self, step: int, evaluation: Evaluation, best: bool) -> None:
        if not (self.enabled and evaluation.tasks):
            return
        scores = [TaskScores(t.task, t.kind, dict(t.metrics), list(t.rows),
                             higher_is_better=dict(t.higher_is_better)) for t in evaluation.tasks]
        write_scores(scores, self.folder / "last", step)
        if best:
            write_scores(scores, self.folder / "best", step)
        self.written = True

    def on_train_end(self) -> None:
        if not self.written:
            return
        for which in ("best", "last"):
            if (self.folder / which).is_dir():
                self.tracker.log_artifact(str(self.folder / which), f"{FOLDER}/{which}")


def task_scoring(settings: TaskSettings | None) -> list[Callback]:
    """The callbacks that keep a run's per-example task scores: an objective's own
    (ObjectiveScores, in every run: it writes only what an evaluation carries) and, with
    `eval.tasks`, one TaskEvaluation."""
    kept = ObjectiveScores()
    kept.name = "objective_scores"
    if settings is None or not settings.tasks:
        return [kept]
    scoring = TaskEvaluation(settings)
    scoring.name = "eval_tasks"
    return [kept, scoring]
