"""Chat data. The renderer (mlxlab/data/chat.py) against transformers' apply_chat_template, on
real template styles (ChatML, Llama-3, Qwen2.5 with tools and a default system prompt, Mistral)
written into tiny tokenizer folders by transformers itself: rendered text and token ids byte
for byte, and the assistant mask against transformers' `{% generation %}` mask. Then data=chat
(data/completions.py): assistant-only loss checked by hand, truncation, formats per file, and
experiment=finetune_chat end to end into a real MLflow store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

from hf_helpers import save_tiny_model, tiny
from mlxlab.config import asset_path
from mlxlab.data.batching import Batching
from mlxlab.data.chat import encode_chat, load_chat_template
from mlxlab.data.completions import PromptCompletion
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.objectives.losses import task_loss

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
    # a chat file's "tools" reach the template the same way through data=chat
    rows = write_jsonl(folder / "tools.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}])
    data = chat_data(folder, rows, val_file=str(rows), max_length=4096)
    assert data.train[0][0].tolist() == ids
    assert data.train[1][0].tolist() == chat.assistant_mask.tolist()


WHITESPACE = """{# block tags on their own lines: trim_blocks and lstrip_blocks decide the text #}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ m.role }}>
    {{ m.content | trim }}
</{{ m.role }}>
{% endfor %}
Today: {{ strftime_now('%Y-%m-%d') }}
{{ dict(turns=ns.n, eos=eos_token) | tojson(indent=2) }} {{ {'x': '<b>&é'} | tojson }}
{% if add_generation_prompt %}
<assistant>
{% endif %}
"""


def test_the_jinja_environment_equals_transformers(tmp_path, folders):
    """A template on many lines (trim_blocks, lstrip_blocks), with loop controls, namespace,
    dict, strftime_now and tojson (indent; HTML and non-ASCII kept): the same text as
    transformers renders."""
    (tmp_path / "ws.jinja").write_text(WHITESPACE)
    folder = folders["chatml"]
    template = load_chat_template(folder, tmp_path / "ws.jinja")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for prompt in (False, True):
        ours_text = template.render([SYSTEM, *TURNS], add_generation_prompt=prompt)
        assert ours_text == hf.apply_chat_template([SYSTEM, *TURNS], chat_template=WHITESPACE,
                                                   tokenize=False, add_generation_prompt=prompt)
    assert '"turns": 4' in ours_text and '"<b>&é"' in ours_text
    assert ours_text.startswith("<user>\n    Tell me about Tim.\n</user>\n<assistant>\n")


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


def test_template_errors_are_user_errors(folders, tmp_path):
    """A template's raise_exception (Mistral's role alternation), a template that does not
    parse, and a message that is not an object: one ConfigError each, from transformers' own
    renderer."""
    with pytest.raises(ConfigError, match="roles must alternate"):
        ours(folders["mistral"], [SYSTEM, *TURNS])
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")
    broken = load_chat_template(folders["chatml"], tmp_path / "broken.jinja")
    with pytest.raises(ConfigError, match=r"does not parse \(line 1: .*\); fix the template"):
        broken.render(TURNS)
    with pytest.raises(ConfigError, match="refused a chat: .*dict"):
        ours(folders["chatml"], [TURNS[0], "Tim had a ball."])


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
    for k, reply in enumerate(replies):  # turns: each reply alone (the last: a DPO completion)
        assert tok.decode(chat.ids[chat.turns == k].tolist(), skip_special_tokens=True) == \
            reply.strip()
    assert chat.turns.max() == len(replies) - 1 and ((chat.turns >= 0) == chat.assistant_mask).all()


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


REASONING = """{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
    {%- if m.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_query and m.reasoning_content is defined %}
            {{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- m.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def test_a_template_that_drops_earlier_reasoning(tmp_path, folders):
    """Qwen3's way: reasoning written only for the turns after the last user message, so an
    earlier turn reads otherwise once the chat goes on (rendering turn by turn cannot end it).
    Its span is found by a marker after its content: the mask equals transformers' on the same
    template with {% generation %} around each reply (reasoning included where written)."""
    plain = REASONING
    marked = REASONING.replace("{{- '<|im_start|>assistant\\n' }}\n        {%- if loop",
                               "{{- '<|im_start|>assistant\\n' }}{% generation %}\n        {%- if loop")
    marked = marked.replace("{{- m.content + '<|im_end|>\\n' }}",
                            "{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}")
    assert marked.count("generation %}") == 2
    (tmp_path / "plain.jinja").write_text(plain)
    messages = [dict(m, reasoning_content=f"thought {k}") if m["role"] == "assistant" else m
                for k, m in enumerate(TURNS)]
    folder = folders["chatml"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chat = encode_chat(tok, load_chat_template(folder, tmp_path / "plain.jinja"), messages)
    ids, expected = hf_mask(folder, marked, messages)
    assert chat.ids.tolist() == ids and chat.assistant_mask.astype(int).tolist() == expected
    assert [chat.text[a:b] for a, b in chat.spans] == [
        TURNS[1]["content"] + "<|im_end|>",
        "<think>\nthought 3\n</think>\n\n" + TURNS[3]["content"] + "<|im_end|>"]


# --- data=chat: the fine-tuning data module on chat files ------------------------------------

def story_chats(n: int) -> list[dict]:
    """The first `n` of the shipped chats (assets/tinystories/chats.jsonl: the prompt/completion
    pairs as chats, a system turn on every third, two exchanges on every other one)."""
    lines = Path(asset_path("tinystories/chats.jsonl")).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> dict:
    """A tiny random Llama whose tokenizer has ChatML's tokens and template, and chats."""
    root = tmp_path_factory.mktemp("chatml")
    folder = save_tiny_model("llama", root / "tiny-chatml", chat="chatml")
    return {"folder": folder, "root": root,
            "chats": write_jsonl(root / "chats.jsonl", story_chats(40))}


def chat_data(folder: Path, train: Path, **kwargs) -> PromptCompletion:
    data = PromptCompletion(str(train), tokenizer={"path": str(folder / "tokenizer.json")},
                            **kwargs)
    data.setup(None)
    return data


def test_chat_rows_score_every_assistant_turn(chat_model):
    """A batch of chats scores exactly the assistant replies and their <|im_end|>: the labels
    under the loss mask decode to the replies, one <|im_end|> per turn."""
    data = chat_data(chat_model["folder"], chat_model["chats"], val_fraction=0.25)
    tok = data.tokenizer
    end = tok.token_to_id("<|im_end|>")
    assert len(data.train[0]) == 30 and len(data.val[0]) == 10
    replies = {"".join(m["content"] for m in c["messages"] if m["role"] == "assistant"): c
               for c in story_chats(40)}
    seen = 0
    for batch in data.val_batches(Batching(batch_size=4)):
        labels, mask = np.array(batch["labels"]), np.array(batch["loss_mask"])
        for r in range(len(labels)):
            scored = labels[r][mask[r] == 1]
            chat = replies[tok.decode(scored.tolist(), skip_special_tokens=True)]
            turns = sum(m["role"] == "assistant" for m in chat["messages"])
            assert (scored == end).sum() == turns and scored[-1] == end
            seen += 1
    assert seen == 10


def test_masked_loss_equals_a_hand_computation(chat_model, tmp_path):
    """One two-turn chat: the text written out by hand is the template's; its ids are the
    pieces' ids; the mean cross-entropy over the assistant tokens (replies + <|im_end|>), from
    the model's logits in float64, is the training loss."""
    system, q1, a1, q2, a2 = ("Be kind.", "Who is Tim?", "Tim is a dog.", "And Sue?",
                              "Sue is his friend.")
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q1},
                         {"role": "assistant", "content": a1}, {"role": "user", "content": q2},
                         {"role": "assistant", "content": a2}]}
    pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q1}<|im_end|>\n"
               "<|im_start|>assistant\n", False), (f"{a1}<|im_end|>", True),
              (f"\n<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n", False),
              (f"{a2}<|im_end|>", True), ("\n", False)]
    folder = chat_model["folder"]
    data = chat_data(folder, chat_model["chats"],
                     val_file=str(write_jsonl(tmp_path / "one.jsonl", [chat])))
    tok = data.tokenizer
    ids, target = [], []
    for text, scored in pieces:
        piece = tok.encode(text, add_special_tokens=False).ids
        ids += piece
        target += [scored] * len(piece)
    assert data.val[0][0].tolist() == ids and data.val[1][0].tolist() == target
    assert encode_chat(tok, load_chat_template(folder), chat["messages"]).text == \
        "".join(t for t, _ in pieces)
    batch = next(data.val_batches(Batching(batch_size=1)))
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    model.eval()
    loss, aux = task_loss("lm")(model, batch)
    logits = np.array(model(mx.array([ids[:-1]])).astype(mx.float32), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    positions = [t for t in range(len(ids) - 1) if target[t + 1]]
    hand = -np.mean([logp[t, ids[t + 1]] for t in positions])
    assert int(aux["ntokens"]) == len(positions) == sum(target)
    assert abs(float(loss) - hand) < 1e-5, (float(loss), hand)


def test_too_long_rows_are_cut_or_dropped_and_counted(chat_model, caplog):
    """Chats longer than max_length are cut (their assistant tokens past the cut go) or dropped,
    as data.too_long says, with the count in the log; a cut chat whose replies all lie past the
    cut is dropped too, counted apart."""
    folder, chats = chat_model["folder"], chat_model["chats"]
    short = write_jsonl(chat_model["root"] / "short.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]}])
    full = chat_data(folder, chats, val_file=str(short), max_length=4096)
    lengths = np.array([len(r) for r in full.train[0]])
    first_scored = np.array([int(np.argmax(t[1:])) + 1 for t in full.train[1]])
    long = int((lengths > 101).sum())
    assert 0 < long < len(lengths)
    with caplog.at_level("WARNING"):
        cut = chat_data(folder, chats, val_file=str(short), max_length=100)
    assert f"{long} of 40 rows are longer than max_length=100 tokens and were cut" in caplog.text
    assert max(len(r) for r in cut.train[0]) == 101 and len(cut.train[0]) == 40
    kept = [t[: len(r)] for r, t in zip(cut.train[0], full.train[1])]
    assert all((t == k).all() for t, k in zip(cut.train[1], kept))  # the mask is cut with them
    caplog.clear()
    with caplog.at_level("WARNING"):
        dropped = chat_data(folder, chats, val_file=str(short), max_length=100, too_long="drop")
    assert f"{long} of 40 rows are longer than max_length=100 tokens and were dropped" in \
        caplog.text
    assert len(dropped.train[0]) == 40 - long and max(len(r) for r in dropped.train[0]) <= 101
    empty = int((first_scored > 30).sum())  # all replies beyond the first 31 tokens
    assert 0 < empty < 40
    caplog.clear()
    with caplog.at_level("WARNING"):
        tight = chat_data(folder, chats, val_file=str(short), max_length=30)
    assert f"{empty} of 40 rows have no token to learn" in caplog.text
    assert len(tight.train[0]) == 40 - empty
    with pytest.raises(ConfigError, match=r"chats.jsonl: no training row is left .* raise "
                                          r"data.max_length"):
        chat_data(folder, chats, val_file=str(short), max_length=8, too_long="drop")
    fits = len(full.val[0][0]) - 1  # the short chat fits, none of the others
    assert lengths.min() > fits + 1
    with pytest.raises(ConfigError, match=r"chats.jsonl: no validation row is left"):
        chat_data(folder, short, val_file=str(chats), max_length=fits, too_long="drop")
    with pytest.raises(ConfigError, match="data.too_long"):
        PromptCompletion(str(chats), too_long="shorten")


def test_formats_are_detected_per_file(chat_model, tmp_path):
    """prompt/completion and text files still train (text: every token after BOS scored); a file
    mixing formats, a chat file without a model, and a bad row are one clear error each."""
    folder = chat_model["folder"]
    pairs = Path(asset_path("tinystories/pairs.jsonl"))
    data = chat_data(folder, pairs, val_file=str(chat_model["chats"]))
    assert len(data.train[0]) == 400 and len(data.val[0]) == 40  # pairs to train, chats to check
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Tim ran."}, {"text": "Sue sat."}])
    ids, targets = chat_data(folder, text, val_file=str(text)).train
    assert targets[0].tolist() == [False] + [True] * (len(ids[0]) - 1)
    assert (ids[0][0], ids[0][-1]) == (data.tokenizer.token_to_id("<s>"),
                                       data.tokenizer.token_to_id("</s>"))
    assert data.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True) == "Tim ran."
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*story_chats(2), {"prompt": "a", "completion": "b"}])
    with pytest.raises(ConfigError, match=r"mixed.jsonl mixes formats: line 1 is chat, line 3 "
                                          r"is completions; keep one format per file"):
        chat_data(folder, mixed)
    with pytest.raises(ConfigError, match="holds chats.*model.pretrained="):
        PromptCompletion(str(chat_model["chats"])).setup(None)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: 'messages' must be a non-empty list"):
        chat_data(folder, bad)
    refused = write_jsonl(tmp_path / "refused.jsonl", story_chats(2)[::-1])  # line 2: system
    with pytest.raises(ConfigError, match=r"refused.jsonl:2: .*roles must alternate"):
        PromptCompletion(str(refused), tokenizer={"path": str(folder / "tokenizer.json")},
                         chat_template=str(write_template(tmp_path))).setup(None)


