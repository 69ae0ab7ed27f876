"""Vision-language batches by family: a batch mixing rows with no image, one and two gives each
row the logits it has alone, for every family in mlxlab's table (SmolVLM / Idefics3,
Qwen2.5-VL, Gemma 3, LLaVA, PaliGemma at reduced real configs, random weights); a family that
cannot mix is refused in one line; LLaVA and PaliGemma equal transformers' logits."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from vision_models import picture, tiny_vlm

pytest.importorskip("mlx_vlm", reason="the [vision] extra (mlx-vlm), which [dev] installs")

FAMILIES = ("smolvlm", "qwen2_5_vl", "gemma3", "llava", "paligemma")
# each family's user text with n image placeholders, as its chat template (or, for PaliGemma,
# its processor's prefix) lays it out
PROMPTS = {
    "smolvlm": lambda n, q: f"<|im_start|>User:{'<image>' * n}{q}<end_of_utterance>\nAssistant:",
    "qwen2_5_vl": lambda n, q: ("<|im_start|>user\n" + "<|vision_start|><|image_pad|>"
                                "<|vision_end|>" * n + f"{q}<|im_end|>\n<|im_start|>assistant\n"),
    "gemma3": lambda n, q: f"<bos><start_of_turn>user\n{'<start_of_image>' * n}{q}"
                           "<end_of_turn>\n<start_of_turn>model\n",
    "llava": lambda n, q: f"USER: {'<image>' * n}\n{q} ASSISTANT:",
    "paligemma": lambda n, q: f"{'<image>' * n}{q}",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: tiny_vlm(family, root / family) for family in FAMILIES}


def _entry(processor, family: str, images: int, question: str) -> dict:
    """One row as data/vision_chat.py caches it: the processor's ids and image arrays."""
    from mlxlab.data.vision_chat import image_keys

    pictures = [picture(10 + images + i) for i in range(images)]
    out = processor(text=[PROMPTS[family](images, question)],
                    images=[pictures] if pictures else None, return_tensors="np")
    arrays = {k: np.asarray(v) for k, v in out.items()}
    return {"input_ids": arrays["input_ids"][0].astype(np.int32),
            **{k: arrays[k] for k in image_keys(arrays)}}


def _batch(entries: list[dict], family: str, pad: int) -> dict[str, mx.array]:
    from mlxlab.data.vision_chat import join_images

    width = max(len(e["input_ids"]) for e in entries)
    ids = np.full((len(entries), width), pad, np.int32)
    for row, e in enumerate(entries):
        ids[row, : len(e["input_ids"])] = e["input_ids"]
    return {"input_ids": mx.array(ids), **join_images(entries, family)}


