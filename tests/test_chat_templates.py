"""The real chat templates of the architectures mlxlab loads (tests/chat_templates: Llama 3.2,
Mistral v0.3, Qwen3, Gemma 3, Phi-3.5, SmolLM2, and Gemma 3 with TRL's {% generation %} tags) on
tokenizer folders built locally in their styles (tests/chat_fixtures.py): the rendered text and
ids equal transformers' apply_chat_template; the assistant mask is exactly each reply and its
end-of-turn token, written out by hand below (or, with {% generation %} tags, transformers'
return_assistant_tokens_mask); a turn that cannot be placed is refused; the end tokens are the
model folder's and the template's, for training and for generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from chat_fixtures import (
    REPLIES,
    STYLES,
    SYSTEM,
    TEMPLATES,
    TOOLS,
    TURNS,
    WITH_TOOLS,
    base_tokenizer,
    save_style,
)
from hf_helpers import save_tiny_model
from mlxlab.data.chat import encode_chat, load_chat_template, stop_ids
from mlxlab.data.completions import PromptCompletion
from mlxlab.data.streaming.tokenizing import special_ids as streaming_ids
from mlxlab.data.tokenizer import build_tokenizer, end_of_text_ids, model_end_tokens, special_ids
from mlxlab.errors import ConfigError
from mlxlab.evaluation.scoring import Prompts, greedy_ids

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root, base = tmp_path_factory.mktemp("templates"), base_tokenizer()
    return {style: save_style(style, root / style, base) for style in STYLES}


def ours(folder, messages, **kwargs):
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return encode_chat(tok, load_chat_template(folder), messages, **kwargs)


def theirs(folder, messages, **kwargs) -> tuple[str, list[int]]:
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return text, list(ids["input_ids"])


def assert_mask_is(folder, chat, replies: list[str]) -> None:
    """The spans are the replies written out by hand, and the masked tokens are exactly theirs:
    the mask decodes to the replies, each turn (`turns`) to its own."""
    assert [chat.text[a:b] for a, b in chat.spans] == replies
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    decode = lambda ids: tok.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    assert decode(chat.ids[chat.assistant_mask]) == "".join(replies)
    for k, reply in enumerate(replies):
        assert decode(chat.ids[chat.turns == k]) == reply


@pytest.mark.parametrize("style", list(STYLES))
def test_text_and_ids_equal_transformers(folders, style):
    """One turn, a system turn and two exchanges, a chat ending on the user; with and without
    the generation prompt; with tools where the template writes them: the same text and ids as
    transformers' apply_chat_template."""
    chats = [(TURNS[:2], None), ([SYSTEM, *TURNS], None), ([SYSTEM, *TURNS[:3]], None)]
    if style in WITH_TOOLS:
        chats += [(TURNS, TOOLS), ([SYSTEM, *TURNS[:3]], TOOLS)]
    for messages, tools in chats:
        for prompt in (False, True):
            chat = ours(folders[style], messages, tools=tools, add_generation_prompt=prompt)
            assert (chat.text, chat.ids.tolist()) == theirs(
                folders[style], messages, tools=tools, add_generation_prompt=prompt)


@pytest.mark.parametrize("style", list(STYLES))
def test_the_mask_is_each_reply_and_its_end_of_turn(folders, style):
    """System + two exchanges (and, with tools, the same turns): the mask is each reply with its
    end-of-turn token and nothing else. Mistral v0.3 writes the system prompt and the tools onto
    the last user turn, so an earlier turn's generation prompt does not match the whole chat:
    its turns are still exactly the replies, not 'Who is Tim?[/INST] Tim ...'."""
    folder = folders[style]
    assert_mask_is(folder, ours(folder, [SYSTEM, *TURNS]), REPLIES[style])
    if style in WITH_TOOLS:
        assert_mask_is(folder, ours(folder, TURNS, tools=TOOLS), REPLIES[style])


def test_generation_tags_mask_equals_transformers(folders):
    """A template with {% generation %} tags (TRL's Gemma 3 training template) marks the
    assistant tokens itself: the same mask as transformers' return_assistant_tokens_mask."""
    folder = folders["gemma3-tagged"]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in (TURNS[:2], [SYSTEM, *TURNS]):
        out = hf.apply_chat_template(messages, return_dict=True,
                                     return_assistant_tokens_mask=True)
        chat = ours(folder, messages)
        assert chat.ids.tolist() == list(out["input_ids"])
        assert chat.assistant_mask.astype(int).tolist() == list(out["assistant_masks"])


TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "call00001", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": json.dumps({"temp": 18})},
    {"role": "assistant", "content": "It is 18 degrees."},
]


