"""`mlxlab serve --draft`: speculative decoding per served model, checked with the official
`openai` client. One server serves a tiny random Llama with a one-block draft of its tokenizer
and a copy of the same Llama without one: greedy answers (completions, chats, streamed, at any
num_draft_tokens) are the same token for token, also when a request resumes from the prompt
cache a drafted answer left (its entry stored under the tokens its caches hold). A bad pair (another tokenizer, a draft not
smaller than its model, a cache that cannot be rolled back, a draft naming no served model) is
one line, exit 2, before the port is bound."""

from __future__ import annotations

import os
import shutil
import threading

import openai
import pytest

from hf_helpers import save_tiny_model
from mlxlab.cli.main import main
from serve_helpers import serving

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me about a dog"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve_draft")
    target = save_tiny_model("llama", root / "target", seed=0, chat="chatml",
                             num_hidden_layers=4)
    alone = root / "alone"  # the same model, served without a draft
    shutil.copytree(target, alone)
    draft = save_tiny_model("llama", root / "draft", seed=1, chat="chatml", num_hidden_layers=1)
    return {"root": root, "target": target, "alone": alone, "draft": draft}


@pytest.fixture(scope="module")
def client(models):
    """`mlxlab serve TARGET ALONE --draft TARGET=DRAFT --port 0`, stopped with SIGTERM."""
    args = [str(models["target"]), str(models["alone"]), "--draft",
            f"{models['target']}={models['draft']}", "--num-draft-tokens", "3"]
    log = models["root"] / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MLXLAB_API_KEY"}
    with serving(args, log, env) as base_url:
        assert f"<- {models['target']} (draft: {models['draft']})" in log.read_text()
        yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def both(client, models, make) -> tuple:
    """What the drafted model and the same model alone answer to one request."""
    return tuple(make(str(models[k])) for k in ("target", "alone"))


def test_greedy_answers_equal_the_model_alone(client, models):
    drafted, alone = both(client, models, lambda m: client.completions.create(
        model=m, prompt=PROMPT, max_tokens=32, temperature=0))
    assert drafted.choices[0].text == alone.choices[0].text
    assert drafted.usage.completion_tokens == alone.usage.completion_tokens == 32
    drafted, alone = both(client, models, lambda m: client.chat.completions.create(
        model=m, messages=CHAT, max_tokens=32, temperature=0).choices[0].message.content)
    assert drafted == alone and drafted


def test_streamed_and_at_any_draft_length_the_same_text(client, models):
    alone = client.completions.create(model=str(models["alone"]), prompt=PROMPT, max_tokens=24,
                                      temperature=0).choices[0].text
    for k in (1, 5):
        got = client.completions.create(model=str(models["target"]), prompt=PROMPT,
                                        max_tokens=24, temperature=0,
                                        extra_body={"num_draft_tokens": k}).choices[0].text
        assert got == alone, k
    stream = client.completions.create(model=str(models["target"]), prompt=PROMPT,
                                       max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == alone


def test_draft_fields_a_request_cannot_use_are_refused(client, models):
    cases = [(str(models["alone"]), {"num_draft_tokens": 2}, "served without a draft"),
             (str(models["target"]), {"num_draft_tokens": 0}, "whole number >= 1"),
             (str(models["target"]), {"draft_model": str(models["draft"])},
              "chosen when the server starts")]
    for model, extra, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body=extra)
        assert words in err.value.message, err.value.message
        assert err.value.body["param"] == next(iter(extra))
    assert client.completions.create(model=str(models["alone"]), prompt=PROMPT,
                                     max_tokens=4).choices[0].text  # still serving


def test_the_served_draft_is_what_decodes(models):
    """In process: the draft attached to the served model is the one mlx-lm's speculative
    decoding runs (its cache is made for each request), the model alone never makes one."""
    from mlxlab.serving.openai.served import attach_draft, load_served, resolve_target
    from mlxlab.serving.openai.server import make_server, serve_until_stopped

    drafted, alone = load_served([resolve_target(str(models[k])) for k in ("target", "alone")])
    attach_draft(drafted, resolve_target(str(models["draft"])))
    assert alone.draft is None and drafted.draft is not None
    made = []
    real = drafted.draft.make_cache
    drafted.draft.make_cache = lambda: made.append(1) or real()
    server, generator = make_server([drafted, alone], port=0)
    thread = threading.Thread(target=serve_until_stopped, args=(server, generator), daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                               api_key="unused", max_retries=0, timeout=120)
        client.completions.create(model=alone.name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert not made
        client.completions.create(model=drafted.name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert made
    finally:
        server.shutdown()
        thread.join(timeout=60)


def test_bad_pairs_are_one_line_before_the_port_is_bound(models, capsys):
    root, target, alone, draft = (models[k] for k in ("root", "target", "alone", "draft"))
    other = save_tiny_model("qwen2", root / "other", seed=0, num_hidden_layers=1)
    # LFM2's convolution blocks keep a state, not a cache of tokens a draft's miss could trim
    hybrid = save_tiny_model("lfm2", root / "hybrid", seed=0)
    hybrid_draft = save_tiny_model("lfm2", root / "hybrid_draft", seed=0, block_ff_dim=32)
    cases = {
        "tokenizer is not the model's": [target, "--draft", other],
        "is not smaller than the model": [target, "--draft", alone],
        "cannot be rolled back": [hybrid, "--draft", hybrid_draft],
        "name the served model it drafts for": [target, alone, "--draft", draft],
        "given two drafts": [target, "--draft", f"{target}={draft}", "--draft",
                             f"{target}={alone}"],
        "no such run folder": [target, "--draft", root / "nope"],
        "--num-draft-tokens must be >= 1": [target, "--draft", draft, "--num-draft-tokens", "0"],
    }
    for expected, args in cases.items():
        assert main(["serve", *map(str, args), "--port", "0"]) == 2, args
        out, err = capsys.readouterr()
        assert "serving" not in out, out  # never bound
        last = err.strip().splitlines()[-1]
        assert last.startswith("mlxlab serve: error: ") and expected in last, last
    # the pair's names are in the line when several models are served
    assert main(["serve", str(alone), str(target), "--draft", f"{target}={other}",
                 "--port", "0"]) == 2
    assert f"--draft {target}={other}: the draft's tokenizer" in capsys.readouterr().err
