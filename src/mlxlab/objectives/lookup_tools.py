"""A task a model cannot do without its tool: the code of a made-up name, from a fixed table.

`lookup_code(name)` answers the three-digit code of a name (the first digits of the name's
SHA-256: deterministic, and unknowable to a model that has not called the tool); unknown names
raise, so a misspelled call comes back as an error the model reads. experiment=agent_tools
trains GRPO with it on the prompts of `assets/lookup_codes/` ("What is the code of <name>?",
answer the code), written by `write_rows` (`python -m mlxlab.objectives.lookup_tools <folder>`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

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
