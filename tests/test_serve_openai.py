"""`mlxlab serve` for language models: mlx-lm's OpenAI-compatible server over mlxlab's runs,
checked with the official `openai` client against the server on 127.0.0.1.

Two LoRA runs fine-tuned here from one tiny random Llama (with a ChatML template), one of them
also registered (`mlxlab register`), and the base folder itself are served by one `mlxlab
serve` process: greedy completions equal `mlxlab generate` token for token, streaming yields
the same text, the two adapters answer with their own outputs in interleaved requests, and bad
requests are OpenAI's error objects (the status, the message, the field) while the server keeps
serving. The server requires an API key (MLXLAB_API_KEY), refuses a body over its size limit
unread and a max_tokens past the model's context."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import compose_cfg
from hf_helpers import save_tiny_model
from mlxlab.config import asset_path
from mlxlab.runs.inference import complete, load_run, sample_ids
from serve_helpers import serving

PROMPT = "Once upon a time"
KEY = "test-key-0123"  # the module's server requires it (MLXLAB_API_KEY)
CONTEXT = 256  # the tiny Llama's max_position_embeddings
CHAT = [{"role": "system", "content": "You tell short stories."},
        {"role": "user", "content": "Tell me about a dog"}]


def finetune(root: Path, base: Path, rows: list[str], name: str) -> Path:
    """A LoRA run on `rows` (prompt/completion pairs), a few steps at a high rate: its
    adapters move the answers away from the base's and the other run's."""
    from mlxlab.train import train

    pairs = root / f"pairs_{name}.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    cfg = compose_cfg(root / name, [
        "experiment=finetune_completions", f"model.pretrained={base}",
        f"data.train_file={pairs}", "data.max_length=64", "tracking=none",
        "callbacks.progress.enabled=false", "trainer.max_steps=8", "trainer.eval_every_steps=8",
        "optimizer.learning_rate=1e-2", "trainer.batch_size=8"])
    train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from mlxlab.serving.registry import register_run

    root = tmp_path_factory.mktemp("serve")
    base = save_tiny_model("llama", root / "tiny-llama", chat="chatml")
    lines = Path(asset_path("tinystories/pairs.jsonl")).read_text().splitlines()
    a = finetune(root, base, lines[:24], "a")
    b = finetune(root, base, lines[24:48], "b")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    register_run(b, name="story-b", alias="champion", uri=uri)
    return {"root": root, "base": base, "a": a, "b": b, "uri": uri}


@pytest.fixture(scope="module")
def server(runs):
    """`MLXLAB_API_KEY=KEY mlxlab serve BASE A B models:/story-b@champion --port 0` (a free
    port, printed), as a user starts it; stopped with SIGTERM after the module's tests."""
    args = [str(runs["base"]), str(runs["a"]), str(runs["b"]), "models:/story-b@champion",
            "--uri", runs["uri"]]
    with serving(args, runs["root"] / "serve.log", {**os.environ, "MLXLAB_API_KEY": KEY}) \
            as base_url:
        yield openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120), \
            base_url
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        urllib.request.urlopen(f"{base_url}/health", timeout=2)


@pytest.fixture(scope="module")
def generated(runs) -> dict:
    """What `mlxlab generate --temperature 0` gives for PROMPT, per run: (text, token count)."""
    out = {}
    for key in ("a", "b"):
        run = load_run(runs[key])
        out[key] = (complete(run, PROMPT, 24, temperature=0),
                    len(list(sample_ids(run, PROMPT, 24, temperature=0))))
    return out


def test_models_lists_every_target_under_its_names(server, runs):
    client, _ = server
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == [str(runs["base"]), str(runs["a"]), str(runs["b"]),
                            "models:/story-b@champion"]
    assert listed["models:/story-b@champion"].model_extra["aliases"] == ["story-b@champion",
                                                                         "story-b"]
    assert listed[str(runs["base"])].model_extra["aliases"] == ["tiny-llama"]