def test_a_template_file_is_the_runs(chat_model, tmp_path):
    """data.chat_template=<file>: the chats are rendered with it (ChatML with {% generation %}
    tags: the same ids and masks as the model's own ChatML) and the run folder keeps it as its
    chat_template.jinja, so an export carries the template the run trained with."""
    folder, chats = chat_model["folder"], chat_model["chats"]
    (tmp_path / "tagged.jinja").write_text(tagged(tiny.CHATML))
    (tmp_path / "run").mkdir()
    data = PromptCompletion(str(chats), tokenizer={"path": str(folder / "tokenizer.json")},
                            chat_template=str(tmp_path / "tagged.jinja"))
    data.setup(tmp_path / "run")
    own = chat_data(folder, chats)
    assert all((a == b).all() for a, b in zip(data.train[0] + data.train[1],
                                              own.train[0] + own.train[1]))
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == tagged(tiny.CHATML)


def write_template(tmp_path: Path) -> Path:
    (tmp_path / "mistral.jinja").write_text(tiny.MISTRAL)
    return tmp_path / "mistral.jinja"


def test_finetune_chat_trains_and_is_tracked(chat_model, make_cfg, tmp_path):
    """experiment=finetune_chat on the tiny ChatML Llama and 40 chats: LoRA trains, the
    assistant-token loss falls, and the run is in a real MLflow store with its metrics."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    cfg = make_cfg("experiment=finetune_chat", f"model.pretrained={chat_model['folder']}",
                   f"data.train_file={chat_model['chats']}", "data.val_fraction=0.2",
                   "trainer.max_steps=10", "trainer.eval_every_steps=5", "trainer.batch_size=8",
                   "trainer.log_every_steps=1", "optimizer.learning_rate=1e-2",
                   "callbacks.progress.enabled=false")
    metrics = train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name)
                              .experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["choice.data"] == "chat"
    assert run.data.params["data.too_long"] == "truncate"
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in val] == [5, 10] and val[-1].value == metrics["val/loss"]
    assert val[1].value < val[0].value
    train_loss = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(train_loss) == 10 and np.mean(train_loss[-3:]) < np.mean(train_loss[:3]) - 0.1
    assert (Path(cfg.paths.output_dir) / "tokenizer_config.json").is_file()  # template kept


def bad_chat_files(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """The chat files each refused below: {case: (the file, extra overrides)}."""
    mixed = write_jsonl(root / "mixed.jsonl", [*story_chats(1), {"prompt": "a",
                                                                  "completion": "b"}])
    rows = story_chats(3)
    latin1 = root / "latin1.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    latin1.write_bytes(text.encode() + b'{"messages": [{"role": "user", "content": "caf'
                       + b"\xe9" + b'"}]}\n')
    rows[1]["messages"][0]["content"] = 5
    content_int = write_jsonl(root / "content_int.jsonl", rows)
    template = Path(__file__).parent / "chat_templates" / "mistral_v0_3.jinja"
    system = write_jsonl(root / "system.jsonl", [{"messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who is Tim?"},
        {"role": "assistant", "content": "Tim is a dog."}, {"role": "user", "content": "Sue?"},
        {"role": "assistant", "content": "His friend."}]}] * 4)
    return {"mixed": (mixed, [f"hydra.run.dir={root / 'run'}"]), "latin1": (latin1, []),
            "content_int": (content_int, []),
            "system": (system, [f"data.chat_template={template}", f"hydra.run.dir={root / 'run'}"])}


@pytest.fixture(scope="module")
def bad_chats(chat_model, tmp_path_factory) -> dict[str, tuple[Path, tuple]]:
    """`mlxlab-train experiment=finetune_chat` (the training app `mlxlab train` supervises) on
    each bad chat file, in turn in one process rooted in one folder: {case: (the file, (exit
    status, stderr, the folder's names after it))}."""
    import os

    from one_process import each_in_one_process

    root = tmp_path_factory.mktemp("bad-chats")
    files = bad_chat_files(root)
    argvs = [["mlxlab-train", "experiment=finetune_chat", f"model.pretrained={chat_model['folder']}",
              f"data.train_file={path}", "tracking=none", f"paths.root_dir={root}", *extra]
             for path, extra in files.values()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = each_in_one_process(argvs, env, cwd=root, after="one_process:names_here")
    return {case: (path, result) for (case, (path, _)), result in zip(files.items(), done,
                                                                       strict=True)}


def test_a_bad_chat_file_fails_in_one_line(bad_chats):
    """`mlxlab-train experiment=finetune_chat` on a file mixing formats: exit 2 and one line
    naming the file, the lines and the fix."""
    mixed, (code, stderr, _) = bad_chats["mixed"]
    assert code == 2, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        f"mlxlab: error: {mixed} mixes formats: line 1 is chat, line 2 is completions; keep one "
        "format per file"]


@pytest.mark.parametrize("case", ["latin1", "content_int"])
def test_a_chat_file_that_cannot_render_is_one_line_and_leaves_no_run_folder(bad_chats, case):
    """A non-UTF-8 byte (otherwise a 25-line UnicodeDecodeError traceback, exit 1) and `"content":
    5` (Jinja's TypeError) fail in one line naming the file and line, exit 2, and the failed run
    leaves no empty run folder behind."""
    bad, (code, stderr, names) = bad_chats[case]
    expected = (f"{bad}:4: byte 0xe9 is not UTF-8" if case == "latin1" else
                f"{bad}:2: message 1 (user) has content 5")
    assert code == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlxlab: error: {expected}"), lines
    assert "outputs" not in names, names


def test_mlxlab_eval_names_a_task_file_that_is_not_utf8(tmp_path, capsys):
    from mlxlab.cli.eval import main

    task = tmp_path / "mc.jsonl"
    task.write_bytes(b'{"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}\n'
                     b'{"prompt": "caf\xe9", "choices": ["a", "b"], "answer": 1}\n')
    assert main([str(tmp_path / "no-model"), str(task), "--tasks", "--no-track"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlxlab eval: error: {task}:2: byte 0xe9 is not UTF-8 (invalid continuation "
                   "byte): save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"], err


def test_a_chat_whose_turns_cannot_be_placed_fails_in_one_line(bad_chats):
    """`mlxlab-train experiment=finetune_chat` with Mistral v0.3's real template
    (data.chat_template=) on this ChatML tokenizer, where [INST] is plain text, and chats with a
    system prompt: the template writes an earlier turn's prompt otherwise in the whole chat, so
    which tokens are the assistant's cannot be told: exit 2 and one line naming the chat, the
    template problem and the fix, instead of training on 'Who is Tim?[/INST]'."""
    rows, (code, stderr, _) = bad_chats["system"]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlxlab: error: {rows}:")  # its line
    assert "writes assistant turn 2 so that which tokens are the assistant's cannot be told" \
        in lines[0] and "{% generation %}" in lines[0] and "data.chat_template=" in lines[0]


def test_a_role_the_template_has_not_is_one_line_naming_file_line_and_role(chat_model, tmp_path):
    """`"role": "bot"` trained with exit 0, its row dropped under a generic warning: now the
    data names the file, the line and the role, and the roles the template takes (ChatML's:
    the standard ones; Llama 3.2's template names "ipython" too, and takes it)."""
    rows = story_chats(4)
    rows[2]["messages"][1]["role"] = "bot"
    bad = write_jsonl(tmp_path / "bot.jsonl", rows)
    with pytest.raises(ConfigError, match=re.escape(
            f"{bad}:3: message 2 has role 'bot', which the chat template does not have: use one "
            "of ['system', 'user', 'assistant', 'tool']")):
        chat_data(chat_model["folder"], bad, val_fraction=0.25)
    from mlxlab.data.chat import ChatTemplate

    llama = (Path(__file__).parent / "chat_templates" / "llama3_2.jinja").read_text()
    assert "ipython" in ChatTemplate({"default": llama}).roles


def test_rows_with_nothing_to_learn_are_counted_per_reason_with_the_first_line(
        chat_model, tmp_path, caplog):
    """Rows dropped for having no token to learn: how many for each reason, and the first one's
    line in the file (a chat without an assistant turn; one whose replies lie past the cut)."""
    rows = story_chats(8)
    rows[3]["messages"] = [m for m in rows[3]["messages"] if m["role"] != "assistant"]
    rows[5]["messages"] = [m for m in rows[5]["messages"] if m["role"] != "assistant"]
    long_prompt = " ".join(["word"] * 300)
    rows[6]["messages"] = [{"role": "user", "content": long_prompt},
                           {"role": "assistant", "content": "Yes."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level("WARNING"):
        data = chat_data(chat_model["folder"], path, val_file=str(path), max_length=200)
    assert len(data.train[0]) == 5
    assert (f"{path}: 3 of 8 rows have no token to learn and were dropped: 2 with no assistant "
            "turn (first: line 4); 1 with all of its learnt tokens past max_length=200 (first: "
            "line 7)") in caplog.text
    assert f"{path}: 1 of 8 rows are longer than max_length=200 tokens and were cut " \
           "(data.too_long=truncate; first: line 7)" in caplog.text
