"""Chat templates: a model's own Jinja template, rendered as transformers renders it, and which
tokens of the result are the assistant's.

A Hugging Face model folder carries its chat template in `chat_template.jinja` (transformers
>= 4.43 writes that file), in `additional_chat_templates/<name>.jinja`, or in
tokenizer_config.json's `chat_template` (one string, or a list of {"name", "template"}).
`load_chat_template` reads them in transformers' order; `ChatTemplate.render` gives the text
`tokenizer.apply_chat_template(messages, tools=..., tokenize=False)` gives, byte for byte:
the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, a `tojson` that keeps non-ASCII and HTML characters, `strftime_now`,
`namespace`, `dict`), the same variables (messages, tools, documents=None,
add_generation_prompt and the tokenizer's named special tokens: bos_token, eos_token, ...), and
the same clean-up of messages (keys whose value is null dropped; reasoning under
`reasoning_content`, `thinking` and `reasoning`). transformers is not imported: it is a test
dependency only (tests/test_chat.py checks the parity).

`encode_chat` tokenizes the text in one piece (the ids transformers gives, add_special_tokens
False: the template writes BOS itself) and marks the assistant's tokens:
- a template with `{% generation %} ... {% endgeneration %}` marks them itself (transformers'
  `return_assistant_tokens_mask`);
- any other template is rendered once per assistant turn: the conversation before the turn with
  the generation prompt (where the model starts writing: where that text stops agreeing with
  the whole chat) and the conversation up to the turn's end (where it stops: a prefix of the
  whole chat in every common template). Whitespace the template writes after the turn's last
  special token (ChatML's newline after <|im_end|>) is not the assistant's: it ends at its
  end-of-turn token, which is what generation stops on. A template that writes a turn otherwise
  once later turns follow it (Qwen3 drops earlier turns' reasoning) is rendered once more with a
  marker after the turn's content: the content ends where the marker appears, and the turn at
  the end-of-turn token after it; where even that fails (content that is not a string) the chat
  is refused with the fix: `{% generation %}` tags.
A token is the assistant's when its characters overlap an assistant span, as transformers
counts them, so a token that merges the last prompt character with the first reply character
is trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from mlxlab.errors import ConfigError, MissingFileError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens every template can read
SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# put after a reply's content to find where it ends (a private-use character no text holds)
MARKER = "\ue000"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
NO_TEMPLATE_FIX = (
    "give the folder a chat_template.jinja (or a chat_template in tokenizer_config.json), or "
    "set data.chat_template=<file.jinja>"
)

Message = Mapping[str, Any]


class ChatError(ConfigError):
    """A chat `encode_chats` could not render (the template refused it): `index` is its place in
    the list and `reason` the template's complaint, so a caller can name the row."""

    def __init__(self, reason: str, index: int):
        super().__init__(f"chat {index}: {reason}")
        self.reason, self.index = reason, index


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template(s) and what its templates read. `templates` maps a name to Jinja
    source (one unnamed template is "default"); `special_tokens` are the named ones transformers
    passes (bos_token, eos_token, ...); `control_tokens` are the tokenizer's added tokens (where
    an assistant turn may end)."""

    templates: Mapping[str, str]
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    control_tokens: frozenset[str] = frozenset()
    source: str = "<string>"

    def select(self, name: str | None = None, tools: Sequence | None = None) -> str:
        """The Jinja source to use, as transformers picks it: the template `name` if given,
        else "tool_use" when tools are passed and the model has one, else "default"."""
        if name is not None:
            if name not in self.templates:
                raise ConfigError(f"{self.source} has no chat template named {name!r} (it has "
                                  f"{sorted(self.templates)}); set data.chat_template_name=")
            return self.templates[name]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ConfigError(f"{self.source} has several chat templates and none named 'default' "
                          f"({sorted(self.templates)}); set data.chat_template_name= to one")

    def render(self, messages: Sequence[Message], tools: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = False, name: str | None = None,
               **kwargs: Any) -> str:
        """The chat as text: `apply_chat_template(messages, tools=tools, tokenize=False,
        add_generation_prompt=...)`. A template's raise_exception becomes a ConfigError."""
        source = self.select(name, tools)
        return self._render(source, messages, tools, add_generation_prompt, kwargs)[0]

    def render_with_spans(self, messages: Sequence[Message],
                          tools: Sequence[Mapping] | None = None,
                          add_generation_prompt: bool = False, name: str | None = None,
                          **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """The chat as text and the character spans [start, end) of its assistant turns, each
        with its end-of-turn token (the module docstring says how they are found)."""
        source = self.select(name, tools)
        if _has_generation_tag(source):
            return self._render(source, messages, tools, add_generation_prompt, kwargs, True)
        text = self._render(source, messages, tools, add_generation_prompt, kwargs)[0]
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._render(source, messages[:i], tools, True, kwargs)[0]
            through = self._render(source, messages[: i + 1], tools, False, kwargs)[0]
            if text.startswith(through):
                start = _common_prefix(before, through)
                spans.append((start, self._end_of_turn(through, start)))
            else:  # the template writes this turn otherwise once later turns follow it
                start = _common_prefix(before, text)
                spans.append((start, self._end_of_reply(source, messages, i, text, tools,
                                                        add_generation_prompt, kwargs, start)))
        return text, spans

    def _end_of_reply(self, source: str, messages: Sequence[Message], i: int, text: str,
                      tools, add_generation_prompt: bool, kwargs: dict, start: int) -> int:
        """Where assistant turn `i` ends in `text` when the template writes it otherwise as the
        last turn (Qwen3 drops earlier turns' reasoning): the chat rendered again with a marker
        after the turn's content shows where the content ends in `text`; the turn's end-of-turn
        token follows it (after spaces at most)."""
        content = messages[i].get("content")
        if isinstance(content, str):
            marked = [*messages[:i], {**messages[i], "content": content + MARKER},
                      *messages[i + 1:]]
            other = self._render(source, marked, tools, add_generation_prompt, kwargs)[0]
            end = _common_prefix(text, other)
            if end >= start and other[:end] + other[end + len(MARKER):] == text:
                gap = len(text) - end - len(text[end:].lstrip(" "))
                for token in sorted(self.control_tokens, key=len, reverse=True):
                    if text.startswith(token, end + gap):
                        return end + gap + len(token)
                return end
        raise ConfigError(
            f"the chat template of {self.source} writes assistant turn {i} otherwise once later "
            "turns follow it, and where the turn ends cannot be found; wrap the assistant's "
            "reply in a copy of the template with {% generation %}...{% endgeneration %} and "
            "set data.chat_template=<file>")

    def _end_of_turn(self, text: str, start: int) -> int:
        """Where the assistant turn that starts at `start` and runs to the end of `text` ends:
        after its last control token when only whitespace follows that, else at the end."""
        stripped = text.rstrip()
        if start < len(stripped) < len(text) and any(
            stripped.endswith(token) for token in self.control_tokens
        ):
            return len(stripped)
        return len(text)

    def _render(self, source: str, messages: Sequence[Message], tools, add_generation_prompt,
                kwargs: dict, track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        compiled = _compile(source)
        variables = dict(
            messages=_clean_messages(messages), tools=_plain(tools), documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **_plain(kwargs)},  # kwargs win, as in transformers
        )
        try:
            if not track:
                return compiled.render(**variables), []
            blocks: list[str] = []
            spans: list[tuple[int, int]] = []
            with compiled.environment.track_generation(blocks, spans):
                for block in compiled.generate(**variables):
                    blocks.append(block)
            return "".join(blocks), spans
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: a value of another type
            raise ConfigError(f"the chat template of {self.source} refused a chat: {e}") from None


@dataclass(frozen=True)
class EncodedChat:
    """A rendered, tokenized chat: `ids` (int32) are transformers' `apply_chat_template` ids;
    `assistant_mask[t]` is True where token t is the assistant's (its reply and end-of-turn
    token); `turns[t]` says which assistant turn (0, 1, ... in order; -1: none), so
    `turns == turns.max()` is the last reply alone (a preference pair's completion); `spans` are
    the assistant turns' character spans in `text`."""

    text: str
    ids: np.ndarray
    assistant_mask: np.ndarray
    spans: list[tuple[int, int]]
    turns: np.ndarray


def load_chat_template(source: str | Path, template_file: str | Path | None = None,
                       name: str | None = None) -> ChatTemplate:
    """The chat template of a model folder (or of the folder its tokenizer.json sits in), read as
    transformers reads it: chat_template.jinja and additional_chat_templates/*.jinja first, else
    tokenizer_config.json's chat_template (a string, or a list of {"name", "template"}).
    `template_file` (a .jinja file) replaces the folder's templates, keeping its special tokens;
    `name` picks one of several named templates. No template at all is a ConfigError that says
    how to give one."""
    path = Path(source)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise MissingFileError(f"chat template source not found: {source} (give the model "
                               "folder, or its tokenizer.json)")
    config = _read_json(folder / "tokenizer_config.json")
    templates: dict[str, str] = {}
    if template_file is not None:
        if not Path(template_file).is_file():
            raise MissingFileError(f"chat template file not found: {template_file} (set "
                                   "data.chat_template= to a .jinja file, or null)")
        templates["default"] = Path(template_file).read_text(encoding="utf-8")
    else:
        if (folder / TEMPLATE_FILE).is_file():
            templates["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        for extra in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            templates[extra.name.removesuffix(".jinja")] = extra.read_text(encoding="utf-8")
    if not templates:  # separate files win over the config's entry, as in transformers
        entry = config.get("chat_template")
        if isinstance(entry, str):
            templates["default"] = entry
        elif isinstance(entry, list):
            try:
                templates = {str(t["name"]): str(t["template"]) for t in entry}
            except (KeyError, TypeError):
                raise ConfigError(f"{folder}/tokenizer_config.json: chat_template must be a "
                                  "string or a list of {\"name\", \"template\"} objects; fix "
                                  "the file or set data.chat_template=<file.jinja>") from None
    if not templates:
        raise ConfigError(f"{folder} has no chat template (no {TEMPLATE_FILE}, no chat_template "
                          f"in tokenizer_config.json): {NO_TEMPLATE_FIX}")
    special = _special_tokens(folder, config)
    template = ChatTemplate(templates, special, _control_tokens(folder, config, special),
                            str(template_file or folder))
    if name is not None:
        template = ChatTemplate({"default": template.select(name)}, special,
                                template.control_tokens, f"{template.source} ({name})")
    return template


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                tools: Sequence[Mapping] | None = None, add_generation_prompt: bool = False,
                **kwargs: Any) -> EncodedChat:
    """Render one chat with `template`, tokenize it with `tokenizer` (a `tokenizers.Tokenizer`:
    the model's tokenizer.json) and mark the assistant's tokens."""
    return encode_chats(tokenizer, template, [{"messages": messages, "tools": tools}],
                        add_generation_prompt, **kwargs)[0]


def check_contents(messages: Sequence[Mapping]) -> None:
    """Each message's content is text: a string, a list of content parts ({"type": "text",
    "text": ...}, what multimodal templates read) or absent (a tool call); anything else (a
    number) is a ConfigError here, not a TypeError from inside the template."""
    for j, message in enumerate(messages):
        content = message.get("content")
        if content is None or isinstance(content, str) or (
                isinstance(content, list) and all(isinstance(c, Mapping) for c in content)):
            continue
        raise ConfigError(f"message {j + 1} ({message.get('role')}) has content {content!r}: a "
                          "message's content is a string (or a list of {\"type\": \"text\", "
                          "\"text\": ...} parts)")


def encode_chats(tokenizer: Tokenizer, template: ChatTemplate, chats: Sequence[Mapping],
                 add_generation_prompt: bool = False, **kwargs: Any) -> list[EncodedChat]:
    """`encode_chat` for many chats ({"messages": [...], "tools": [...] or absent}), tokenized
    in one batch. A chat the template refuses raises ChatError (a ConfigError) naming it."""
    rendered = []
    for index, chat in enumerate(chats):
        try:
            check_contents(chat["messages"])
            rendered.append(template.render_with_spans(chat["messages"], chat.get("tools"),
                                                       add_generation_prompt, **kwargs))
        except ConfigError as e:
            raise ChatError(str(e), index) from None
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    chats_out = []
    for (text, spans), enc in zip(rendered, encodings):
        turns = spans_to_turns(enc.offsets, spans)
        chats_out.append(EncodedChat(text, np.asarray(enc.ids, np.int32), turns >= 0, spans,
                                     turns))
    return chats_out


def spans_to_turns(offsets: Sequence[tuple[int, int]],
                   spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """For every token, the index of the span its characters [start, end) overlap (spans and
    tokens both in order), else -1: `>= 0` is transformers' `assistant_masks`."""
    turns = np.full(len(offsets), -1, np.int32)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            turns[t] = k
    return turns


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or replace the file") from None


def _special_tokens(folder: Path, config: dict) -> dict[str, str]:
    """The named special tokens transformers hands every template: tokenizer_config.json's,
    special_tokens_map.json's over them where the config has no added_tokens_decoder (its
    legacy path)."""
    values = {k: config.get(k) for k in SPECIAL_TOKEN_KEYS}
    if "added_tokens_decoder" not in config:
        legacy = _read_json(folder / "special_tokens_map.json")
        values.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKEN_KEYS})
    tokens = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            tokens[key] = str(value)
    return tokens