def test_greedy_completion_equals_mlxlab_generate(server, runs, generated, capsys):
    from mlxlab.cli.main import main

    client, _ = server
    for key in ("a", "b"):
        answer = client.completions.create(model=str(runs[key]), prompt=PROMPT, max_tokens=24,
                                           temperature=0)
        text, count = generated[key]
        assert answer.choices[0].text == text
        assert answer.usage.completion_tokens == count
    assert generated["a"][0] != generated["b"][0]  # the adapters differ: the test has teeth
    # the verb itself (it prints the prompt, then the continuation), its main in this process
    # (test_generate runs `mlxlab generate` as a process of its own)
    capsys.readouterr()
    code = main(["generate", str(runs["a"]), "--prompt", PROMPT, "--max-tokens", "24",
                 "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert out.out == PROMPT + generated["a"][0] + "\n"


def test_the_registered_name_answers_as_its_run(server, generated):
    client, _ = server
    for name in ("models:/story-b@champion", "story-b@champion", "story-b"):
        answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=24,
                                           temperature=0)
        assert answer.choices[0].text == generated["b"][0]


def test_streaming_yields_the_same_text(server, runs, generated):
    client, _ = server
    stream = client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=24,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == generated["a"][0]
    whole = client.chat.completions.create(model=str(runs["b"]), messages=CHAT, max_tokens=20,
                                           temperature=0)
    pieces = client.chat.completions.create(model=str(runs["b"]), messages=CHAT, max_tokens=20,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0


def test_chat_prompt_is_the_models_template(server, runs):
    """The chat prompt is the model's own ChatML rendering (mlxlab's chat renderer on the run
    folder's template): the same number of prompt tokens."""
    from tokenizers import Tokenizer

    from mlxlab.data.chat import load_chat_template

    client, _ = server
    text = load_chat_template(runs["a"]).render(CHAT, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    tokenizer = Tokenizer.from_file(str(runs["a"] / "tokenizer.json"))
    answer = client.chat.completions.create(model=str(runs["a"]), messages=CHAT, max_tokens=4,
                                            temperature=0)
    assert answer.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_two_adapters_answer_their_own_in_interleaved_requests(server, runs, generated):
    client, _ = server
    order = ["a", "b"] * 4

    def ask(key: str) -> str:
        return client.completions.create(model=str(runs[key]), prompt=PROMPT, max_tokens=24,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(order)) as pool:
        answers = list(pool.map(ask, order))
    assert answers == [generated[key][0] for key in order]


def test_max_tokens_stop_and_seed_are_honoured(server, runs, generated):
    client, _ = server
    short = client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=3,
                                      temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # a stop word is matched on tokens: two whole generated tokens that encode back to
    # themselves, after at least one token
    run = load_run(runs["a"])
    ids = list(sample_ids(run, PROMPT, 24, temperature=0))
    k, stop = next((k, run.tokenizer.decode(ids[k:k + 2])) for k in range(1, len(ids) - 1)
                   if run.tokenizer.encode(run.tokenizer.decode(ids[k:k + 2]),
                                           add_special_tokens=False).ids == ids[k:k + 2]
                   and ids[k:k + 2] != ids[:2])
    cut = client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=24,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == complete(run, PROMPT, k, temperature=0)
    sampled = [client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text
               for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


BAD = {
    "unknown model": ("completions", {"model": "nope", "prompt": PROMPT}, "model"),
    "a role no template knows": (
        "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "a number as content": (
        "chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    "no messages": ("chat", {"messages": []}, "messages"),
    "an image part to a text model (its URL would be fetched)": (
        "chat", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]},
        "messages[0].content[0]"),
    "max_tokens 0": ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    "max_tokens below 0": ("chat", {"messages": CHAT, "max_tokens": -5}, "max_tokens"),
    "a prompt over the context": ("completions", {"prompt": "dog " * 400}, "prompt"),
    "messages over the context": (
        "chat", {"messages": [{"role": "user", "content": "dog " * 400}]}, "messages"),
    "an adapter path": ("completions", {"prompt": PROMPT, "extra_body": {"adapters": "/tmp"}},
                        "adapters"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_4xx_naming_the_field_and_the_server_keeps_serving(server, runs,
                                                                             generated, case):
    client, _ = server
    kind, request, field = BAD[case]
    request = {"model": str(runs["a"]), **request}
    create = client.completions.create if kind == "completions" else client.chat.completions.create
    with pytest.raises(openai.APIStatusError) as err:
        create(**request)
    # OpenAI's error object: the client's exception carries the message, the field and the type
    assert err.value.status_code == (404 if case == "unknown model" else 400)
    assert err.value.message.startswith(f"Error code: {err.value.status_code} - {field}")
    assert (err.value.param, err.value.type) == (field, "invalid_request_error"), err.value.body
    answer = client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=24,
                                       temperature=0)
    assert answer.choices[0].text == generated["a"][0]


def request(url: str, data: bytes | None = None, key: str | None = KEY,
            method: str | None = None) -> tuple[int, dict]:
    """The status and JSON answer of one request (with the server's key, unless None)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method),
                                    timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_body_that_is_not_json_or_names_no_model_is_400(server):
    _, base_url = server
    status, answer = request(f"{base_url}/completions", b'{"prompt": "hi"}')
    assert status == 400
    assert answer["error"]["message"].startswith("model: required; use one of")
    assert (answer["error"]["param"], answer["error"]["type"]) == ("model", "invalid_request_error")
    status, answer = request(f"{base_url}/completions", b"{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]


def test_an_unknown_model_or_path_is_404(server, runs):
    client, base_url = server
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=4)
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    assert "'nope' is not served here" in err.value.message
    # one model by any of its names (a run folder's path travels quoted: %2F)
    assert client.models.retrieve(str(runs["a"])).id == str(runs["a"])
    assert client.models.retrieve("story-b").id == "models:/story-b@champion"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"
    for url, data in ((f"{base_url}/nothing", None), (f"{base_url}/audio/speech", b"{}"),
                      (base_url.removesuffix("/v1") + "/", None)):
        status, answer = request(url, data)
        assert status == 404, url
        assert answer["error"]["message"].startswith("Invalid URL"), answer
        assert answer["error"]["type"] == "invalid_request_error"


def test_a_request_without_the_key_is_401(server, runs):
    _, base_url = server
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).completions.create(
            model=str(runs["a"]), prompt=PROMPT, max_tokens=2)
    assert "incorrect API key" in err.value.message and err.value.code == "invalid_api_key"
    for url, data in ((f"{base_url}/models", None), (f"{base_url}/models/story-b", None),
                      (f"{base_url}/completions", json.dumps({"model": "story-b",
                                                              "prompt": PROMPT}).encode())):
        status, answer = request(url, data, key=None)
        assert status == 401, url
        assert answer["error"]["message"].startswith("no API key"), answer
    assert request(base_url.removesuffix("/v1") + "/health", key=None) == (200, {"status": "ok"})


def test_a_body_over_the_limit_is_refused_unread_and_not_logged(server, runs):
    """The default limit (2 MiB) refuses a 5 MB prompt from its Content-Length: the answer
    comes before the body is sent at all; a malformed body is logged as a short excerpt."""
    client, base_url = server
    huge = "dog " * 1_250_000  # 5 MB
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=str(runs["a"]), prompt=huge, max_tokens=2)
    assert err.value.status_code == 413 and err.value.code == "request_too_large"
    assert "takes at most 2,097,152" in err.value.message
    host, port = urllib.parse.urlsplit(base_url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                    f"{KEY}\r\nContent-Type: application/json\r\nContent-Length: 5000000"
                    "\r\n\r\n".encode())  # and no body
        status_line = raw.makefile("rb").readline()
    assert status_line.split()[1] == b"413", status_line
    log = runs["root"] / "serve.log"
    before = log.stat().st_size
    for size in (5_000_000, 1_500_000):  # over the limit, and under it
        status, answer = request(f"{base_url}/completions", b"{" + b"x" * size)
        assert status == (413 if size > 2**21 else 400), answer
    time.sleep(0.5)
    assert log.stat().st_size - before < 2000, log.read_text()[before:before + 2000]
    assert "Invalid JSON" in answer["error"]["message"]


def test_max_tokens_past_the_context_is_refused(server, runs):
    """As OpenAI refuses it: max_tokens that the context cannot hold, alone or after the
    prompt. A request that names none gets the server's default cut to the room left."""
    client, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=str(runs["a"]), prompt=PROMPT, max_tokens=CONTEXT + 1)
    assert f"maximum context length is {CONTEXT} tokens" in err.value.message
    assert (err.value.param, err.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:  # refused once the prompt is counted
        client.chat.completions.create(model=str(runs["a"]), messages=CHAT,
                                       max_completion_tokens=CONTEXT - 5)
    assert f"maximum context length is {CONTEXT} tokens: the prompt is" in err.value.message
    assert err.value.code == "context_length_exceeded"
    from tokenizers import Tokenizer

    each = len(Tokenizer.from_file(str(runs["a"] / "tokenizer.json")).encode(
        f" {PROMPT}", add_special_tokens=False).ids)
    prompt = PROMPT + f" {PROMPT}" * ((CONTEXT - 40) // each)  # ~40 tokens of room
    long = client.completions.create(model=str(runs["a"]), prompt=prompt, temperature=0)
    assert long.usage.prompt_tokens + long.usage.completion_tokens <= CONTEXT
    if long.choices[0].finish_reason == "length":  # it ran to the end of the context
        assert long.usage.prompt_tokens + long.usage.completion_tokens == CONTEXT


def test_a_public_server_without_a_key_warns_and_the_key_comes_from_the_flag_or_variable(
        monkeypatch):
    from mlxlab.cli.serve import api_key, exposure_warning
    from mlxlab.runtime import settings

    assert "with no API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("::1", None) is None
    monkeypatch.setenv("MLXLAB_API_KEY", "from-env")
    settings.reload()
    try:
        assert (api_key(None), api_key("flag")) == ("from-env", "flag")
        with pytest.raises(ValueError, match="without spaces"):
            api_key(" ")
    finally:
        monkeypatch.delenv("MLXLAB_API_KEY")
        settings.reload()


def test_runs_from_one_base_hold_one_copy_of_it(runs):
    from mlx.utils import tree_flatten

    from mlxlab.serving.openai.served import load_served, resolve_target

    served = load_served([resolve_target(str(runs[k])) for k in ("base", "a", "b")])
    base, a, b = (dict(tree_flatten(s.model.parameters())) for s in served)
    wrapped = "lm.model.layers.0.self_attn.q_proj"
    assert a[f"{wrapped}.linear.weight"] is b[f"{wrapped}.linear.weight"] \
        is base[f"{wrapped}.weight"]
    assert a["lm.model.embed_tokens.weight"] is base["lm.model.embed_tokens.weight"]
    assert a[f"{wrapped}.lora_b"] is not b[f"{wrapped}.lora_b"]  # the adapters are their own
    own = sum(v.nbytes for k, v in b.items() if k.endswith((".lora_a", ".lora_b")))
    assert served[2].stats["shared_bytes"] == sum(v.nbytes for v in b.values()) - own


def test_settings_a_language_model_server_would_ignore_are_refused(runs, cli_env):
    from one_process import each_in_one_process

    (workers, twice) = each_in_one_process([["mlxlab", "serve", runs["a"], "--workers", "2"],
                                            ["mlxlab", "serve", runs["a"], runs["a"]]], cli_env)
    assert workers[0] == 2, workers[1]
    assert workers[1].strip().startswith("mlxlab serve: error: --workers is for a classifier")
    assert twice[0] == 2, twice[1]
    assert f"{runs['a']} is given twice" in twice[1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0"]))


def test_a_decoder_trained_here_is_served_one_request_at_a_time(tiny_lm_run):
    """mlxlab's own decoder (its tokenizer.json alone, no template) answers like `mlxlab
    generate` too; its attention takes no left-padded batch, so requests run one by one."""
    import threading

    from mlxlab.serving.openai.served import load_served, resolve_target
    from mlxlab.serving.openai.server import make_server, serve_until_stopped

    run_dir = tiny_lm_run[0]
    (served,) = load_served([resolve_target(str(run_dir))])
    assert not served.batchable
    server, generator = make_server([served], port=0)
    thread = threading.Thread(target=serve_until_stopped, args=(server, generator), daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                               api_key="unused", max_retries=0, timeout=120)
        run = load_run(run_dir)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: client.completions.create(
                model=run_dir.name, prompt=p, max_tokens=20, temperature=0).choices[0].text,
                ["Once upon a time", "The dog"]))
        assert answers == [complete(run, p, 20, temperature=0)
                           for p in ("Once upon a time", "The dog")]
    finally:
        server.shutdown()
        thread.join(timeout=60)


def test_a_registered_model_whose_run_folder_is_gone_is_served_from_the_store(runs, tmp_path):
    import shutil

    from mlxlab.decoding.generation import generate_tokens
    from mlxlab.serving.openai.served import load_served, resolve_target
    from mlxlab.serving.registry import register_run

    copy = shutil.copytree(runs["a"], tmp_path / "copy-of-a")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    register_run(copy, name="story-a", alias="champion", uri=uri)
    shutil.rmtree(copy)
    target = resolve_target("models:/story-a@champion", uri, tmp_path / "download")
    assert target.path.is_relative_to(tmp_path / "download")
    (served,) = load_served([target])
    assert served.names == ("models:/story-a@champion", "story-a@champion", "story-a")
    run = load_run(runs["a"])
    ids = list(sample_ids(run, PROMPT, 12, temperature=0))
    prompt = [*served.start_ids, *run.tokenizer.encode(PROMPT, add_special_tokens=False).ids]
    assert list(generate_tokens(served.model, prompt, temperature=0))[:len(ids)] == ids


def test_the_readme_example_runs_against_the_server(server, runs, capsys):
    """README.md's openai example, verbatim but for the port and the run folder."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Serving a fine-tune"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    assert len(code.strip().splitlines()) == 5
    _, base_url = server
    code = code.replace("http://127.0.0.1:5001/v1", base_url).replace(
        "outputs/finetune_chat/<a>", str(runs["a"])).replace('api_key="unused"',
                                                              f'api_key="{KEY}"')
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