def test_tool_calls_are_the_assistants(folders):
    """A tool-call turn (no content) is the assistant's up to its end token: Mistral v0.3's
    [TOOL_CALLS] block and </s>, Qwen3's <tool_call> block and <|im_end|>; texts and ids equal
    transformers'."""
    expected = {
        "mistral-v0.3": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
                         '"id": "call00001"}]</s>', " It is 18 degrees.</s>"],
        "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                  "</tool_call><|im_end|>", "<think>\n\n</think>\n\nIt is 18 degrees.<|im_end|>"],
    }
    for style, replies in expected.items():
        chat = ours(folders[style], TOOL_CHAT, tools=TOOLS)
        assert (chat.text, chat.ids.tolist()) == theirs(folders[style], TOOL_CHAT,
                                                        tools=TOOLS)
        assert_mask_is(folders[style], chat, replies)


def test_qwen3_thinking(folders):
    """Qwen3: reasoning is written for the turns after the last user message only (an earlier
    turn reads otherwise once the chat goes on), and enable_thinking=False puts an empty
    reasoning block in the generation prompt, which is then the prompt's, not the reply's."""
    folder = folders["qwen3"]
    thought = [*TURNS[:3], {**TURNS[3], "reasoning_content": "Sue is a friend."}]
    chat = ours(folder, thought)
    assert (chat.text, chat.ids.tolist()) == theirs(folder, thought)
    assert_mask_is(folder, chat, [REPLIES["qwen3"][0], "<think>\nSue is a friend.\n</think>"
                                  "\n\n  Sue is his friend. <|im_end|>"])
    quiet = ours(folder, TURNS, enable_thinking=False)
    assert (quiet.text, quiet.ids.tolist()) == theirs(folder, TURNS, enable_thinking=False)
    assert_mask_is(folder, quiet, [REPLIES["qwen3"][0], "  Sue is his friend. <|im_end|>"])


def test_a_turn_that_cannot_be_placed_is_refused(folders):
    """Mistral v0.3's template on a tokenizer where [INST] and [/INST] are plain text (ChatML
    tokens only): with a system prompt, an earlier turn's generation prompt does not match the
    whole chat, and no control token ends the prompt to find the turn after, so the chat is
    refused with the fix, never masked over user text. Without a system prompt the prompts
    match and the replies are marked; with the model's own tokens, replies given as content
    parts (no string to mark) are found after [/INST] as the template writes them alone."""
    folder = folders["smollm2"]
    template = load_chat_template(folder, TEMPLATES / "mistral_v0_3.jinja")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"assistant turn 2 .* generation prompt does not "
                                          r"match the whole chat.*\{% generation %\}.*"
                                          r"data\.chat_template="):
        encode_chat(tok, template, [SYSTEM, *TURNS])
    assert_mask_is(folder, encode_chat(tok, template, TURNS),  # eos_token: <|im_end|>
                   [" Tim is a dog.<|im_end|>", " Sue is his friend.<|im_end|>"])
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]}
             if m["role"] == "assistant" else m for m in [SYSTEM, *TURNS]]
    chat = ours(folders["mistral-v0.3"], parts)
    assert [chat.text[a:b] for a, b in chat.spans] == [
        f" {[part]}</s>" for part in (parts[2]["content"][0], parts[4]["content"][0])]


def test_end_tokens_come_from_the_model_folder(folders, tmp_path):
    """config.json and generation_config.json eos_token_id, tokenizer_config.json eos_token:
    Gemma's <eos> and <end_of_turn> (on no fixed list), Phi-3's <|endoftext|>; the template's
    own end of turn comes first among a chat's stop tokens (Phi-3's <|end|>)."""
    gemma, phi = folders["gemma3"], folders["phi3.5"]
    assert model_end_tokens(gemma) == ["<eos>", "<end_of_turn>"]
    assert model_end_tokens(phi) == ["<|endoftext|>"]
    assert model_end_tokens(folders["phi3"]) == ["<|endoftext|>", "<|assistant|>", "<|end|>"]
    assert load_chat_template(phi).stop_tokens == ("<|end|>", "<|endoftext|>")
    assert load_chat_template(gemma).stop_tokens == ("<end_of_turn>", "<eos>")
    tok = Tokenizer.from_file(str(gemma / "tokenizer.json"))
    assert special_ids(tok, gemma)[:2] == (tok.token_to_id("<eos>"), tok.token_to_id("<pad>"))
    with pytest.raises(ConfigError, match="no end-of-text"):  # a fixed list alone refuses it
        special_ids(tok)
    streams = streaming_ids(tok, {"path": str(gemma / "tokenizer.json")})  # streamed text too
    assert (streams.eot, streams.bos) == (tok.token_to_id("<eos>"), [])
    bare = tmp_path / "bare"  # a folder naming no end-of-text its tokenizer holds: one line
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<missing>"}))
    with pytest.raises(ConfigError, match=r"bare names no end-of-text token .*eos_token_id"):
        special_ids(tok, bare)


