"""Tools an objective's rollouts let the model call: plain Python functions named in the config.

`objective.tools` lists them, each a Hydra `_target_` naming a function with type hints on
every argument and a Google-style docstring (a summary line and an `Args:` entry per
argument), as transformers' chat templates take `tools=`:

    tools:
      - _target_: mlxlab.objectives.rl.lookup_tools.lookup_code

Their JSON schemas come from the signature and docstring (`transformers.utils.get_json_schema`,
what `apply_chat_template(tools=[fn])` calls), and the model's chat template renders them
(objectives/rl/tool_format.py). A tool that cannot be imported, is not a function, or lacks type
hints or argument descriptions is refused with one line at config time (`check_tool_specs`,
from the objective's check_config), before anything is created.

Calling a tool never ends the run: a call that names no tool, arguments that do not fit the
signature, a tool that raises (any BaseException, SystemExit included), one that runs past
`tool_timeout_s`, or a result that is not text or JSON gives the model an error message as the
tool's answer (`{"error": "..."}`, as TRL's GRPOTrainer answers a failing tool) and counts one
failure of that kind (`tools/failures/<kind>` in the metrics). A result longer than
`tool_max_chars` characters is cut to them before anything tokenizes it, and counted
(`truncated`); the model reads the cut text.

Where they run: each call in a worker process (objectives/rl/tool_processes.py), up to
`tool_workers` calls at a time; one past `tool_timeout_s` has its worker killed, so a hung or
spinning tool costs that one timeout and nothing after it. Tools are trusted code, as reward
functions are: a worker runs with the trainer's user, environment, files and network; the model
only chooses a tool's name and arguments, which reach it as JSON values. Code the model writes
runs in objectives/rl/sandbox.py's `run_python`. Deterministic tools keep a resumed run bitwise.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object

from mlxlab.config.records import check_arguments
from mlxlab.errors import ConfigError
from mlxlab.objectives.rl.tool_processes import ToolProcesses

FAILURES = ("unknown_tool", "bad_arguments", "raised", "timeout", "bad_result", "truncated")


@dataclass(frozen=True)
class Tool:
    """A callable the model may call, its name and its JSON schema (the template's `tools=`),
    and what a worker process imports to call it (`target` with `bound` arguments)."""

    name: str
    fn: Callable[..., Any]
    schema: dict
    target: str = ""
    bound: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: the tool's name and its arguments (a JSON object's values)."""

    name: str
    arguments: dict


@dataclass
class ToolAnswer:
    """What a tool call gave: the text the model reads, and the failure's kind (None: none)."""

    name: str
    content: str
    failure: str | None = None


def _load(i: int, spec: Any) -> tuple[str, Callable, dict]:
    """(target, function, its bound arguments) of objective.tools[i], or one ConfigError line."""
    spec = dict(spec) if isinstance(spec, Mapping) else {"_target_": spec}
    target = spec.pop("_target_", None)
    if not target or not isinstance(target, str):
        raise ConfigError(f"objective.tools[{i}] has no _target_: name a Python function with "
                          "type hints and a docstring (e.g. "
                          "mlxlab.objectives.rl.lookup_tools.lookup_code)")
    try:
        fn = get_object(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises several kinds for a bad path
        raise ConfigError(f"objective.tools[{i}]: _target_ {target!r} cannot be imported ({e}); "
                          "name an importable function") from None
    if not inspect.isfunction(fn):
        raise ConfigError(f"objective.tools[{i}]: {target} is a {type(fn).__name__}, not a "
                          "function; name a Python function (def ...) with type hints")
    return target, fn, spec


def tool_schema(target: str, fn: Callable, where: str) -> dict:
    """The function's JSON schema (transformers' get_json_schema), or one ConfigError line
    saying what the signature or docstring lacks."""
    from transformers.utils import get_json_schema  # transformers costs seconds to import

    missing = [p.name for p in inspect.signature(fn).parameters.values()
               if p.annotation is inspect.Parameter.empty]
    if missing:
        raise ConfigError(f"{where}: {target} has no type hint for {', '.join(missing)}; the "
                          "model sees a tool's JSON schema, made from its type hints: annotate "
                          "every argument (e.g. key: str)")
    try:
        return get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers' TypeHint/DocstringParsingException
        raise ConfigError(f"{where}: {target} cannot be described to the model ({e}); give it "
                          "a docstring with a summary and an `Args:` line per argument") from None


def check_tool_specs(specs: Sequence | None) -> None:
    """objective.tools as config validation checks it: each entry importable, a function with
    type hints and a docstring, names distinct (nothing is called), and each tool that would
    refuse on this machine (its `machine_refusal()`, e.g. a sandbox with no boundary here)
    refused now, before the run folder exists, rather than at every call."""
    for i, tool in enumerate(build_tools(specs)):
        refusal = getattr(tool.fn, "machine_refusal", None)
        said = refusal() if refusal is not None else None
        if said:
            raise ConfigError(f"objective.tools[{i}] ({tool.target}): {said}")


def build_tools(specs: Sequence | None) -> list[Tool]:
    """The tools objective.tools lists (module docstring); a bad entry is one ConfigError line.
    Arguments beside `_target_` are bound (functools.partial style) and left out of the schema."""
    tools, names = [], set()
    for i, spec in enumerate(specs or []):
        target, fn, bound = _load(i, spec)
        schema = tool_schema(target, fn, f"objective.tools[{i}]")
        if bound:
            check_arguments(f"objective.tools[{i}]", target, fn, bound, given=False)
            params = schema["function"]["parameters"]
            params["properties"] = {k: v for k, v in params["properties"].items()
                                    if k not in bound}
            params["required"] = [k for k in params.get("required", []) if k not in bound]
            fn = _bind(fn, bound)
        name = schema["function"]["name"]
        if name in names:
            raise ConfigError(f"objective.tools[{i}]: two tools are named {name!r}; the model "
                              "calls a tool by its function's name")
        names.add(name)
        tools.append(Tool(name, fn, schema, target, dict(bound)))
    return tools


def _bind(fn: Callable, bound: dict) -> Callable:
    def call(**arguments: Any) -> Any:
        return fn(**arguments, **bound)
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p for p in inspect.signature(fn).parameters.values() if p.name not in bound])
    return call


