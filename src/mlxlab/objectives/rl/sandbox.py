"""`run_python`: a tool that runs the Python program the model wrote, confined.

Model-written code is what agent RL most often executes (math and code tasks); it is not a
trusted tool's code, so it never runs in the trainer or in a tool's worker: each call runs it in
a confined interpreter of its own (sandbox/confine.py: CPU, memory, file-size and process
limits, no network, no other process in reach (the trainer included), no files but its
scratch folder and the interpreter's, the folder deleted afterwards) and answers what it printed, cut to `SandboxLimits.output_chars`:

    objective.tools=[{_target_: mlxlab.objectives.rl.sandbox.run_python}]

Where no kernel layer can confine it (sandbox/confine.py: no Landlock and seccomp, no macOS
Seatbelt) the program is refused and the answer is that one line; objectives/rl/
python_only_not_a_boundary.py's `run_python` runs it there under the Python audit hook alone.

Other limits: a function of your own calling `run_code` with its own `SandboxLimits` (the
model sees a tool's arguments, so limits are never arguments of the tool itself). The tool's
worker is killed at `objective.tool_timeout_s`, and the sandboxed process with it; keep
`SandboxLimits.wall_s` below that timeout to get the program's own output.

`write_rows(folder)` writes the example task of the agents guide: products of two five-digit
numbers, beyond what a small model computes in its head, easy for one that calls the tool
(`python -m mlxlab.objectives.rl.sandbox <folder>`).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from mlxlab.sandbox.confine import SandboxLimits, SandboxResult, run_code, sandbox_refusal

LIMITS = SandboxLimits()
QUESTION = "What is {a} * {b}? Reply with the number only."


def answer_text(result: SandboxResult) -> str:
    """What the model reads: stdout, then stderr, then why a limit stopped it, if one did."""
    parts = [result.stdout.rstrip("\n")] if result.stdout else []
    if result.stderr:
        parts.append(result.stderr.rstrip("\n"))
    if result.stopped:
        parts.append(f"[stopped: the {result.stopped} was reached]")
    if result.cut:
        parts.append(f"[{result.cut} more characters of output left out]")
    return "\n".join(parts) if parts else "(the program printed nothing)"


def run_python(code: str) -> str:
    """Run a Python program and return what it prints (stdout, then any error).

    Args:
        code: the program's source, e.g. "print(48271 * 99173)"
    """
    return answer_text(run_code(code, LIMITS))


# The config check asks it before a run starts (objectives/rl/tools.py's check_tool_specs).
run_python.machine_refusal = sandbox_refusal  # type: ignore[attr-defined]


def rows(count: int, seed: int) -> list[dict]:
    """Chat prompts asking for products of two five-digit numbers, with the answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randrange(10_000, 100_000), rng.randrange(10_000, 100_000)
        out.append({"messages": [{"role": "user", "content": QUESTION.format(a=a, b=b)}],
                    "answer": str(a * b)})
    return out


def write_rows(folder: str | Path, train: int = 400, heldout: int = 50) -> None:
    """train.jsonl and heldout.jsonl of the product task in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows(train, 0)), ("heldout", rows(heldout, 1))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    write_rows(sys.argv[1])
