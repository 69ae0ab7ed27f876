"""How a model writes tool calls and reads their results: its chat template's format, found by
rendering, or a plain tagged one the config names.

Formats (objective.tool_format):
- `hermes`: Qwen2.5's and Qwen3's (and other Hermes-style templates'): each call a JSON object
  `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`;
- `llama3`: Llama 3.1/3.2's JSON tool calling: the whole reply (after an optional
  `<|python_tag|>`) is `{"name": ..., "parameters": {...}}`;
- `tagged`: for a template that renders no tools (ChatML, SmolLM2's): the tools' schemas are
  written into the system message (`tool_format_prompt`), a call is `{"name": ..., "arguments":
  {...}}` between the config's `call_tags`, and a result is a `result_role` turn (user) between
  its `result_tags`;
- `auto` (the default): the template's own, found by rendering a tool call with it: hermes when
  it writes `<tool_call>`, llama3 when it writes `"parameters"`, tagged when it writes no tool
  at all; any other tool format is refused in one line (set tool_format=tagged).
For hermes and llama3 the template renders the tools (`tools=`) and the tool turns (role
`tool`), so a trajectory is what the model would see at inference.

The tokens of a tool turn are found as TRL's GRPOTrainer finds them (`_get_tool_suffix_ids`):
a dummy chat ending with an assistant turn is rendered with and without the tool messages (and
the generation prompt); what follows the assistant's end-of-turn token in the longer one (the
end-of-turn tokens of the shorter one counted) is what follows the model's end-of-turn token. The trajectory's tokens are the
prompt's, the model's, and these, concatenated: nothing the model wrote is re-tokenized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from mlxlab.data.chat import ChatTemplate
from mlxlab.errors import ConfigError
from mlxlab.objectives.rl.tools import ToolAnswer, ToolCall

FORMATS = ("auto", "hermes", "llama3", "tagged")
TAGGED_KEYS = frozenset({"call_tags", "result_tags", "result_role", "prompt"})  # tagged_format
PROBE = "mlxlab_probe_tool"
PROBE_SCHEMA = {"type": "function", "function": {
    "name": PROBE, "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                   "required": ["x"]}}}
TAGGED_PROMPT = ("You can call these tools:\n{tools}\nTo call one, write "
                 '{call_start}{{"name": <tool name>, "arguments": <JSON object>}}{call_end} and '
                 "stop; its answer comes back as {result_start}...{result_end}. When you know "
                 "the answer, reply without a tool call.")


@dataclass(frozen=True)
class ParsedTurn:
    """A model turn read: its text without the calls, the calls, and the calls that did not
    parse (each an error message the model is answered with)."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def wants_tools(self) -> bool:
        return bool(self.calls or self.errors)


def _read_call(body: str, args_key: str = "arguments") -> ToolCall | str:
    """A call from its JSON text, or the error message saying why not."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        return f"the tool call is not JSON ({e.msg} at character {e.pos}): {body[:200]!r}"
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return f"a tool call is a JSON object with a \"name\": {body[:200]!r}"
    arguments = value.get(args_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"the arguments of {value['name']} are not a JSON object: {arguments[:200]!r}"
    if not isinstance(arguments, dict):
        return f"the arguments of {value['name']} are not a JSON object: {arguments!r}"
    return ToolCall(value["name"], arguments)


def parse_tagged(text: str, start: str, end: str) -> ParsedTurn:
    """The calls between `start` and `end` tags; an opened tag never closed is an error."""
    calls, errors, rest, pos = [], [], [], 0
    while (i := text.find(start, pos)) >= 0:
        rest.append(text[pos:i])
        j = text.find(end, i + len(start))
        if j < 0:
            errors.append(f"a tool call opened with {start} was not closed with {end}")
            pos = len(text)
            break
        call = _read_call(text[i + len(start):j].strip())
        (calls if isinstance(call, ToolCall) else errors).append(call)
        pos = j + len(end)
    rest.append(text[pos:])
    return ParsedTurn("".join(rest).strip(), calls, errors)


def parse_llama3(text: str) -> ParsedTurn:
    """Llama 3's JSON call: the reply (after <|python_tag|>) is one JSON object with a name."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return ParsedTurn(text.strip())
    call = _read_call(body, "parameters")
    if isinstance(call, ToolCall):
        return ParsedTurn("", [call])
    return ParsedTurn("", [], [call])


