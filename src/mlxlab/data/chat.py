"""Chat templates: a model's own Jinja template, rendered as transformers renders it, and which
tokens of the result are the assistant's.

A Hugging Face model folder carries its chat template in `chat_template.jinja` (transformers
>= 4.43 writes that file), in `additional_chat_templates/<name>.jinja`, or in
tokenizer_config.json's `chat_template` (one string, or a list of {"name", "template"}).
`load_chat_template` reads them in transformers' order, with the named special tokens
(bos_token, eos_token, ...) transformers hands every template; `ChatTemplate.render` renders
with transformers' own renderer (`render_jinja_template`, what `apply_chat_template(messages,
tools=..., tokenize=False)` calls: its sandbox, its message clean-up, its `{% generation %}`
tracking), so the text is transformers' by construction, not by a second renderer kept in step.
transformers is imported on the first render (it costs seconds; the commands that never render a
chat do not pay them).

`encode_chat` tokenizes the text in one piece (the ids transformers gives, add_special_tokens
False: the template writes BOS itself) and marks the assistant's tokens:
- a template with `{% generation %} ... {% endgeneration %}` marks them itself (transformers'
  `return_assistant_tokens_mask`);
- any other template's turns are inferred and checked against its own rendering
  (data/chat_spans.py): each reply with its end-of-turn token, or the chat is refused with the
  fix (`{% generation %}` tags), never a silent mask over user text.
The end-of-turn tokens (`ChatTemplate.stop_tokens`) are the template's own (the control token it
writes after a reply) and the model folder's EOS (config.json and generation_config.json
eos_token_id, tokenizer_config.json eos_token): what the mask ends on and what generation stops
on, for any model, not a fixed list.
A token is the assistant's when its characters overlap an assistant span, as transformers
counts them, so a token that merges the last prompt character with the first reply character
is trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from tokenizers import Tokenizer

from mlxlab.data.chat_spans import assistant_spans, end_of_turn_token
from mlxlab.data.tokenizer import end_of_text_ids, model_end_tokens
from mlxlab.errors import ConfigError, MissingFileError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the named special tokens every template can read
SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
NO_TEMPLATE_FIX = (
    "give the folder a chat_template.jinja (or a chat_template in tokenizer_config.json), or "
    "set data.chat_template=<file.jinja>"
)

Message = Mapping[str, Any]
# The roles every chat template takes (transformers' chats); a template's own (Llama 3's
# "ipython", Mistral's "tool_results") are the quoted names on its lines that read a role.
STANDARD_ROLES = ("system", "user", "assistant", "tool")
QUOTED_NAME = re.compile(r"""['"]([A-Za-z_][\w-]*)['"]""")
MESSAGE_KEYS = frozenset({"role", "content", "type", "text", "name", "tool_calls", "tool_call_id",
                          "arguments", "parameters", "id"})


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
    a prompt or an assistant turn may end); `end_tokens` the model folder's end-of-text tokens
    (its config's EOS ids and eos_token: tokenizer.model_end_tokens)."""

    templates: Mapping[str, str]
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    control_tokens: frozenset[str] = frozenset()
    source: str = "<string>"
    end_tokens: tuple[str, ...] = ()

    @cached_property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens an assistant turn ends on, generation's stop tokens: the control token the
        default template writes after a reply (Phi-3's <|end|>, Gemma's <end_of_turn>), then
        the folder's end-of-text tokens and eos_token."""
        try:
            source = self.select()
        except ConfigError:
            source = next(iter(self.templates.values()))
        return self._stop_tokens_of(source)

    @cached_property
    def roles(self) -> tuple[str, ...]:
        """The roles a message may have: the standard ones and those the templates name."""
        named = {word for source in self.templates.values() for line in source.splitlines()
                 if "role" in line for word in QUOTED_NAME.findall(line)}
        return tuple(dict.fromkeys([*STANDARD_ROLES, *sorted(named - MESSAGE_KEYS)]))

    def _stop_tokens_of(self, source: str) -> tuple[str, ...]:
        own = end_of_turn_token(self._renderer(source, None, {}), self.control_tokens)
        named = self.special_tokens.get("eos_token")
        return tuple(dict.fromkeys(t for t in (own, *self.end_tokens, named) if t))

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
        ends = (self.stop_tokens if source == self.templates.get("default")
                else self._stop_tokens_of(source))
        return text, assistant_spans(self._renderer(source, tools, kwargs), messages, text,
                                     add_generation_prompt, ends, self.control_tokens,
                                     self.source)

    def _renderer(self, source: str, tools, kwargs: dict):
        """`(messages, add_generation_prompt) -> text` with this template, tools and kwargs."""
        def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
            return self._render(source, messages, tools, add_generation_prompt, kwargs)[0]
        return render

    def _render(self, source: str, messages: Sequence[Message], tools, add_generation_prompt,
                kwargs: dict, track: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """transformers' rendering of one chat, and with `track` the character spans of its
        {% generation %} blocks; the template's refusals as ConfigErrors."""
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            texts, spans = render_jinja_template(
                [list(messages)], tools=tools, chat_template=source,
                return_assistant_tokens_mask=track, add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs})  # kwargs win, as in transformers
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the chat template of {self.source} does not parse (line "
                              f"{e.lineno}: {e.message}); fix the template") from None
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ConfigError(f"the chat template of {self.source} refused a chat: {e}") from None
        return texts[0], [tuple(span) for span in spans[0]] if track else []


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
                            str(template_file or folder), tuple(model_end_tokens(folder)))
    if name is not None:
        template = ChatTemplate({"default": template.select(name)}, special,
                                template.control_tokens, f"{template.source} ({name})",
                                template.end_tokens)
    return template


