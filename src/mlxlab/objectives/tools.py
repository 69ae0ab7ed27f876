"""Tools an objective's rollouts let the model call: plain Python functions named in the config.

`objective.tools` lists them, each a Hydra `_target_` naming a function with type hints on
every argument and a Google-style docstring (a summary line and an `Args:` entry per
argument), as transformers' chat templates take `tools=`:

    tools:
      - _target_: mlxlab.objectives.lookup_tools.lookup_code

Their JSON schemas come from the signature and docstring (`transformers.utils.get_json_schema`,
what `apply_chat_template(tools=[fn])` calls), and the model's chat template renders them
(objectives/tool_format.py). A tool that cannot be imported, is not a function, or lacks type
hints or argument descriptions is refused with one line at config time (`check_tool_specs`,
from the objective's check_config), before anything is created.

Calling a tool never ends the run: a call that names no tool, arguments that do not fit the
signature, a tool that raises, one that runs past `tool_timeout_s`, or a result that is not
text or JSON gives the model an error message as the tool's answer (`{"error": "..."}`, as
TRL's GRPOTrainer answers a failing tool) and counts one failure of that kind
(`tools/failures/<kind>` in the metrics).

Trust: tools run in the training process, in a thread of it, with everything the process may
do (its files, its network, its memory). A tool is trusted code, as a reward function is; the
model only chooses its name and arguments, which reach it as JSON values. A timed-out call is
abandoned, not killed (Python cannot stop a thread): its thread runs on in the background, so a
tool that may hang should bound its own work. Deterministic tools keep a resumed run bitwise.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object

from mlxlab.errors import ConfigError

FAILURES = ("unknown_tool", "bad_arguments", "raised", "timeout", "bad_result")


@dataclass(frozen=True)
class Tool:
    """A callable the model may call, its name and its JSON schema (the template's `tools=`)."""

    name: str
    fn: Callable[..., Any]
    schema: dict


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
                          "mlxlab.objectives.lookup_tools.lookup_code)")
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
    type hints and a docstring, names distinct (nothing is called)."""
    build_tools(specs)


def build_tools(specs: Sequence | None) -> list[Tool]:
    """The tools objective.tools lists (module docstring); a bad entry is one ConfigError line.
    Arguments beside `_target_` are bound (functools.partial style) and left out of the schema."""
    tools, names = [], set()
    for i, spec in enumerate(specs or []):
        target, fn, bound = _load(i, spec)
        schema = tool_schema(target, fn, f"objective.tools[{i}]")
        if bound:
            unknown = sorted(set(bound) - set(inspect.signature(fn).parameters))
            if unknown:
                raise ConfigError(f"objective.tools[{i}]: {target} has no argument "
                                  f"{', '.join(unknown)} to bind")
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
        tools.append(Tool(name, fn, schema))
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


def result_text(value: Any) -> str | None:
    """A tool's result as the text the model reads: a string as it is, JSON values as JSON;
    None when it is neither (an object of a class, bytes, NaN)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None


@dataclass
class Toolbox:
    """The tools of a run and how they are called: each call in a thread, abandoned after
    `timeout_s` (None: no limit); `calls` and `failures` count since the last `take_counts`."""

    tools: Sequence[Tool]
    timeout_s: float | None = None
    calls: int = 0
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURES, 0))

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tools}

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools]

    def fail(self, name: str, kind: str, message: str) -> ToolAnswer:
        self.failures[kind] += 1
        return ToolAnswer(name, error_text(message), kind)

    def refuse(self, message: str) -> ToolAnswer:
        """A call the model wrote that did not parse (counted as a call and a bad_arguments
        failure), answered with why."""
        self.calls += 1
        return self.fail("unparsed", "bad_arguments", message)

    def call(self, call: ToolCall) -> ToolAnswer:
        """Run one call; any failure is an answer with its kind (module docstring)."""
        self.calls += 1
        tool = self.by_name.get(call.name)
        if tool is None:
            return self.fail(call.name, "unknown_tool", f"no tool named {call.name!r}; the "
                             f"tools are {sorted(self.by_name)}")
        try:
            inspect.signature(tool.fn).bind(**call.arguments)
        except TypeError as e:
            return self.fail(call.name, "bad_arguments", f"{call.name}: {e}")
        outcome = self._run(tool, call.arguments)
        if outcome is None:
            return self.fail(call.name, "timeout", f"{call.name} did not answer within "
                             f"{self.timeout_s} s")
        value, raised = outcome
        if raised is not None:
            return self.fail(call.name, "raised", f"{type(raised).__name__}: {raised}")
        text = result_text(value)
        if text is None:
            return self.fail(call.name, "bad_result", f"{call.name} returned a "
                             f"{type(value).__name__}, not text or JSON")
        return ToolAnswer(call.name, text)

    def _run(self, tool: Tool, arguments: dict) -> tuple[Any, BaseException | None] | None:
        """(value, exception) of the call, None when it ran past the timeout. A daemon thread:
        an abandoned call does not hold the process open at exit."""
        box: list = []

        def target() -> None:
            try:
                box.append((tool.fn(**arguments), None))
            except Exception as e:  # noqa: BLE001 - any failure of user code is an answer
                box.append((None, e))

        thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        return box[0] if box else None

    def take_counts(self) -> dict[str, float]:
        """The calls and failures since the last take (TRL's tools/ names, per kind too)."""
        out = {"calls": float(self.calls), **{k: float(v) for k, v in self.failures.items()}}
        self.calls, self.failures = 0, dict.fromkeys(FAILURES, 0)
        return out
