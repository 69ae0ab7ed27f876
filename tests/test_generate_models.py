"""`mlxlab generate MODEL` on a model folder (not a run), and `--chat`: the model's own chat
template renders the turns (as transformers' apply_chat_template does), the reply ends at the
template's end of turn, and without --prompt each stdin line is the next turn of one chat."""

from __future__ import annotations

import io
import sys

import mlx.core as mx
import pytest

from hf_helpers import save_tiny_model
from mlxlab.cli.main import main
from mlxlab.evaluation.scoring import greedy_ids
from mlxlab.runs.named_model import load_eval_model

GREEDY = ["--temperature", "0", "--max-tokens", "20"]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A Qwen2.5-style chat folder whose greedy reply to the test's chat ends with <|im_end|>
    after a few tokens: the head's <|im_end|> row is 1.5x the row of the reply's fourth token,
    so the end of turn outscores it there (or earlier)."""
    folder = save_tiny_model("qwen2", tmp_path_factory.mktemp("gen") / "qwen", chat="qwen2.5",
                             tie_word_embeddings=False)
    model = load_eval_model(folder, chat="template")
    end = model.tokenizer.token_to_id("<|im_end|>")
    free = greedy_ids(model.model, hf_chat_ids(folder, system="Be kind."), 8, {-1})
    weights = mx.load(str(folder / "model.safetensors"))
    head = weights["lm_head.weight"]
    head[end] = 1.5 * head[free[3]]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def hf_chat_ids(folder, system=None, turns=("Who is Tim?",)) -> list[int]:
    """transformers' rendering of the chat with the assistant turn opened."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "system", "content": system}] if system is not None else []
    for k, text in enumerate(turns):
        chat.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy_reply(folder, ids, ends: bool = True) -> str:
    """The greedy reply up to (without) the template's end of turn, as text; `ends`: the
    reply meets <|im_end|> within the 20 tokens."""
    model = load_eval_model(folder, chat="template")
    end = model.tokenizer.token_to_id("<|im_end|>")
    free = greedy_ids(model.model, ids, 20, {-1})
    assert (end in free[1:]) == ends
    return model.tokenizer.decode(free[:free.index(end)] if ends else free,
                                  skip_special_tokens=False)


def test_chat_one_shot_renders_the_template_and_stops_at_its_end_of_turn(chat_folder, capsys):
    for system in ("Be kind.", None):  # None: the template's own default system turn
        args = ["--system", system] if system else []
        assert main(["generate", str(chat_folder), "--chat", "--prompt", "Who is Tim?",
                     *args, *GREEDY]) == 0
        out = capsys.readouterr().out
        ends = system is not None  # the head was set up on the chat with "Be kind."
        assert out == greedy_reply(chat_folder, hf_chat_ids(chat_folder, system), ends) + "\n"
    assert "You are Qwen" in load_eval_model(chat_folder, chat="template").template.render(
        [{"role": "user", "content": "x"}], add_generation_prompt=True)


def test_chat_conversation_reads_turns_from_stdin(chat_folder, capsys, monkeypatch):
    """Two lines, two turns: the second prompt holds the first reply as the assistant's turn."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Who is Tim?\nAnd Sue?\n"))
    assert main(["generate", str(chat_folder), "--chat", "--system", "Be kind.", *GREEDY]) == 0
    first, second, rest = capsys.readouterr().out.split("\n", 2)
    assert first == greedy_reply(chat_folder, hf_chat_ids(chat_folder, "Be kind."))
    turns = ("Who is Tim?", first, "And Sue?")
    assert second == greedy_reply(chat_folder, hf_chat_ids(chat_folder, "Be kind.", turns))
    assert rest == ""


def test_generate_on_a_pretrained_folder(tmp_path, capsys):
    """A model folder is a MODEL (it was 'holds no committed checkpoint'): the prompt after the
    tokenizer's BOS, greedy tokens as scoring's greedy decoding gives them."""
    folder = save_tiny_model("llama", tmp_path / "llama")
    assert main(["generate", str(folder), "--prompt", "Once upon", "--temperature", "0",
                 "--max-tokens", "6"]) == 0
    out = capsys.readouterr()
    model = load_eval_model(folder, chat="plain")
    tok = model.tokenizer
    ids = [tok.token_to_id("<s>"), *tok.encode("Once upon", add_special_tokens=False).ids]
    eos = tok.token_to_id("</s>")
    assert out.out == "Once upon" + tok.decode(greedy_ids(model.model, ids, 6, eos)) + "\n"
    assert str(folder) in out.err
    bad = {"add --chat": ["--system", "x"],
           "chat template": ["--chat", "--prompt", "x"],
           "--num-samples samples one --prompt": ["--chat", "--num-samples", "2"]}
    for expected, args in bad.items():
        assert main(["generate", str(folder), *args]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("mlxlab generate: error: ") and expected in last, last
