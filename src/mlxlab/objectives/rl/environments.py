"""What a multi-turn rollout talks to: an environment that reads each model turn and answers.

`Environment` is the interface (objectives/rl/agent.py drives it, one instance per trajectory):
- `reset(prompt, columns, toolbox)`: a new trajectory of this prompt (the row's text or chat and
  its columns, as rewards get them) with the run's tools (objectives/rl/tools.py `Toolbox`);
- `step(turn) -> Step`: the model's turn, read (its text, the tool calls it wrote and those
  that did not parse), answered with `Step(answers, reward, done)`: the answers are rendered
  as tool turns (role `tool`, or the tagged format's result turn), `reward` is added to the
  trajectory's (an environment's rewards are the reward `environment` of the run, weight 1),
  and `done` (or no answer) ends the trajectory.
An environment's answers are context for the model, never trained (loss mask 0).

`ToolEnvironment`, plain Python tools, is the simplest case and the default: a turn without a
tool call is the final answer; a turn with calls is answered by running each
(`Toolbox.call`), a call that did not parse by its error. `objective.environment` names another:
a `_target_` class (its other keys are its constructor's arguments) with reset and step,
usually a subclass of one of these. It is made fresh for each trajectory (a resumed run needs
none of its state); keep it deterministic for bitwise resumes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import get_object

from mlxlab.config.records import check_arguments
from mlxlab.errors import ConfigError
from mlxlab.objectives.rl.tool_format import ParsedTurn
from mlxlab.objectives.rl.tools import ToolAnswer, Toolbox


@dataclass
class Step:
    """An environment's answer to a turn (module docstring)."""

    answers: list[ToolAnswer] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False


class Environment:
    """The interface (module docstring); the defaults keep the prompt and the toolbox."""

    def reset(self, prompt: Any, columns: Mapping[str, Any], toolbox: Toolbox) -> None:
        self.prompt, self.columns, self.toolbox = prompt, columns, toolbox

    def step(self, turn: ParsedTurn) -> Step:
        raise NotImplementedError(f"{type(self).__name__}.step")


class ToolEnvironment(Environment):
    """Plain Python tools: each call run, a turn without one is the final answer."""

    def step(self, turn: ParsedTurn) -> Step:
        if not turn.wants_tools:
            return Step(done=True)
        answers = [self.toolbox.call(call) for call in turn.calls]
        answers += [self.toolbox.refuse(error) for error in turn.errors]
        return Step(answers)


def environment_factory(spec: Mapping | None) -> tuple[str, Callable[[], Environment]]:
    """(its name, a function making a fresh instance) of objective.environment (None: the
    tools' ToolEnvironment); a class that cannot be imported or lacks reset/step is one line."""
    if spec is None:
        return "tools", ToolEnvironment
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not isinstance(target, str) or not target:
        raise ConfigError("objective.environment has no _target_: name a class with reset() and "
                          "step() (a subclass of mlxlab.objectives.rl.environments.Environment)")
    try:
        cls = get_object(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises several kinds for a bad path
        raise ConfigError(f"objective.environment: _target_ {target!r} cannot be imported "
                          f"({e})") from None
    if not inspect.isclass(cls) or not all(callable(inspect.getattr_static(cls, m, None))
                                           for m in ("reset", "step")):
        raise ConfigError(f"objective.environment: {target} is not a class with reset() and "
                          "step(); subclass mlxlab.objectives.rl.environments.Environment")
    check_arguments("objective.environment", target, cls, spec)
    return cls.__name__, lambda: cls(**spec)
