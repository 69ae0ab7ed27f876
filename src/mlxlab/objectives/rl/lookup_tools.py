"""A task a model cannot do without its tool: the code of a made-up name, from a fixed table.

`lookup_code(name)` answers the three-digit code of a name (the first digits of the name's
SHA-256: deterministic, and unknowable to a model that has not called the tool); unknown names
raise, so a misspelled call comes back as an error the model reads. experiment=agent_tools
trains GRPO with it on the prompts of `assets/lookup_codes/` ("What is the code of <name>?",
answer the code), written by `write_rows` (`python -m mlxlab.objectives.rl.lookup_tools <folder>`).
`QuestionLookup` is the same task with an environment that knows the question: a call of
lookup_code is answered with the code of the name the prompt asks about, whatever arguments the
call wrote, so a model need not copy the name into its call (only the code into its reply).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxlab.objectives.rl.environments import Step, ToolEnvironment
from mlxlab.objectives.rl.tool_format import ParsedTurn
from mlxlab.objectives.rl.tools import Toolbox, ToolCall

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "su")
NAMES = tuple(a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:4])
QUESTION = "What is the code of {name}? Reply with the code only."


def code_of(name: str) -> str:
    """The table's code of `name`: three digits of its SHA-256."""
    return f"{int(hashlib.sha256(name.encode()).hexdigest(), 16) % 1000:03d}"


def lookup_code(name: str) -> str:
    """Look up the secret three-digit code of a name in the code table.

    Args:
        name: the name whose code is wanted, e.g. "kalomi"
    """
    name = name.strip().lower()
    if name not in NAMES:
        raise KeyError(f"no name {name!r} in the code table")
    return code_of(name)


class QuestionLookup(ToolEnvironment):
    """The lookup task's environment (module docstring): every lookup_code call looks up the
    name of the prompt's question; other calls and unparsed ones are answered as
    ToolEnvironment answers them."""

    def reset(self, prompt: Any, columns: Mapping[str, Any], toolbox: Toolbox) -> None:
        super().reset(prompt, columns, toolbox)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        found = re.search(QUESTION.format(name=r"(\w+)").replace("?", r"\?"), text)
        self.name = found.group(1) if found else ""

    def step(self, turn: ParsedTurn) -> Step:
        if not turn.wants_tools:
            return Step(done=True)
        answers = [self.toolbox.call(ToolCall(c.name, {"name": self.name})
                                     if c.name == "lookup_code" else c) for c in turn.calls]
        answers += [self.toolbox.refuse(error) for error in turn.errors]
        return Step(answers)


def rows(names: tuple[str, ...]) -> list[dict]:
    """Chat prompts asking for the codes of `names`, with the answers."""
    return [{"messages": [{"role": "user", "content": QUESTION.format(name=n)}],
             "answer": code_of(n)} for n in names]


def write_rows(folder: str | Path, heldout: int = 100) -> None:
    """train.jsonl (every name but the last `heldout`) and heldout.jsonl in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", NAMES[:-heldout]), ("heldout", NAMES[-heldout:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(part)))


if __name__ == "__main__":
    write_rows(sys.argv[1])
