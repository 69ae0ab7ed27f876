"""The process a run's tool calls run in (`python -m mlxlab.objectives.rl.tool_worker FD`): it
imports the run's tools once, then answers one call at a time over the connection FD names.

objectives/rl/tool_processes.py starts it and kills it (with its process group) when a call runs
past `objective.tool_timeout_s`; nothing of a call outlives that kill but what the tool itself
moved out of the group. Whatever a tool does ends here as one answer: its result as text (cut to
`objective.tool_max_chars`), or the exception it raised, `SystemExit` and `KeyboardInterrupt`
included. A worker whose parent is gone exits within a second, even in the middle of a call.

Kept light: a worker imports hydra's object lookup and the tools' modules, not MLX or
transformers (unless a tool's module does).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

PARENT_CHECK_S = 1.0


def result_text(value: Any) -> str | None:
    """A tool's result as the text the model reads: a string as it is, JSON values as JSON;
    None when it is neither (an object of a class, bytes, NaN)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None


def answer(fn: Callable[..., Any], arguments: Mapping[str, Any],
           max_chars: int | None) -> tuple:
    """One call's outcome: ("ok", text) | ("truncated", first max_chars characters, length) |
    ("raised", "Type: message") | ("bad_result", the value's type name). Any BaseException is
    the tool's: a tool that calls sys.exit() has raised, it has not ended the worker."""
    try:
        value = fn(**arguments)
    except BaseException as e:  # noqa: BLE001 - SystemExit and the rest are the tool's failure
        return ("raised", f"{type(e).__name__}: {e}")
    text = result_text(value)
    if text is None:
        return ("bad_result", type(value).__name__)
    if max_chars is not None and len(text) > max_chars:
        return ("truncated", text[:max_chars], len(text))
    return ("ok", text)


def load(target: str, bound: Mapping[str, Any]) -> Callable[..., Any]:
    """The function `target` names, with `bound`'s arguments bound."""
    from hydra.utils import get_object  # the lookup the parent's config check used

    fn = get_object(target)
    if not bound:
        return fn
    return lambda **arguments: fn(**arguments, **bound)


def _exit_with_parent(parent: int) -> None:
    """End this process once its parent is gone (a SIGKILLed trainer cannot kill it)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def serve(conn: Connection, parent: int) -> None:
    """Load the tools the first message names ({name: (target, bound)}), say ready, answer
    each (name, arguments, max_chars) until the connection closes."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        tools = {name: load(target, bound) for name, (target, bound) in conn.recv().items()}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which answers the call
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            name, arguments, max_chars = conn.recv()
        except EOFError:
            return
        conn.send(answer(tools[name], arguments, max_chars))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]))
