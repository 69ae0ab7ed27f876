"""The `eval` config node (conf/train.yaml): which task files a training run scores at each
evaluation, and how; `mlxlab eval` takes the same settings from its options."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlxlab.config.records import check_choice, check_number
from mlxlab.errors import ConfigError
from mlxlab.evaluation.tasks import read_tasks

CHAT_MODES = ("auto", "template", "plain")


@dataclass(frozen=True)
class TaskSettings:
    """eval.tasks: jsonl task files (evaluation/tasks.py); eval.batch_size: sequences scored
    at once; eval.max_new_tokens: generation tasks' greedy token limit; eval.stop: strings that
    end a generation (the text is cut before them; [] to stop only at end-of-text);
    eval.chat: auto (a model with a chat template sees prompts through it) | template (it must
    have one) | plain (never)."""

    tasks: tuple[str, ...] = ()
    batch_size: int = 16
    max_new_tokens: int = 32
    stop: tuple[str, ...] = field(default=("\n",))
    chat: str = "auto"

    def __post_init__(self) -> None:
        tasks = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        if tasks is None:
            tasks = ()
        if not isinstance(tasks, (list, tuple)):
            raise ConfigError(f"eval.tasks must be a list of jsonl files, got {self.tasks!r}: "
                              "e.g. eval.tasks=[a.jsonl,b.jsonl]")
        object.__setattr__(self, "tasks", tuple(str(t) for t in tasks))
        object.__setattr__(self, "stop", tuple(str(s) for s in (self.stop or ())))
        check_number("eval.batch_size", self.batch_size, int, 1)
        check_number("eval.max_new_tokens", self.max_new_tokens, int, 1)
        check_choice("eval.chat", self.chat, CHAT_MODES)
        if self.tasks:
            read_tasks(list(self.tasks))  # each file read and checked before anything trains
