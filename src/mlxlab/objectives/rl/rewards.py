"""GRPO's rewards: Python callables `(prompts, completions, **columns) -> list[float]`, as TRL's
GRPOTrainer calls its reward functions, weighted and summed.

`objective.rewards` lists them, each a Hydra `_target_` with its arguments and an optional
`weight` (default 1):

    rewards:
      - {_target_: mlxlab.objectives.rl.rewards.exact_answer, weight: 1.0}
      - {_target_: mlxlab.objectives.rl.rewards.regex_format, pattern: "^\\d+$", weight: 0.2}

A `_target_` that names a function of (prompts, completions, **columns) is that reward; one that
names a factory (a class, or a function taking the arguments given) is called with them and must
return such a function. `columns` are the prompt rows' other keys (e.g. `answer`), one value per
completion. A reward may return None for a completion it does not judge (TRL's convention: it is
left out of that reward's mean; a completion no reward judges has advantage 0).

The built-ins cover verifiable tasks: `exact_answer` (the completion, stripped, equals the
row's answer), `numeric_answer` (the last number in the completion equals the answer's),
`regex_format` (the completion matches a pattern), `length` (a reward that falls off past a
target length, for keeping answers short); for runs with tools, `tool_call_parsed` (the
trajectory made a tool call its format could read: a format reward for a model still learning
to write calls, beside the answer's reward).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from hydra.utils import get_object

from mlxlab.config.records import check_arguments, check_number
from mlxlab.errors import ConfigError, UserError

RewardFn = Callable[..., list]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@runtime_checkable
class ModelReward(Protocol):
    """A reward that runs a model of its own (runs/learned_reward.py LearnedReward): the
    objective loads it in its setup, so that trainer.micro_batch=auto measures the step with its
    weights resident, and takes `scoring_memory` (bytes above them for scoring `rows`
    completions of `width` tokens) off the step's budget."""

    def load(self) -> None: ...

    def scoring_memory(self, rows: int, width: int) -> int: ...


@dataclass(frozen=True)
class Reward:
    """A reward function, its weight and the name its metrics log under (rewards/<name>/mean)."""

    name: str
    fn: RewardFn
    weight: float


def exact_answer(prompts: Sequence, completions: Sequence[str], answer: Sequence,
                 **_: Any) -> list[float]:
    """1 where the completion, stripped, is the row's answer (as text), else 0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def _last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_answer(prompts: Sequence, completions: Sequence[str], answer: Sequence,
                   **_: Any) -> list[float]:
    """1 where the last number in the completion equals the answer's number (GSM8K style:
    "... so the total is 1,234." for 1234), else 0."""
    out = []
    for completion, a in zip(completions, answer):
        got, want = _last_number(completion), _last_number(str(a))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-9))
    return out


def regex_format(pattern: str, flags: str = "") -> RewardFn:
    """A reward of 1 where the whole completion (stripped) matches `pattern`; `flags` letters of
    re's (i: ignore case, s: dot matches newline, m: multiline)."""
    bits = 0
    for letter in flags:
        if letter not in "ism":
            raise ConfigError(f"regex_format flags={flags!r}: use letters of 'ism'")
        bits |= {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}[letter]
    try:
        compiled = re.compile(pattern, bits)
    except re.error as e:
        raise ConfigError(f"regex_format pattern {pattern!r} is not a regular expression: "
                          f"{e}") from None

    def regex_format(prompts: Sequence, completions: Sequence[str], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return regex_format


def length(target: int, unit: str = "chars") -> RewardFn:
    """A reward of 1 up to `target` characters (or words: unit=words), falling linearly to 0 at
    twice the target."""
    if target <= 0 or unit not in ("chars", "words"):
        raise ConfigError(f"length target={target} must be > 0 and unit={unit!r} chars | words")

    def length(prompts: Sequence, completions: Sequence[str], **_: Any) -> list[float]:
        sizes = [len(c) if unit == "chars" else len(c.split()) for c in completions]
        return [float(min(1.0, max(0.0, 2.0 - n / target))) for n in sizes]

    return length


def tool_call_parsed(prompts: Sequence, completions: Sequence[str],
                     trajectories: Sequence | None = None, **_: Any) -> list[float]:
    """1 where the trajectory has a model turn whose tool call parsed (an assistant message
    with `tool_calls`: the call's JSON read, whatever the tool then answered), else 0. It reads
    the `trajectories` column, which only a run with tools has."""
    if trajectories is None:
        raise ConfigError("the reward tool_call_parsed judges tool calls: it needs a run with "
                          "tools (objective.tools or objective.environment)")
    return [float(any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages))
            for messages in trajectories]