def chat_template(folder: str | Path, mode: str = "auto") -> ChatTemplate | None:
    """The chat template prompts go through for the model whose tokenizer files are in `folder`
    (eval.chat): "auto" its own template if it has one, else plain prompts; "template" its
    template or a ConfigError saying how to give one; "plain" never a template."""
    if mode == "plain":
        return None
    try:
        return load_chat_template(folder)
    except (ConfigError, MissingFileError):
        if mode == "template":
            raise
        return None


def stop_ids(tokenizer: Tokenizer, folder: str | Path, config: Mapping | None = None) -> list[int]:
    """The ids a model's generation stops on, in order: the end of turn its chat template writes
    (when `folder`, where its tokenizer files are, has a template), then its end-of-text ids
    (tokenizer.end_of_text_ids: `config`'s eos_token_id, the folder's): Gemma's <end_of_turn>
    and <eos>, Phi-3's <|end|> before <|endoftext|>; EOT_TOKENS' only for a tokenizer trained
    here."""
    try:
        turn = load_chat_template(folder).stop_tokens
    except (ConfigError, MissingFileError):  # no template: a plain language model
        turn = ()
    ids = [tokenizer.token_to_id(t) for t in turn if tokenizer.token_to_id(t) is not None]
    return list(dict.fromkeys([*ids, *end_of_text_ids(tokenizer, folder, config)]))


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
        if not isinstance(message, Mapping):  # not an object: the renderer's own line says so
            continue
        content = message.get("content")
        if content is None or isinstance(content, str) or (
                isinstance(content, list) and all(isinstance(c, Mapping) for c in content)):
            continue
        raise ConfigError(f"message {j + 1} ({message.get('role')}) has content {content!r}: a "
                          "message's content is a string (or a list of {\"type\": \"text\", "
                          "\"text\": ...} parts)")


def check_roles(messages: Sequence[Mapping], roles: Sequence[str]) -> None:
    """Each message's role is one the template has: another (a "bot") would be rendered as no
    turn the model answers, and its row dropped as having nothing to learn."""
    for j, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role is not None and role not in roles:
            raise ConfigError(f"message {j + 1} has role {role!r}, which the chat template does "
                              f"not have: use one of {list(roles)} ('assistant' for the replies "
                              "the model learns)")


def encode_chats(tokenizer: Tokenizer, template: ChatTemplate, chats: Sequence[Mapping],
                 add_generation_prompt: bool = False, **kwargs: Any) -> list[EncodedChat]:
    """`encode_chat` for many chats ({"messages": [...], "tools": [...] or absent}), tokenized
    in one batch. A chat the template refuses raises ChatError (a ConfigError) naming it."""
    rendered = []
    for index, chat in enumerate(chats):
        try:
            check_contents(chat["messages"])
            check_roles(chat["messages"], template.roles)
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


def _has_generation_tag(source: str) -> bool:
    return GENERATION_TAG.search(source) is not None