def _logits(model, batch: dict) -> np.ndarray:
    return np.array(model(batch.pop("input_ids"), **batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_batch_gives_each_row_its_own_logits(folders, family):
    """Rows with 0, 1 and 2 images in one batch: each row's logits are those of the row alone
    (a batch of one), for every family; a family whose rows all need images (PaliGemma) takes
    rows with 1 and 2 images and refuses a text-only one in one line."""
    from mlxlab.config.vision_families import vision_family
    from mlxlab.data.vision_chat import load_processor
    from mlxlab.errors import ConfigError
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    processor = load_processor(folders[family])
    pad = processor.tokenizer.pad_token_id
    model = VisionLanguageModel(0, pretrained=str(folders[family]))
    # a batch whose image rows hold one image each, and one with two: the join must not take
    # a count of images from an array's shape
    batches = [(1, 0), (2, 0, 1)] if vision_family(family).text_rows else [(1, 1), (2, 1)]
    for counts in batches:
        entries = [_entry(processor, family, n, f"Same {i}?" * (i + 1))
                   for i, n in enumerate(counts)]
        together = _logits(model, _batch(entries, family, pad))
        for row, entry in enumerate(entries):
            alone = _logits(model, _batch([entry], family, pad))[0]
            n = len(entry["input_ids"])
            gap = np.abs(together[row, :n] - alone).max() / np.abs(alone).max()
            assert gap <= 1e-4, f"{family} {counts}: row {row} differs by {gap:.2e}"
    if not vision_family(family).text_rows:
        text = {"input_ids": np.array([5, 6, 7], np.int32)}
        with pytest.raises(ConfigError, match=f"{family}.*every row"):
            _batch([entries[0], text], family, pad)


@pytest.mark.parametrize("family", ["gemma3", "llava"])
def test_text_rows_train_beside_image_rows(folders, family, tmp_path):
    """data.train_batches of a chat with an image and one without, for the images-first
    families with chat templates: the batch holds the one image (no stand-in for the text
    row), and the model reads it with each row's logits those of the row alone."""
    from mlxlab.data.batching import Batching
    from mlxlab.data.vision_chat import VisionChat
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    picture(0).save(tmp_path / "0.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                                       {"type": "text", "text": "What?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = folders[family]
    data = VisionChat(str(path), val_file=str(path), processor=str(folder),
                      tokenizer={"path": str(folder / "tokenizer.json")})
    data.setup()
    batch = next(data.train_batches(Batching(batch_size=2), 0))
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    model = VisionLanguageModel(0, pretrained=str(folder))
    logits = np.array(model(batch["input_ids"], pixel_values=batch["pixel_values"]))
    order = np.array(batch["index"]).tolist()
    for row, i in enumerate(order):
        ids = data.train[0][i][:-1][None]
        alone = np.array(model(mx.array(ids), **({"pixel_values": batch["pixel_values"]}
                                                 if i == 0 else {})))[0]
        gap = np.abs(logits[row, : ids.shape[1]] - alone).max() / np.abs(alone).max()
        assert gap <= 1e-4, f"{family}: row {i} differs by {gap:.2e}"


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_logits_equal_transformers(folders, family):
    """mlxlab's forward against transformers' on the same ids and pixels, to 1e-4 of the
    logits' scale (the other families' test: tests/test_vision.py)."""
    import torch
    import transformers

    from mlxlab.config.vision_families import vision_family
    from mlxlab.data.vision_chat import load_processor
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    entry = _entry(load_processor(folders[family]), family, 1, "What is it?")
    ids = entry["input_ids"][None]
    model = VisionLanguageModel(0, pretrained=str(folders[family]))
    ours = np.array(model(mx.array(ids), pixel_values=mx.array(entry["pixel_values"])))
    reference = transformers.AutoModelForImageTextToText.from_pretrained(
        folders[family], dtype=torch.float32).eval()
    kwargs = {"input_ids": torch.tensor(ids).long(),
              "pixel_values": torch.tensor(entry["pixel_values"])}
    kwargs.update(vision_family(family).transformers_token_types(torch.tensor(ids).long(),
                                                                 reference.config.to_dict()))
    with torch.no_grad():
        theirs = reference(**kwargs).logits.numpy()
    gap = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert gap <= 1e-4, f"{family}: logits differ by {gap:.2e} of their scale"


def test_paligemmas_answer_is_causal_under_its_token_types(folders):
    """PaliGemma's prefix (its image and prompt, token type 0) attends both ways and its answer
    (token type 1) causally, as transformers' does under the same token types: an answer token
    changes no logit before it, and the logits equal transformers'."""
    import torch
    import transformers

    from mlxlab.data.vision_chat import load_processor
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    folder = folders["paligemma"]
    entry = _entry(load_processor(folder), "paligemma", 1, "What is it? A cat.")
    ids = entry["input_ids"][None]
    types = (np.arange(ids.shape[1]) >= ids.shape[1] - 3)[None].astype(np.int32)
    changed = ids.copy()
    changed[0, -1] = 7
    model = VisionLanguageModel(0, pretrained=str(folder))
    pixels = mx.array(entry["pixel_values"])
    ours, other = (np.array(model(mx.array(x), pixel_values=pixels,
                                  token_type_ids=mx.array(types))) for x in (ids, changed))
    assert np.array_equal(ours[0, :-1], other[0, :-1])
    reference = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids).long(),
                           pixel_values=torch.tensor(entry["pixel_values"]),
                           token_type_ids=torch.tensor(types).long()).logits.numpy()
    gap = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert gap <= 1e-4, f"paligemma with token types: logits differ by {gap:.2e}"


def test_prefix_types_start_at_the_first_trained_token():
    from mlxlab.data.vision_chat import prefix_types

    targets = [np.array([0, 0, 0, 1, 1, 0], bool), np.array([0, 1, 1], bool)]
    assert np.array(prefix_types(targets, 5)).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]


def test_a_text_only_row_for_paligemma_and_an_unknown_family_are_one_line(folders, tmp_path):
    """PaliGemma's rows all need an image: a text-only row is refused at setup, naming its
    line, the family and the way out; a family not in the table is refused by name."""
    from mlxlab.config.vision_families import vision_family
    from mlxlab.data.vision_chat import VisionChat
    from mlxlab.errors import ConfigError

    picture(0).save(tmp_path / "0.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "0.png"},
                                                       {"type": "text", "text": "caption"}]},
                          {"role": "assistant", "content": "A dog."}]},
            {"messages": [{"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hi."}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = folders["paligemma"]
    data = VisionChat(str(path), val_file=str(path), processor=str(folder),
                      tokenizer={"path": str(folder / "tokenizer.json")})
    with pytest.raises(ConfigError, match=r"rows.jsonl:2: paligemma: every row needs an image.*"
                                          "separate run"):
        data.setup()
    with pytest.raises(ConfigError, match="'mistral3'.*pixel layout"):
        vision_family("mistral3")


def test_a_llava_mlx_vlm_export_loads_in_mlx_vlm_with_mlxlabs_logits(folders, tmp_path):
    """LLaVA exported as an mlx-vlm folder: mlx-vlm's own loader and forward give mlxlab's
    logits (its config.json holds the rope base where mlx-vlm reads it)."""
    from mlxlab.export import vision
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    model = VisionLanguageModel(0, pretrained=str(folders["llava"]))
    check = vision.export_vision(model, tmp_path, "float32", tmp_path)["check"]
    assert check["status"] == "checked"
    assert check["max_abs_logit_gap"] <= check["allowed_gap"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["text_config"]["rope_theta"] == 1e6
