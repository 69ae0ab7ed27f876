"""`run_python` for a machine where no kernel layer can confine model-written code (macOS
without sandbox-exec; Linux where a container forbids Landlock and seccomp), where
objectives/rl/sandbox.py's `run_python` refuses it: the same tool, run under the sandbox's
Python audit hook alone. That hook refuses what it sees (files changed or read outside the
folder, processes, sockets) but code that reaches C can pass it: it is a guard against
accidents, not a security boundary. The module's name is the setting, in the tools config:

    objective.tools=[{_target_: mlxlab.objectives.rl.python_only_not_a_boundary.run_python}]

The model sees the tool as `run_python`, as with the confined one; nothing it writes can opt in.
"""

from __future__ import annotations

from dataclasses import replace

from mlxlab.objectives.rl.sandbox import LIMITS, answer_text
from mlxlab.sandbox.confine import run_code

PYTHON_ONLY = replace(LIMITS, python_only_not_a_boundary=True)


def run_python(code: str) -> str:
    """Run a Python program and return what it prints (stdout, then any error).

    Args:
        code: the program's source, e.g. "print(48271 * 99173)"
    """
    return answer_text(run_code(code, PYTHON_ONLY))