def build_rewards(specs: Sequence[Mapping] | None) -> list[Reward]:
    """The rewards objective.rewards lists (module docstring); a bad entry is one line."""
    if not specs:
        raise ConfigError("objective.rewards is empty: list at least one reward, e.g. "
                          "[{_target_: mlxlab.objectives.rl.rewards.exact_answer}]")
    rewards, names = [], set()
    for i, spec in enumerate(specs):
        spec = dict(spec)
        key = f"objective.rewards[{i}]"
        target = spec.pop("_target_", None)
        if not target:
            raise ConfigError(f"{key} has no _target_: name a reward function "
                              "(e.g. mlxlab.objectives.rl.rewards.exact_answer)")
        try:
            obj = get_object(target)
        except Exception as e:  # noqa: BLE001 - Hydra raises several kinds for a bad path
            raise ConfigError(f"{key}: _target_ {target!r} cannot be imported ({e})") from None
        check_arguments(key, target, obj, spec, given=False, also=("weight", "name"))
        settings = sorted(set(spec) - {"weight", "name"})
        if settings and not _is_factory(obj):
            near = difflib.get_close_matches(settings[0], ("weight", "name"), 1)
            raise ConfigError(f"{key}.{settings[0]}: {target} is a reward function (it takes "
                              "completions), which takes no settings; a reward's keys beside "
                              "_target_ are weight and name"
                              + (f": did you mean {near[0]}?" if near else ""))
        check_number(f"{key}.weight", spec.get("weight", 1.0), float)
        weight = float(spec.pop("weight", 1.0))
        name = str(spec.pop("name", "") or target.rsplit(".", 1)[-1])
        fn = _made(key, target, obj, spec) if spec or _is_factory(obj) else obj
        if not callable(fn):
            raise ConfigError(f"objective.rewards[{i}]: {target} did not give a callable")
        if name in names:
            raise ConfigError(f"objective.rewards[{i}]: two rewards are named {name!r}; give one "
                              "a `name:`")
        names.add(name)
        rewards.append(Reward(name, fn, weight))
    return rewards


def _made(key: str, target: str, factory: Callable[..., Any], spec: Mapping[str, Any]) -> Any:
    """factory(**spec), its arguments checked first (check_arguments: a misspelled key, a wrong
    type, a missing one is one line naming the key); a TypeError or ValueError the factory
    raises about them is one line too."""
    check_arguments(key, target, factory, spec)
    try:
        return factory(**spec)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {target} does not take these arguments ({e}): fix "
                          f"{key}'s keys") from None


def _is_factory(obj: Any) -> bool:
    """A class, or a function without a `completions` parameter, makes the reward function."""
    if inspect.isclass(obj):
        return True
    try:
        return "completions" not in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def score(rewards: Sequence[Reward], prompts: Sequence, completions: Sequence[str],
          columns: Mapping[str, Sequence]) -> np.ndarray:
    """(completions, rewards) float32: each reward's value of each completion, NaN where it
    returned None. A reward that returns the wrong count or a non-number is named."""
    table = np.full((len(completions), len(rewards)), np.nan, np.float32)
    for k, reward in enumerate(rewards):
        values = reward.fn(prompts=list(prompts), completions=list(completions), **columns)
        if values is None or len(values) != len(completions):
            raise ConfigError(f"reward {reward.name!r} returned "
                              f"{'None' if values is None else len(values)} values for "
                              f"{len(completions)} completions: return one float per completion")
        for i, v in enumerate(values):
            if v is not None:
                try:
                    table[i, k] = float(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"reward {reward.name!r} returned {v!r}: return floats "
                                      "(or None to abstain)") from None
    return table


def total(table: np.ndarray, rewards: Sequence[Reward]) -> np.ndarray:
    """The weighted sum per completion (NaN where no reward judged it), as TRL sums them."""
    weights = np.asarray([r.weight for r in rewards], np.float32)
    summed = np.nansum(table * weights[None, :], axis=1).astype(np.float32)
    summed[np.isnan(table).all(axis=1)] = np.nan
    return summed
