"""The `eval` config node (conf/train.yaml): which task files a training run scores at each
evaluation, and how; `mlxlab eval` takes the same settings from its options."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxlab.config.records import check_choice, check_number
from mlxlab.errors import ConfigError
from mlxlab.evaluation.lm_eval.tasks import (
    MTEB_PREFIX,
    HarnessOptions,
    check_entries,
    is_harness_entry,
)
from mlxlab.evaluation.speech.word_errors import NORMALIZERS
from mlxlab.evaluation.tasks import read_tasks

CHAT_MODES = ("auto", "template", "plain")


@dataclass(frozen=True)
class TaskSettings:
    """eval.tasks: jsonl task files (evaluation/tasks.py) and lm-eval-harness tasks, groups or
    task YAMLs (evaluation/lm_eval/scores.py); eval.num_fewshot / eval.limit: lm-eval's (None: each
    task's few-shot count, every example); eval.batch_size: sequences scored
    at once; eval.max_new_tokens: generation tasks' greedy token limit; eval.stop: strings that
    end a generation (the text is cut before them; [] to stop only at end-of-text);
    eval.chat: auto (a model with a chat template sees prompts through it) | template (it must
    have one) | plain (never). Transcription tasks (audio rows, evaluation/speech/):
    eval.language: the audio's language (null: a training run's data.language, else en);
    eval.beam_size: 1 decodes greedily, N > 1 with a beam search of N; eval.normalizer: how
    references and transcriptions are normalized before the word error rate (auto: Whisper's
    English normalizer for English, its basic one otherwise | english | basic | none)."""

    tasks: tuple[str, ...] = ()
    batch_size: int = 16
    max_new_tokens: int = 32
    stop: tuple[str, ...] = field(default=("\n",))
    chat: str = "auto"
    num_fewshot: int | None = None
    limit: float | None = None
    language: str | None = None
    beam_size: int = 1
    normalizer: str = "auto"

    @property
    def files(self) -> list[str]:
        """mlxlab's own jsonl tasks."""
        return [t for t in self.tasks if not is_harness_entry(t)]

    @property
    def harness(self) -> list[str]:
        """lm-eval's tasks, groups and task YAMLs (evaluation/lm_eval/scores.py)."""
        return [t for t in self.tasks if is_harness_entry(t)]

    def harness_options(self) -> HarnessOptions:
        """lm-eval's settings: the chat template only with eval.chat=template (lm-eval's own
        default is plain prompts)."""
        limit = self.limit
        return HarnessOptions(self.num_fewshot,
                              int(limit) if limit is not None and limit >= 1 else limit,
                              apply_chat_template=self.chat == "template")

    def __post_init__(self) -> None:
        tasks = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        if tasks is None:
            tasks = ()
        if not isinstance(tasks, (list, tuple)):
            raise ConfigError(f"eval.tasks must be a list of jsonl files, got {self.tasks!r}: "
                              "e.g. eval.tasks=[a.jsonl,b.jsonl]")
        object.__setattr__(self, "tasks", tuple(str(t) for t in tasks))
        object.__setattr__(self, "stop", tuple(str(s) for s in (self.stop or ())))
        mteb = [t for t in self.tasks if t.startswith(MTEB_PREFIX)]
        if mteb:  # mteb's evaluation takes minutes per task: once, on the finished embedder
            raise ConfigError(f"eval.tasks: {mteb[0]} is an MTEB task, not scored at a training "
                              f"run's evaluations; score the finished embedder with `mlxlab eval "
                              f"RUN --tasks {mteb[0]}`")
        check_number("eval.batch_size", self.batch_size, int, 1)
        check_number("eval.max_new_tokens", self.max_new_tokens, int, 1)
        check_choice("eval.chat", self.chat, CHAT_MODES)
        check_number("eval.beam_size", self.beam_size, int, 1)
        check_choice("eval.normalizer", self.normalizer, NORMALIZERS)
        if self.language is not None and not (isinstance(self.language, str) and self.language):
            raise ConfigError(f"eval.language={self.language!r}: a Whisper language code (en, "
                              "de, ...) or null")
        if self.num_fewshot is not None:
            check_number("eval.num_fewshot", self.num_fewshot, int, 0)
        if self.limit is not None:
            check_number("eval.limit", self.limit, float, 0)
            if self.limit == 0:
                raise ConfigError("eval.limit must be > 0: examples per lm-eval task, or a "
                                  "fraction below 1; null for all")
        if self.files:
            read_tasks(self.files)  # each file read and checked before anything trains
        check_entries(self.harness)  # lm-eval installed, every name known, every YAML there
