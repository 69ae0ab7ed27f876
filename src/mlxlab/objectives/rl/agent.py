"""Multi-turn rollouts: the model writes a turn, the environment answers (a tool's result), the
model reads it and goes on, until a final answer, `max_turns` model turns, or
`max_completion_length` tokens in all (the model's and the environment's together, as TRL counts
them).

Each prompt is rendered once with the run's tools (objectives/rl/tool_format.py: the chat
template's `tools=`, or the tagged format's system message). A turn of every live trajectory is
sampled from the training model (objectives/rollouts.py `sample_turn`: the trajectory so far as
the prefix, its budget left, one key per turn drawn from the objective's generator), read by the
format's parser and handed to the trajectory's environment (objectives/rl/environments.py); its
answers are rendered by the chat template as tool turns and their tokens appended, as TRL's
GRPOTrainer `_tool_call_loop` builds `prompt_ids + completion_ids + tool_suffix_ids` (nothing
the model wrote is re-tokenized). Answers that would pass the length budget are dropped and end
the trajectory (TRL rolls them back the same way).

A `Trajectory` keeps the tokens after the prompt and a mask of who wrote each (1: the model, 0: the
environment): the training row's loss mask is that mask (objectives/rollouts.py `rollout_batch`), so
the environment's tokens are context, never trained, and every model turn is; the reward and the
advantage are the trajectory's. What rewards judge as the completion is the last model turn's text
(the final answer); the whole trajectory is the column `trajectories` (its messages, TRL's
conversational completion) and the environments' summed rewards the column `environment_reward`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.data.chat import encode_chats
from mlxlab.data.prompts import PromptRows, read_prompts
from mlxlab.errors import ConfigError
from mlxlab.objectives.rl.environments import Environment, Step, environment_factory
from mlxlab.objectives.rl.tool_format import ParsedTurn, ToolFormat, answer_ids, resolve_format
from mlxlab.objectives.rl.tools import Toolbox, build_tools
from mlxlab.objectives.rollouts import Sampling, sample_turn

log = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """One rollout after its prompt: `tokens` (the model's and the environment's, in order),
    `mask` (1 where the model wrote the token), the messages (assistant and tool turns), the
    final answer's text, the environment's summed reward, the model turns and why it ended
    (answer | max_turns | length)."""

    tokens: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    answer: str = ""
    reward: float = 0.0
    turns: int = 0
    ended: str = ""

    def model_tokens(self) -> np.ndarray:
        """The tokens the model wrote (TRL's completion lengths count these)."""
        return np.asarray(self.tokens, np.int32)[np.asarray(self.mask, bool)]


@dataclass(frozen=True)
class AgentSettings:
    """objective.tools, .environment, .max_turns, .tool_timeout_s, .tool_format,
    .tagged_format, .tool_workers and .tool_max_chars, as GRPO's constructor hands them over."""

    tools: Sequence[Mapping]
    environment: Mapping | None
    max_turns: int
    tool_timeout_s: float | None
    tool_format: str
    tagged_format: Mapping
    tool_workers: int = 4
    tool_max_chars: int | None = 4096


class Agent:
    """The tools, the environment and the format of a run, and its multi-turn rollouts."""

    def __init__(self, settings: AgentSettings) -> None:
        self.toolbox = Toolbox(build_tools(settings.tools), settings.tool_timeout_s,
                               settings.tool_workers, settings.tool_max_chars)
        self._pool: ThreadPoolExecutor | None = None
        self.environment_name, self.make_environment = environment_factory(settings.environment)
        self.settings = settings
        self.max_turns = settings.max_turns
        self.format: ToolFormat | None = None
        self.ids: dict[str, list[np.ndarray]] = {}

    def setup(self, data: PromptRows, stop_ids: Sequence[int]) -> None:
        """The format (auto: the template's) and every prompt rendered with the tools."""
        template = data.prompt_template()
        tagged = dict(self.settings.tagged_format or {})
        self.format = resolve_format(self.settings.tool_format, template,
                                     tagged.get("call_tags", ("<tool_call>", "</tool_call>")),
                                     tagged.get("result_tags",
                                                ("<tool_response>", "</tool_response>")),
                                     tagged.get("result_role", "user"), tagged.get("prompt"))
        self.template, self.tokenizer, self.stop_ids = template, data.tokenizer, list(stop_ids)
        self.data = data
        for split in ("train", "val"):
            count = len(data.train if split == "train" else data.val)
            texts, _, _ = data.prompts(split, np.arange(count))
            self.ids[split] = self._render(texts, split)
        log.info("tools %s in the %s format, up to %d turns", [t.name for t in
                 self.toolbox.tools], self.format.kind, self.max_turns)

    def _render(self, texts: list, split: str) -> list[np.ndarray]:
        if any(not isinstance(t, list) for t in texts):
            raise ConfigError(f"objective.tools need chat prompts (rows with messages: a list of "
                              f"{{\"role\", \"content\"}} turns) for the chat template to offer "
                              f"the tools, and data.train_file's {split} rows are plain text")
        chats = []
        for messages in texts:
            rendered, tools = self.format.prompt_messages(messages, self.toolbox.schemas)
            chats.append({"messages": rendered, "tools": tools})
        encoded = encode_chats(self.tokenizer, self.template, chats, add_generation_prompt=True)
        return [np.asarray(c.ids, np.int32) for c in encoded]

    def prompts(self, split: str, index: Sequence[int]) -> tuple[list, list[np.ndarray],
                                                                  dict[str, list]]:
        """PromptRows.prompts with the prompts rendered with the tools."""
        texts, _, columns = self.data.prompts(split, index)
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        return texts, [self.ids[split][i] for i in index], columns

    def longest_prompt(self) -> int:
        return max(len(t) for ids in self.ids.values() for t in ids)

    # --- the rollouts ---------------------------------------------------------------------------

    def rollout(self, model: nn.Module, prompts: list, ids: Sequence[np.ndarray],
                columns: Mapping[str, list], group: int, sampling: Sampling,
                next_key: Callable[[], mx.array]) -> list[Trajectory]:
        """`group` trajectories of each prompt (a group's rows together), each turn sampled with
        `sampling` from the key `next_key()` gives (module docstring)."""
        rows = len(ids) * group
        environments: list[Environment] = []
        for r in range(rows):
            environment = self.make_environment()
            environment.reset(prompts[r // group],
                              {k: v[r // group] for k, v in columns.items()}, self.toolbox)
            environments.append(environment)
        out = [Trajectory() for _ in range(rows)]
        live = list(range(rows))
        budget = sampling.max_new_tokens
        while live:
            prefixes = [np.concatenate([ids[r // group], np.asarray(out[r].tokens, np.int32)])
                        for r in live]
            turns = sample_turn(model, prefixes, [budget - len(out[r].tokens) for r in live],
                                sampling, self.stop_ids, next_key())
            read = {r: self._read(out[r], turn) for r, turn in zip(live, turns)}
            asked = [r for r in live if read[r] is not None]
            steps = self.answer([environments[r] for r in asked], [read[r] for r in asked])
            live = [r for r, step in zip(asked, steps) if self._append(out[r], step, budget)]
        return out

    def answer(self, environments: Sequence[Environment],
               turns: Sequence[ParsedTurn]) -> list[Step]:
        """Each environment's step on its turn, side by side (`objective.tool_workers` at a
        time: a slow or hung tool of one trajectory does not hold the others); in order."""
        if len(environments) <= 1:
            return [e.step(t) for e, t in zip(environments, turns)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.toolbox.workers, thread_name_prefix="agent")
        return list(self._pool.map(lambda pair: pair[0].step(pair[1]),
                                   zip(environments, turns)))

    def _step(self, trajectory: Trajectory, environment: Environment, turn: np.ndarray,
              budget: int) -> bool:
        """One trajectory's turn and its environment's answer (what rollout does for all live
        trajectories at once); False when the trajectory ends."""
        parsed = self._read(trajectory, turn)
        return parsed is not None and self._append(trajectory, environment.step(parsed), budget)

    def _read(self, trajectory: Trajectory, turn: np.ndarray) -> ParsedTurn | None:
        """Add a model turn; the turn as the format reads it, None when the trajectory ends."""
        trajectory.tokens += turn.tolist()
        trajectory.mask += [1] * len(turn)
        trajectory.turns += 1
        stops = set(self.stop_ids)
        said = [t for t in turn.tolist() if t not in stops]
        parsed = self.format.parse(self.tokenizer.decode(said, skip_special_tokens=False))
        trajectory.answer = self.tokenizer.decode(said, skip_special_tokens=True)
        message: dict[str, Any] = {"role": "assistant", "content": trajectory.answer}
        if parsed.calls:
            message["tool_calls"] = [{"type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in parsed.calls]
        trajectory.messages.append(message)
        if not (len(turn) and int(turn[-1]) in stops):
            trajectory.ended = "length"
            return None
        if trajectory.turns >= self.max_turns:
            trajectory.ended = "max_turns"
            return None
        return parsed

    def _append(self, trajectory: Trajectory, step: Step, budget: int) -> bool:
        """Add the environment's answer; False when the trajectory ends."""
        trajectory.reward += float(step.reward)
        if step.done or not step.answers:
            trajectory.ended = "answer"
            return False
        suffix = answer_ids(self.format, self.template, self.tokenizer, step.answers,
                            self.stop_ids)
        if len(trajectory.tokens) + len(suffix) > budget:  # the answer does not fit: dropped
            trajectory.ended = "length"
            return False
        trajectory.tokens += suffix.tolist()
        trajectory.mask += [0] * len(suffix)
        trajectory.messages += self.format.answer_messages(step.answers)
        if len(trajectory.tokens) == budget:  # it fits, with no room for another turn
            trajectory.ended = "length"
            return False
        return True

    def metrics(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """The tool calls of a generation (TRL's tools/call_frequency: calls per trajectory,
        tools/failure_frequency: failures per call), the failures by kind, the turns."""
        counts = self.toolbox.take_counts()
        calls = counts.pop("calls")
        failed = sum(counts.values())
        out = {"tools/call_frequency": calls / max(len(trajectories), 1),
               "tools/failure_frequency": failed / calls if calls else 0.0,
               "turns/mean": float(np.mean([t.turns for t in trajectories]))}
        return out | {f"tools/failures/{k}": v for k, v in counts.items()}


def check_chat_prompts(data: Any) -> None:
    """Tools need chat prompts (the template offers them in a chat): the data node's prompt
    files read (nothing built), one ConfigError line naming the file when they are plain
    text."""
    for key in ("train_file", "val_file"):
        path = data.get(key)
        if not path:
            continue
        rows = read_prompts(path, data.get("prompt_key", "prompt"),
                            data.get("messages_key", "messages"))
        if rows.format != "chat":
            raise ConfigError(f"objective.tools need chat prompts ({{\"messages\": [{{\"role\": "
                              f"\"user\", \"content\": ...}}]}} rows) for the chat template to "
                              f"offer the tools, and data.{key}={path} holds plain-text prompts: "
                              "give a chat prompt file, or drop objective.tools")


def trajectory_rows(trajectories: Sequence[Trajectory]) -> tuple[list[np.ndarray],
                                                                 list[np.ndarray]]:
    """(the completion tokens, their loss masks) of trajectories, as rollout_batch takes them."""
    return ([np.asarray(t.tokens, np.int32) for t in trajectories],
            [np.asarray(t.mask, np.float32) for t in trajectories])


def reward_columns(trajectories: Sequence[Trajectory]) -> dict[str, list[Any]]:
    """The columns rewards get beside the prompt's: each trajectory's messages and reward."""
    return {"trajectories": [t.messages for t in trajectories],
            "environment_reward": [t.reward for t in trajectories]}