def _control_tokens(folder: Path, config: dict, special: Mapping[str, str]) -> frozenset[str]:
    """The added tokens of the folder's tokenizer (tokenizer.json, tokenizer_config.json's
    added_tokens_decoder) and its named special tokens, whitespace tokens left out."""
    tokens = set(special.values())
    tokens |= {t.get("content", "") for t in (config.get("added_tokens_decoder") or {}).values()}
    if (folder / "tokenizer.json").is_file():
        spec = _read_json(folder / "tokenizer.json")
        tokens |= {t.get("content", "") for t in spec.get("added_tokens") or []}
    return frozenset(t for t in tokens if t and not t.isspace())


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _has_generation_tag(source: str) -> bool:
    return GENERATION_TAG.search(source) is not None


def _clean_messages(messages: Sequence[Message]) -> list[dict]:
    """transformers' message clean-up: keys whose value is None dropped (templates test for a
    missing key, not a null one); reasoning copied to `thinking` and `reasoning_content`."""
    cleaned = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ConfigError(f"a chat message must be a JSON object, got {message!r}")
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        cleaned.append(message)
    return cleaned


def _plain(value: Any) -> Any:
    """Plain JSON types only, so the sandbox sees no object with methods of its own (numpy
    scalars become numbers, anything else a placeholder naming its type, as in transformers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    for kind in (str, int, float):  # subclasses (enums, ...) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


class GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character span of its output while
    a tracker is active (transformers' AssistantTracker)."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        environment.extend(track_generation=self.track_generation)
        self._tracking: ContextVar = ContextVar("generation_tracker", default=None)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body) \
            .set_lineno(lineno)

    def _generation(self, caller) -> str:
        output = caller()
        if (tracking := self._tracking.get()) is not None:
            blocks, spans = tracking
            start = len("".join(blocks))
            spans.append((start, start + len(output)))
        return output

    @contextmanager
    def track_generation(self, blocks: list, spans: list) -> Iterator[None]:
        token = self._tracking.set((blocks, spans))
        try:
            yield
        finally:
            self._tracking.reset(token)


class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` refusing underscore names, which could reach CPython internals."""

    def __init__(*args, **kwargs):  # Namespace's signature: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attributes ({name!r})")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """The template compiled in transformers' sandbox (one environment per template source)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[GenerationTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                          "fix the template") from None
