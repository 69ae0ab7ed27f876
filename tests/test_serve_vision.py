"""`mlxlab serve` for vision-language models, checked with the official `openai` client: chat
requests with OpenAI's image_url parts (data: URLs) are answered as `mlxlab generate --image`
answers them, greedy token for token, for three families (SmolVLM, Qwen2.5-VL's M-RoPE,
Gemma 3's image mask) and a fine-tuned vision run; a text request after an image one is its
own; an image sent to a text model, a URL the server would fetch, or bytes that are not a
picture are OpenAI's 400 naming the part, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import openai
import pytest

from hf_helpers import save_tiny_model
from serve_helpers import serving
from vision_models import picture, tiny_vlm

pytest.importorskip("mlx_vlm", reason="the [vision] extra (in [dev], which CI installs)")

FAMILIES = ("smolvlm", "qwen2_5_vl", "gemma3")
TOKENS = 6


def data_url(seed: int) -> str:
    out = io.BytesIO()
    picture(seed).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def image_chat(seed: int, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(seed)}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from hydra.core.global_hydra import GlobalHydra

    from conftest import compose_cfg
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("serve_vision")
    found = {family: tiny_vlm(family, root / family) for family in FAMILIES}
    found["llama"] = save_tiny_model("llama", root / "tiny-llama", chat="chatml")
    for i in range(4):
        picture(i).save(root / f"{i}.png")
    rows = root / "rows.jsonl"
    rows.write_text("".join(
        f'{{"messages": [{{"role": "user", "content": [{{"type": "image", "image": "{i}.png"}}, '
        f'{{"type": "text", "text": "Which?"}}]}}, {{"role": "assistant", "content": "Number {i}."}}]}}\n'
        for i in range(4)))
    cfg = compose_cfg(root / "run", [
        "experiment=finetune_vision", f"model.pretrained={found['smolvlm']}",
        f"data.train_file={rows}", f"data.val_file={rows}", "trainer.max_steps=4",
        "trainer.eval_every_steps=4", "trainer.batch_size=2", "optimizer.learning_rate=1e-3",
        "tracking=none", "callbacks.progress.enabled=false"])
    train(cfg)
    GlobalHydra.instance().clear()
    found["run"] = Path(cfg.paths.output_dir)
    return found


@pytest.fixture(scope="module")
def server(models):
    """`mlxlab serve` of the three VLM folders, the vision run and a text model."""
    names = [*FAMILIES, "run", "llama"]
    with serving([str(models[n]) for n in names], models["llama"].parent / "serve.log",
                 dict(os.environ), wait_s=300) as base_url:
        yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def generated(source: Path, seed: int | None, tmp: Path) -> str:
    """The tokens `mlxlab generate SOURCE --chat --image` answers (greedy, TOKENS of them), as
    the server writes tokens out (mlx-lm's detokenizer: special tokens too)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlxlab.runs.generate import chat_prompt_ids, continue_ids, image_prompt
    from mlxlab.runs.named_model import load_eval_model

    model = load_eval_model(source, chat="template", purpose="generation")
    text = "What is in the picture?" if seed is not None else "Hello there"
    chat = [{"role": "user", "content": text}]
    inputs = None
    if seed is None:
        ids = chat_prompt_ids(model.tokenizer, model.template, chat)
    else:
        picture(seed).save(tmp / f"{seed}.png")
        ids, inputs = image_prompt(model.model, model.template, chat, [tmp / f"{seed}.png"])
    out = continue_ids(model.model, model.tokenizer, model.tokenizer_folder, ids, TOKENS, 0.0,
                       0, 1.0, 0, inputs)
    detokenizer = load_tokenizer(model.tokenizer_folder).detokenizer
    for token in out:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def ask(client: openai.OpenAI, model: Path, messages: list[dict]) -> str:
    return answer(client, model, messages)[0]


def answer(client: openai.OpenAI, model: Path, messages: list[dict]) -> tuple[str, list[float]]:
    """The greedy reply's text and its tokens' log-probabilities."""
    choice = client.chat.completions.create(model=str(model), messages=messages,
                                            max_tokens=TOKENS, temperature=0,
                                            logprobs=True).choices[0]
    return choice.message.content or "", [t.logprob for t in choice.logprobs.content]


@pytest.mark.parametrize("name", [*FAMILIES, "run"])
def test_an_image_chat_is_answered_as_generate_answers_it(server, models, name, tmp_path):
    seen = answer(server, models[name], image_chat(1))
    assert seen[0] == generated(models[name], 1, tmp_path)
    assert seen[1] and seen != answer(server, models[name], image_chat(2))  # the picture counts


def test_a_text_chat_after_an_image_chat_is_its_own(server, models, tmp_path):
    """Qwen's M-RoPE positions of the image prompt do not carry into the next request."""
    qwen = models["qwen2_5_vl"]
    ask(server, qwen, image_chat(3))
    text = ask(server, qwen, [{"role": "user", "content": "Hello there"}])
    assert text == generated(qwen, None, tmp_path)


def test_bad_image_parts_are_400_naming_the_part_and_the_server_keeps_serving(server, models):
    image = image_chat(0)[0]["content"][0]
    cases = {
        "llama": ([image], "is a text model and reads no images"),
        "smolvlm": ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}],
                    "fetches no URL"),
        "qwen2_5_vl": ([{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()}}],
            "cannot be read"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(openai.BadRequestError, match=message) as err:
            ask(server, models[name], [{"role": "user", "content": content}])
        assert "messages" in str(err.value)
    assert ask(server, models["smolvlm"], image_chat(1))  # still serving


def test_a_vision_language_model_is_served_without_a_draft(models, capsys):
    from mlxlab.cli.main import main

    draft = save_tiny_model("llama", models["llama"].parent / "draft", seed=1,
                            num_hidden_layers=1)
    assert main(["serve", str(models["smolvlm"]), "--draft", str(draft), "--port", "0"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a vision-language model is served without a draft" in last, last