@dataclass(frozen=True)
class ToolFormat:
    """A resolved format (module docstring) and what it needs to render a chat."""

    kind: str                                   # hermes | llama3 | tagged
    call_tags: tuple[str, str] = ("<tool_call>", "</tool_call>")
    result_tags: tuple[str, str] = ("<tool_response>", "</tool_response>")
    result_role: str = "user"
    prompt: str = TAGGED_PROMPT

    def parse(self, text: str) -> ParsedTurn:
        if self.kind == "llama3":
            return parse_llama3(text)
        start, end = self.call_tags if self.kind == "tagged" else ("<tool_call>", "</tool_call>")
        return parse_tagged(text, start, end)

    def prompt_messages(self, messages: Sequence[Mapping], schemas: Sequence[dict]
                        ) -> tuple[list[dict], list[dict] | None]:
        """(the messages, the template's tools=) of a prompt offering these tools: tagged
        writes the tools into the system message (a new one first, or the first one's end)."""
        messages = [dict(m) for m in messages]
        if self.kind != "tagged":
            return messages, list(schemas) or None
        described = self.prompt.format(
            tools="\n".join(json.dumps(s["function"]) for s in schemas),
            call_start=self.call_tags[0], call_end=self.call_tags[1],
            result_start=self.result_tags[0], result_end=self.result_tags[1])
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0].get('content') or ''}\n\n{described}".strip()
        else:
            messages.insert(0, {"role": "system", "content": described})
        return messages, None

    def answer_messages(self, answers: Sequence[ToolAnswer]) -> list[dict]:
        """The messages a turn's tool answers are rendered as (TRL's: role tool, the name)."""
        if self.kind != "tagged":
            return [{"role": "tool", "name": a.name, "content": a.content} for a in answers]
        start, end = self.result_tags
        return [{"role": self.result_role,
                 "content": "\n".join(f"{start}{a.content}{end}" for a in answers)}]

    def dummy_assistant(self, name: str) -> dict:
        """The assistant turn a tool answer follows in the dummy chat (TRL's: a call to the
        tool, so a template deriving the answer's header from it renders it right)."""
        if self.kind == "tagged":
            return {"role": "assistant", "content": "x"}
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": {}}}]}


def resolve_format(kind: str, template: ChatTemplate, call_tags: Sequence[str],
                   result_tags: Sequence[str], result_role: str, prompt: str | None) -> ToolFormat:
    """objective.tool_format as a ToolFormat; auto reads the template's (module docstring)."""
    if kind not in FORMATS:
        raise ConfigError(f"objective.tool_format={kind!r} is not one of {list(FORMATS)}")
    if len(call_tags) != 2 or len(result_tags) != 2 or not all(call_tags):
        raise ConfigError("objective.tool_call_tags and objective.tool_result_tags are two "
                          f"strings each, an opening and a closing tag (got {list(call_tags)}, "
                          f"{list(result_tags)})")
    if kind == "auto":
        kind = template_format(template)
    return ToolFormat(kind, tuple(call_tags), tuple(result_tags), result_role,
                      prompt or TAGGED_PROMPT)


def template_format(template: ChatTemplate) -> str:
    """hermes | llama3 | tagged: what the template writes for a call of a probe tool."""
    chat = [{"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": "call00001",  # Mistral's: 9 letters or digits
                 "function": {"name": PROBE, "arguments": {"x": 1}}}]}]
    try:
        text = template.render(chat, tools=[PROBE_SCHEMA])
    except ConfigError:
        return "tagged"  # a template that refuses tool calls has no format of its own
    if PROBE not in text:
        return "tagged"
    if "<tool_call>" in text:
        return "hermes"
    if re.search(rf'"name":\s*"{PROBE}",\s*"parameters"', text):
        return "llama3"
    raise ConfigError(f"the chat template of {template.source} writes tool calls in a format "
                      "mlxlab does not parse (it reads Qwen's <tool_call> and Llama 3's JSON): "
                      "set objective.tool_format=tagged")


def answer_ids(fmt: ToolFormat, template: ChatTemplate, tokenizer: Tokenizer,
               answers: Sequence[ToolAnswer], stop_ids: Sequence[int]) -> np.ndarray:
    """The tokens that follow the model's end-of-turn token when these answers come back, up
    to the next assistant turn's start (TRL's _get_tool_suffix_ids, module docstring)."""
    messages = fmt.answer_messages(answers)
    dummy = [{"role": "user", "content": "dummy"}, fmt.dummy_assistant(answers[0].name)]
    prefix_text = template.render(dummy)
    full_text = template.render(dummy + messages, add_generation_prompt=True)
    prefix = tokenizer.encode(prefix_text, add_special_tokens=False).ids
    full = tokenizer.encode(full_text, add_special_tokens=False).ids
    stops = set(stop_ids)
    turns = sum(t in stops for t in prefix)  # end-of-turn tokens up to the assistant's own
    ends = [i for i, t in enumerate(full) if t in stops]
    if not turns or len(ends) <= turns - 1:
        raise ConfigError(f"the chat template of {template.source} does not end a turn with a "
                          f"stop token ({sorted(stops)}) before a tool answer; set "
                          "objective.tool_format=tagged")
    # After the assistant's end of turn, as TRL cuts it; counted in turns rather than compared
    # token by token, so a template that renders the last assistant turn otherwise (Qwen3's
    # empty <think> block, which TRL swaps its training template in for) cuts the same place.
    return np.asarray(full[ends[turns - 1] + 1:], np.int32)