def test_generation_stop_ids_are_the_models_own(folders, tmp_path):
    """What `mlxlab generate` and the HF export stop on (stop_ids): the template's end of turn,
    then the model's end-of-text ids: Gemma's <end_of_turn> and <eos>, Phi-3's <|end|> before
    <|endoftext|> (and its generation_config's <|assistant|>). A run folder keeps only the
    tokenizer files: the checkpoint's config.json eos_token_id counts first. A tokenizer trained
    here (no folder names an end) keeps EOT_TOKENS' <|endoftext|>."""
    def ids(folder, *tokens):
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return [tok.token_to_id(t) for t in tokens]

    gemma, phi = folders["gemma3"], folders["phi3"]
    tok = Tokenizer.from_file(str(gemma / "tokenizer.json"))
    assert stop_ids(tok, gemma) == ids(gemma, "<end_of_turn>", "<eos>")
    phi_tok = Tokenizer.from_file(str(phi / "tokenizer.json"))
    assert stop_ids(phi_tok, phi) == ids(phi, "<|end|>", "<|endoftext|>", "<|assistant|>")
    run = tmp_path / "run"  # a run folder: tokenizer.json only, the config in the checkpoint
    run.mkdir()
    (run / "tokenizer.json").write_text((gemma / "tokenizer.json").read_text())
    eos = tok.token_to_id("<eos>")
    assert end_of_text_ids(tok, run, {"eos_token_id": [eos, 10**6]}) == [eos]  # unknown id: out
    with pytest.raises(ConfigError, match="run names no end-of-text token"):
        stop_ids(tok, run)
    ours_tok = build_tokenizer(["a tiny story"] * 3, vocab_size=300, kind="bytelevel_bpe")
    plain = tmp_path / "scratch"
    plain.mkdir()
    assert stop_ids(ours_tok, plain) == [ours_tok.token_to_id("<|endoftext|>")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_gemma_folder_gives_training_rows(folders, tmp_path):
    """data=chat on a Gemma 3 tokenizer folder (no end-of-text on the old fixed list): chats are
    scored on the replies and <end_of_turn>; prompt/completion and text rows end with the
    model's <eos>."""
    folder = folders["gemma3"]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [SYSTEM, *TURNS]}] * 4)
    data = PromptCompletion(str(chats), val_file=str(chats),
                            tokenizer={"path": str(folder / "tokenizer.json")})
    data.setup(None)
    tok = data.tokenizer
    ids, target = data.train[0][0], data.train[1][0]
    assert tok.decode(ids[target].tolist(), skip_special_tokens=False) == "".join(
        REPLIES["gemma3"])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Who is Tim?",
                                                    "completion": " A dog."}] * 4)
    data = PromptCompletion(str(pairs), val_file=str(pairs),
                            tokenizer={"path": str(folder / "tokenizer.json")})
    data.setup(None)
    assert data.train[0][0][-1] == tok.token_to_id("<eos>") == data.eot_id


def test_generation_stops_at_the_templates_end_of_turn(folders, tmp_path):
    """Task prompts through a template stop generation at any of its stop tokens: Phi-3.5's
    <|end|> (not only its eos_token <|endoftext|>), Gemma's <end_of_turn> and <eos>; greedy
    decoding on a real model ends before any of them."""
    for style, first in (("phi3.5", "<|end|>"), ("gemma3", "<end_of_turn>")):
        folder = folders[style]
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        prompts = Prompts(tok, load_chat_template(folder))
        assert prompts.eot == tok.token_to_id(first)
        assert prompts.stops == {tok.token_to_id(t) for t in load_chat_template(folder).stop_tokens}
    gemma = Tokenizer.from_file(str(folders["gemma3"] / "tokenizer.json"))
    plain = Prompts(gemma)  # plain prompts (eval.chat=plain): no end-of-text on the old list
    assert plain.stops == frozenset() and plain.encode("Tim") == gemma.encode("Tim").ids
    from mlxlab.runs.named_model import load_eval_model

    source = load_eval_model(save_tiny_model("llama", tmp_path / "tiny"), chat="plain")
    prompt = source.tokenizer.encode("Tim and Sue", add_special_tokens=False).ids
    free = greedy_ids(source.model, prompt, 4, eot=-1)
    assert len(free) == 4
    stop = free.index(free[2])  # greedy decoding may repeat a token: it stops at its first
    assert greedy_ids(source.model, prompt, 4, eot={-1, free[2]}) == free[:stop]
    assert np.array_equal(greedy_ids(source.model, prompt, 4, eot=free[0]), [])
