"""Which characters of a rendered chat are the assistant's, for a template without
`{% generation %}` tags: inferred turn by turn, and checked against the template's own rendering
before one token is trained on.

For assistant turn i the template is rendered three ways: the chat before the turn with the
generation prompt (`before`: what the model is given), the chat up to the turn's end (`through`:
the turn as its last message), and the whole chat with two markers around the turn's content
(where the reply's own words lie in the whole chat). The turn starts where `before` and the
whole chat part (the model writes from there) and ends at its end-of-turn token: the first of
the stop tokens (`ends`: the template's end of turn, the model folder's EOS) after the content,
which is what generation stops on. Whitespace or an end-of-text the template writes after that
token (ChatML's newline, Phi-3's `\n<|endoftext|>` at the chat's end) is not the assistant's.

Checks, so user text is never trained on silently:
- `before` and the whole chat, and `before` and `through`, may part only within what the
  generation prompt adds (where `before` parts from the same chat rendered without it): Qwen3's
  `enable_thinking=False` adds an empty reasoning block that an earlier turn does not hold, which
  is the prompt's. Where they part earlier (Mistral v0.3 writes the system prompt and the tools
  onto the last user turn only, so every earlier turn's prompt reads otherwise), the turn is
  looked up as `through` writes it: right after the control token that ends `before`
  (`[/INST]`), the same words before the content, the same content, the same end; else the chat
  is refused;
- what follows the content up to the end token must be what the template writes after it when
  the turn is written alone (a turn with no content to mark, a tool call, must end as it does);
- spans start after the previous one ends, and before the reply's content.
A turn none of these place is a ConfigError naming the template and the fix: `{% generation %}`
tags in a copy of the template (data.chat_template=).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from mlxlab.errors import ConfigError

# put around a reply's content to find it (private-use characters no text holds)
OPEN, CLOSE = "\ue000", "\ue001"

Message = Mapping[str, Any]
Render = Callable[[Sequence[Message], bool], str]  # (messages, add_generation_prompt) -> text


def assistant_spans(render: Render, messages: Sequence[Message], text: str,
                    add_generation_prompt: bool, ends: Sequence[str],
                    control: Collection[str], source: str) -> list[tuple[int, int]]:
    """The character spans [start, end) of the assistant turns of `messages` in `text` (their
    rendering), each with its end-of-turn token; a ConfigError where a turn cannot be placed."""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        floor = spans[-1][1] if spans else 0
        span = _turn_span(render, messages, i, text, add_generation_prompt, ends, control, floor)
        if span is None:
            raise ConfigError(
                f"the chat template of {source} writes assistant turn {i} so that which tokens "
                "are the assistant's cannot be told (its generation prompt does not match the "
                "whole chat, and the turn is not found as the template writes it alone); copy "
                "the template, wrap each reply in {% generation %}...{% endgeneration %}, and "
                "set data.chat_template=<file>")
        spans.append(span)
    return spans


def _turn_span(render: Render, messages: Sequence[Message], i: int, text: str,
               add_generation_prompt: bool, ends: Sequence[str], control: Collection[str],
               floor: int) -> tuple[int, int] | None:
    before = render(messages[:i], True)
    through = render(messages[: i + 1], False)
    start = _common_prefix(before, through)  # where the reply starts in the turn written alone
    in_text = content_span(render, messages, i, text, add_generation_prompt)
    if in_text is not None and in_text[1] <= len(through) and text.startswith(through):
        in_through = in_text  # the whole chat begins with the turn as written alone
    else:
        in_through = content_span(render, messages[: i + 1], i, through, False)
    if (in_text is None) != (in_through is None):
        return None
    end_t = first_end(through, in_through[1] if in_through else start, ends)
    if end_t is None:  # no end token after the reply: the turn as the template ends it alone
        if text.startswith(through) and start >= floor:
            return start, _end_of_turn(through, start, control)
        return None
    s = _common_prefix(before, text)  # where the reply starts in the whole chat
    # where the generation prompt's own text begins (0 where `before` is all there is before
    # the reply, written alone and in the whole chat alike: nothing to check)
    prompt = 0 if start == s == len(before) else _prompt_start(render, messages[:i], before)
    if start < prompt or s < prompt or s < floor:
        # the generation prompt does not match the whole chat before the turn (Mistral v0.3
        # writes the system prompt and tools onto the last user turn only): the turn is found
        # right after the prompt's ending, as the template writes it alone
        return _moved_turn(text, through, before, in_text, in_through, end_t, control, floor)
    if in_text is None:  # no content to mark (a tool call alone): up to the first end token,
        # the turn ends as the template writes it alone (Qwen3 drops an earlier turn's
        # reasoning block, so the whole chat may hold less before it)
        end = first_end(text, s, ends)
        ok = end is not None and through[start:end_t].endswith(text[s:end])
        return (s, end) if ok else None
    a, b = in_text
    end = first_end(text, b, ends)
    if s <= a and end is not None and text[b:end] == through[in_through[1]:end_t]:
        return s, end
    return None


def _prompt_start(render: Render, messages: Sequence[Message], before: str) -> int:
    """Where the generation prompt's own text begins in `before` (the chat before the turn
    rendered with it): where `before` and the same chat rendered without it part."""
    try:
        return _common_prefix(before, render(messages, False))
    except ConfigError:
        return 0


def _moved_turn(text: str, through: str, before: str, in_text, in_through,
                end_t: int | None, control: Collection[str], floor: int
                ) -> tuple[int, int] | None:
    """The turn where the prompt before it reads otherwise in the whole chat (Mistral v0.3
    writes the system prompt and tools onto the last user turn only): the prompt's ending
    (`before` from its last control token on: `[/INST]`) and what the template writes between it
    and the content (` `), the content and what follows it up to the end token, all as the
    template writes the turn alone, found around the content in `text`."""
    cue = _prompt_cue(before, control)
    if end_t is None or not cue:
        return None
    if in_text is None:  # no content (a tool call alone): the whole turn right after the cue
        at = through.rfind(cue, 0, end_t)
        turn = through[at + len(cue):end_t] if at >= 0 else ""
        found = text.find(cue + turn, floor) if turn else -1
        return (found + len(cue), found + len(cue) + len(turn)) if found >= 0 else None
    (a, b), (a_t, b_t) = in_text, in_through
    at = through.rfind(cue, 0, a_t)
    if at < 0:
        return None
    lead, tail = through[at + len(cue):a_t], through[b_t:end_t]
    s, e = a - len(lead), b + len(tail)
    if (s >= floor and text[s:a] == lead and text[b:e] == tail
            and text[a:b] == through[a_t:b_t] and text[:s].endswith(cue)):
        return s, e
    return None


def content_span(render: Render, messages: Sequence[Message], i: int, text: str,
                 add_generation_prompt: bool) -> tuple[int, int] | None:
    """Where message i's content lies in `text` (the rendering of `messages`): the chat
    rendered again with markers around the content (inside its outer whitespace, which templates
    trim) must give `text` once the markers are taken out. None: no string content, or the
    template writes it otherwise once marked (it tests the content, or copies it)."""
    content = messages[i].get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    core = content.strip()
    left = content[: len(content) - len(content.lstrip())]
    right = content[len(content.rstrip()):]
    marked = [*messages[:i], {**messages[i], "content": left + OPEN + core + CLOSE + right},
              *messages[i + 1:]]
    try:
        other = render(marked, add_generation_prompt)
    except ConfigError:
        return None
    if other.count(OPEN) != 1 or other.count(CLOSE) != 1:
        return None
    a, b = other.index(OPEN), other.index(CLOSE) - 1
    if b < a or other.replace(OPEN, "").replace(CLOSE, "") != text:
        return None
    return a, b


def first_end(text: str, origin: int, ends: Sequence[str]) -> int | None:
    """The end of the first of the `ends` tokens at or after `origin` in `text`, else None."""
    best: tuple[int, int] | None = None
    for token in ends:
        at = text.find(token, origin)
        if at >= 0 and (best is None or (at, -len(token)) < (best[0], -best[1])):
            best = (at, len(token))
    return None if best is None else best[0] + best[1]


def end_of_turn_token(render: Render, control: Collection[str]) -> str | None:
    """The control token a template writes right after an assistant reply (ChatML's <|im_end|>,
    Phi-3's <|end|>, Gemma's <end_of_turn>): the end of turn generation stops on."""
    try:
        text = render([{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": CLOSE}], False)
    except ConfigError:
        return None
    if text.count(CLOSE) != 1:
        return None
    after = text[text.index(CLOSE) + 1:]
    after = after[len(after) - len(after.lstrip()):]
    matches = [t for t in control if after.startswith(t)]
    return max(matches, key=len) if matches else None


def _prompt_cue(prompt: str, control: Collection[str]) -> str:
    """The prompt's ending from its last control token on (`[/INST]`; '' without one)."""
    best = -1
    for token in control:
        at = prompt.rfind(token)
        if at > best:
            best = at
    return prompt[best:] if best >= 0 else ""


def _end_of_turn(text: str, start: int, control: Collection[str]) -> int:
    """Where a turn that starts at `start` and runs to the end of `text` ends, with no end token
    after its reply: after its last control token when only whitespace follows that, else at
    the end."""
    stripped = text.rstrip()
    if start < len(stripped) < len(text) and any(stripped.endswith(t) for t in control):
        return len(stripped)
    return len(text)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
