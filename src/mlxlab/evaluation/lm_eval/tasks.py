"""Which entries of a task list are lm-evaluation-harness's, its options, and the checks made
before anything is scored or trained (evaluation/lm_eval/scores.py scores them)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError, MissingFileError

KIND_PREFIX = "lm_eval:"
MTEB_PREFIX = "mteb:"  # evaluation/mteb/tasks.py PREFIX: an entry that is MTEB's
INSTALL = 'pip install "lm-eval>=0.4,<0.5"'


def is_harness_entry(entry: str | Path) -> bool:
    """An lm-eval task (a name or a YAML file), not one of mlxlab's jsonl tasks nor an MTEB
    task (`mteb:NAME`, evaluation/mteb/)."""
    return not str(entry).endswith(".jsonl") and not str(entry).startswith(MTEB_PREFIX)


def is_harness_kind(kind: str) -> bool:
    return kind.startswith(KIND_PREFIX)


@dataclass(frozen=True)
class HarnessOptions:
    """lm-eval's own settings of a scoring: `num_fewshot` (None: each task's), `limit`
    (examples per task; below 1 a fraction), the chat template (`apply_chat_template`,
    `system_instruction`, `fewshot_as_multiturn`)."""

    num_fewshot: int | None = None
    limit: float | None = None
    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool | None = None  # None: with the chat template, as lm-eval's command

    def __post_init__(self) -> None:
        if self.fewshot_as_multiturn is None:
            object.__setattr__(self, "fewshot_as_multiturn", self.apply_chat_template)
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ConfigError("--fewshot-as-multiturn needs --apply-chat-template: few-shot "
                              "examples become turns of the model's chat template")

    @property
    def prompts(self) -> str:
        return "chat template" if self.apply_chat_template else "plain"


def lm_eval_module() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness: {INSTALL} (or give jsonl "
                          "task files)") from None
    return lm_eval


def is_yaml(entry: str | Path) -> bool:
    return str(entry).endswith((".yaml", ".yml"))


@functools.cache
def task_manager(names: bool = True) -> Any:
    """lm-eval's TaskManager, once per process: with its own tasks indexed when `names` are
    asked for (indexing its ~15,000 YAML files takes tens of seconds on 2 cores), else none
    (YAML files are read by their path)."""
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=names)


def check_entries(entries: Sequence[str]) -> None:
    """Every entry names an lm-eval task, group or tag, or is a YAML file that exists; one
    ConfigError naming the first that does not."""
    if not entries:
        return
    lm_eval_module()
    for entry in filter(is_yaml, entries):
        if not Path(entry).expanduser().is_file():
            raise MissingFileError(f"lm-eval task file not found: {entry}")
    names = [e for e in entries if not is_yaml(e)]
    if not names:
        return
    manager = task_manager(True)
    known = set(manager.all_tasks)
    for entry in names:
        if entry not in known:
            close = [t for t in manager.all_tasks if entry.lower() in t.lower()][:5]
            raise ConfigError(f"{entry!r} is neither a jsonl task file nor an lm-eval task, "
                              f"group or tag{' (close: ' + ', '.join(close) + ')' if close else ''}"
                              ": `lm-eval ls tasks` lists them")