def error_text(message: str) -> str:
    """A failure as the tool's answer: a JSON object with the error, as TRL answers one."""
    return json.dumps({"error": message})


class Toolbox:
    """The tools of a run and how they are called: in worker processes, up to `workers` calls at
    a time, each killed after `timeout_s` (None: no limit), results cut to `max_chars`
    characters (None: whole); `calls` and `failures` count since the last `take_counts`."""

    def __init__(self, tools: Sequence[Tool], timeout_s: float | None = None, workers: int = 4,
                 max_chars: int | None = 4096) -> None:
        self.tools, self.timeout_s, self.workers = list(tools), timeout_s, int(workers)
        self.by_name = {t.name: t for t in self.tools}
        self.processes = ToolProcesses({t.name: (t.target, t.bound) for t in self.tools},
                                       self.workers, timeout_s, max_chars)
        self.calls = 0
        self.failures = dict.fromkeys(FAILURES, 0)
        self._lock = threading.Lock()  # environments answer side by side (agent.py)

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools]

    def _count(self, kind: str | None) -> None:
        with self._lock:
            self.calls += 1
            if kind is not None:
                self.failures[kind] += 1

    def fail(self, name: str, kind: str, message: str) -> ToolAnswer:
        self._count(kind)
        return ToolAnswer(name, error_text(message), kind)

    def refuse(self, message: str) -> ToolAnswer:
        """A call the model wrote that did not parse (counted as a call and a bad_arguments
        failure), answered with why."""
        return self.fail("unparsed", "bad_arguments", message)

    def call(self, call: ToolCall) -> ToolAnswer:
        """Run one call in a worker; any failure is an answer with its kind (module docstring).
        Safe from several threads at once."""
        tool = self.by_name.get(call.name)
        if tool is None:
            return self.fail(call.name, "unknown_tool", f"no tool named {call.name!r}; the "
                             f"tools are {sorted(self.by_name)}")
        try:
            inspect.signature(tool.fn).bind(**call.arguments)
        except TypeError as e:
            return self.fail(call.name, "bad_arguments", f"{call.name}: {e}")
        outcome = self.processes.call(call.name, call.arguments)
        if outcome is None:
            return self.fail(call.name, "timeout", f"{call.name} did not answer within "
                             f"{self.timeout_s} s")
        kind = outcome[0]
        if kind == "raised":
            return self.fail(call.name, "raised", outcome[1])
        if kind == "bad_result":
            return self.fail(call.name, "bad_result", f"{call.name} returned a {outcome[1]}, "
                             "not text or JSON")
        self._count("truncated" if kind == "truncated" else None)
        return ToolAnswer(call.name, outcome[1], "truncated" if kind == "truncated" else None)

    def take_counts(self) -> dict[str, float]:
        """The calls and failures since the last take (TRL's tools/ names, per kind too)."""
        with self._lock:
            out = {"calls": float(self.calls), **{k: float(v) for k, v in self.failures.items()}}
            self.calls, self.failures = 0, dict.fromkeys(FAILURES, 0)
        return out

    def close(self) -> None:
        """End the worker processes (they also end with this object and with the process)."""
        self.processes.close()
