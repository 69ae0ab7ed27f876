"""The chat renderer (mlxlab/data/chat.py) against transformers' apply_chat_template, on real
template styles (ChatML, Llama-3, Qwen2.5 with tools and a default system prompt, Mistral)
written into tiny tokenizer folders by transformers itself: rendered text and token ids byte
for byte, and the assistant mask against transformers' `{% generation %}` mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from hf_helpers import tiny
from mlxlab.data.chat import encode_chat, load_chat_template
from mlxlab.errors import ConfigError

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a terse storyteller."}
TURNS = [
    {"role": "user", "content": "Tell me about Tim."},
    {"role": "assistant", "content": "Tim had a red ball. He liked to play."},
    {"role": "user", "content": "  And then? ünïcode & <b>tags</b>  "},
    {"role": "assistant", "content": "He gave it to Sue, who was sad.", "tool_calls": None},
]
CHATS = {  # Mistral's template refuses system turns and roles that do not alternate
    "chatml": [TURNS[:2], [SYSTEM, *TURNS], [SYSTEM, *TURNS[:3]]],
    "llama3": [TURNS[:2], [SYSTEM, *TURNS], [SYSTEM, *TURNS[:3]]],
    "qwen2.5": [TURNS[:2], [SYSTEM, *TURNS], TURNS[:3]],
    "mistral": [TURNS[:2], TURNS, TURNS[:3]],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, «today»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": json.dumps({"temp": 18, "sky": "cloudy"})},
    {"role": "assistant", "content": "It is 18 degrees and cloudy in Paris."},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    made = {style: tiny.save_chat_tokenizer(style, root / style) for style in tiny.CHAT_STYLES}
    # the template inside tokenizer_config.json instead of chat_template.jinja
    made["qwen2.5-config"] = tiny.save_chat_tokenizer("qwen2.5", root / "inconfig",
                                                      save_jinja=False)
    return made


def ours(folder, messages, **kwargs):
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return encode_chat(tok, load_chat_template(folder), messages, **kwargs)


def theirs(folder, messages, **kwargs):
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    return text, list(hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             **kwargs)["input_ids"])


@pytest.mark.parametrize("style", ["chatml", "llama3", "qwen2.5", "mistral", "qwen2.5-config"])
def test_text_and_ids_equal_transformers(folders, style):
    """Every chat (one turn, several turns with a system turn, ending on a user turn), with
    and without the generation prompt: the same text and the same ids as transformers."""
    folder = folders[style]
    assert (folder / "chat_template.jinja").is_file() == (style != "qwen2.5-config")
    for messages in CHATS[style.removesuffix("-config")]:
        for prompt in (False, True):
            chat = ours(folder, messages, add_generation_prompt=prompt)
            text, ids = theirs(folder, messages, add_generation_prompt=prompt)
            assert chat.text == text
            assert chat.ids.tolist() == ids
            assert chat.ids.dtype == np.int32 and len(chat.assistant_mask) == len(ids)


def test_default_system_prompt_and_bos(folders):
    """Qwen2.5 writes its default system prompt when the chat has none; Llama-3 and Mistral
    write bos_token from tokenizer_config.json (once: the ids are not given a second BOS)."""
    assert ours(folders["qwen2.5"], TURNS[:2]).text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    for style, bos in (("llama3", "<|begin_of_text|>"), ("mistral", "<s>")):
        chat = ours(folders[style], TURNS[:2])
        tok = Tokenizer.from_file(str(folders[style] / "tokenizer.json"))
        assert chat.text.startswith(bos) and chat.text.count(bos) == 1
        assert chat.ids[0] == tok.token_to_id(bos) and chat.ids[1] != chat.ids[0]


def test_tools_equal_transformers(folders):
    """`tools` reach the template (Qwen2.5's tool block, tojson keeping non-ASCII), as do an
    assistant turn's tool_calls and a tool turn; the tool-call turn is the assistant's."""
    folder = folders["qwen2.5"]
    chat = ours(folder, TOOL_CHAT, tools=TOOLS)
    text, ids = theirs(folder, TOOL_CHAT, tools=TOOLS)
    assert chat.text == text and chat.ids.tolist() == ids
    assert "# Tools" in text and "«today»" in text and '"arguments": {"city": "Paris"}' in text
    spans = [chat.text[a:b] for a, b in chat.spans]
    assert spans == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                     '</tool_call><|im_end|>', "It is 18 degrees and cloudy in Paris.<|im_end|>"]


def test_named_templates_pick_tool_use(tmp_path, folders):
    """A list of named templates in tokenizer_config.json: "default", and "tool_use" when tools
    are passed, as transformers picks them; without a "default" one is a clear error."""
    folder = tmp_path / "named"
    folder.mkdir()
    config = json.loads((folders["chatml"] / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": tiny.CHATML},
                               {"name": "tool_use", "template": tiny.QWEN25}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text((folders["chatml"] / "tokenizer.json").read_text())
    for tools in (None, TOOLS):
        chat = ours(folder, TOOL_CHAT[:1], tools=tools)
        assert (chat.text, chat.ids.tolist()) == theirs(folder, TOOL_CHAT[:1], tools=tools)
    assert "# Tools" in ours(folder, TOOL_CHAT[:1], tools=TOOLS).text
    config["chat_template"] = config["chat_template"][1:]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="none named 'default'"):
        ours(folder, TOOL_CHAT[:1])


def test_no_template_is_a_clear_error(tmp_path, folders):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((folders["chatml"] / "tokenizer.json").read_text())
    with pytest.raises(ConfigError, match=r"has no chat template .*chat_template\.jinja.*"
                                          r"data\.chat_template="):
        load_chat_template(folder)


def test_template_errors_are_user_errors(folders):
    """A template's raise_exception (Mistral's role alternation) is one ConfigError."""
    with pytest.raises(ConfigError, match="roles must alternate"):
        ours(folders["mistral"], [SYSTEM, *TURNS])


def tagged(template: str) -> str:
    """ChatML with the assistant's reply and <|im_end|> in {% generation %} tags, as TRL's
    assistant-only templates mark them."""
    assert template == tiny.CHATML
    return ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
            "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + "
            "'<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + "
            "message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_mask(folder, template, messages):
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = hf.apply_chat_template(messages, chat_template=template, return_dict=True,
                                 return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def test_assistant_mask_equals_transformers_generation_mask(tmp_path, folders):
    """On ChatML, the mask found turn by turn from the plain template equals transformers'
    return_assistant_tokens_mask on the same template with {% generation %} tags (and ours on
    the tagged template agrees too): every assistant turn, each with its <|im_end|>, not the
    newline after it."""
    plain = folders["chatml"]
    marked = tmp_path / "tagged.jinja"
    marked.write_text(tagged(tiny.CHATML))
    tok = Tokenizer.from_file(str(plain / "tokenizer.json"))
    end = tok.token_to_id("<|im_end|>")
    for messages in CHATS["chatml"]:
        ids, expected = hf_mask(plain, tagged(tiny.CHATML), messages)
        for template in (load_chat_template(plain), load_chat_template(plain, marked)):
            chat = encode_chat(tok, template, messages)
            assert chat.ids.tolist() == ids and chat.assistant_mask.astype(int).tolist() == expected
        replies = [m for m in messages if m["role"] == "assistant"]
        masked = chat.ids[chat.assistant_mask]
        assert (masked == end).sum() == len(replies)  # each turn's end-of-turn token
        assert tok.decode(masked.tolist(), skip_special_tokens=True) == "".join(
            m["content"] for m in replies)


@pytest.mark.parametrize("style", ["llama3", "mistral", "qwen2.5"])
def test_assistant_spans_are_the_replies(folders, style):
    """On the other styles the assistant spans are exactly each reply as the template writes it
    and its end-of-turn token (Llama-3 trims the reply)."""
    messages = CHATS[style][1]
    chat = ours(folders[style], messages)
    end = {"llama3": "<|eot_id|>", "mistral": "</s>", "qwen2.5": "<|im_end|>"}[style]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [chat.text[a:b] for a, b in chat.spans] == [r.strip() + end for r in replies]
    tok = Tokenizer.from_file(str(folders[style] / "tokenizer.json"))
    assert tok.decode(chat.ids[chat.assistant_mask].tolist(), skip_special_tokens=True) == \
        "".join(r.strip() for r in replies)


def test_a_token_across_the_boundary_is_the_assistants(tmp_path, folders):
    """A template whose generation prompt ends in a space ("Assistant: "): the byte-level
    tokenizer merges that space with the reply's first word, and the merged token counts as the
    assistant's, as in transformers' mask over {% generation %} around the reply."""
    base = "{% for m in messages %}{% if m.role == 'user' %}{{ 'User: ' + m.content + '\\n' }}" \
           "{% else %}{{ 'Assistant: ' }}{REPLY}{{ '\\n' }}{% endif %}{% endfor %}" \
           "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    plain = base.replace("{REPLY}", "{{ m.content + eos_token }}")
    marked = base.replace("{REPLY}", "{% generation %}{{ m.content + eos_token }}"
                                     "{% endgeneration %}")
    (tmp_path / "plain.jinja").write_text(plain)
    folder = folders["chatml"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chat = encode_chat(tok, load_chat_template(folder, tmp_path / "plain.jinja"), TURNS)
    ids, expected = hf_mask(folder, marked, TURNS)
    assert chat.ids.tolist() == ids and chat.assistant_mask.astype(int).tolist() == expected
    offsets = tok.encode(chat.text, add_special_tokens=False).offsets
    first = int(np.argmax(chat.assistant_mask))
    assert offsets[first][0] < chat.spans[0][0] < offsets[first][1]  # it straddles the boundary
