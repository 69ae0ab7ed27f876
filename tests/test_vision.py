"""Vision-language fine-tuning: mlx-vlm's models under mlxlab's forward equal transformers' on
the same ids and pixel values, the loss mask equals TRL's vision collation, and a real run of
experiment=finetune_vision trains, checkpoints and refuses bad input in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import MLXLAB, REPO
from vision_models import picture, tiny_vlm

pytest.importorskip("mlx_vlm", reason="the [vision] extra (mlx-vlm), which [dev] installs")

CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
# The largest |mlxlab - transformers| a family's logits may differ by, as a share of their
# largest magnitude.
TOLERANCE = {"smolvlm": 1e-4, "gemma3": 1e-4, "qwen2_5_vl": 1e-4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: tiny_vlm(family, root / family) for family in TOLERANCE}


def processed(folder: Path, messages=CHAT, images=None) -> dict[str, np.ndarray]:
    from mlxlab.data.chat import load_chat_template
    from mlxlab.data.vision_chat import load_processor

    text = load_chat_template(folder).render(messages)
    out = load_processor(folder)(text=[text], images=[images or [picture(0)]],
                                 return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def image_token_types(family: str, config, ids: np.ndarray) -> dict:
    """Where transformers reads which tokens are an image's (its processors add these on
    request): Gemma 3's mask and Qwen's M-RoPE positions; without them transformers lays the
    image tokens out as text (Qwen2.5-VL's logits then differ from the image's second token on)."""
    import torch

    if family == "gemma3":
        return {"token_type_ids": torch.tensor((ids == config.image_token_index).astype(np.int64))}
    if family == "qwen2_5_vl":
        return {"mm_token_type_ids": torch.tensor((ids == config.image_token_id).astype(np.int64))}
    return {}


@pytest.mark.parametrize("family", sorted(TOLERANCE))
def test_logits_equal_transformers(folders, family):
    import torch
    import transformers

    from mlxlab.models.vision.vision_language import VisionLanguageModel

    inputs = processed(folders[family])
    ids = inputs["input_ids"].astype(np.int32)
    model = VisionLanguageModel(0, pretrained=str(folders[family]))
    ours = np.array(model(mx.array(ids), **{k: mx.array(v) for k, v in inputs.items()
                                            if k.startswith(("pixel_", "image_"))}))
    reference = transformers.AutoModelForImageTextToText.from_pretrained(
        folders[family], dtype=torch.float32).eval()
    kwargs = {k: torch.tensor(v) for k, v in inputs.items()}
    kwargs.update(image_token_types(family, reference.config, ids))
    with torch.no_grad():
        theirs = reference(**kwargs).logits.numpy()
    gap = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert ours.shape == theirs.shape
    assert gap <= TOLERANCE[family], f"{family}: logits differ by {gap:.2e} of their scale"


@pytest.mark.parametrize("family", sorted(TOLERANCE))
def test_a_sequence_without_images_after_one_with_them_is_its_own(folders, family):
    """mlx-vlm's Qwen models keep the last images' M-RoPE positions on the language model; a
    row (or prompt) without images that follows one with them must not take those positions."""
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    inputs = processed(folders[family])
    images = {k: mx.array(v) for k, v in inputs.items() if k.startswith(("pixel_", "image_"))}
    ids = inputs["input_ids"].astype(np.int32)
    text = mx.array((np.arange(3, 3 + ids.shape[1]) % 50)[None], dtype=mx.int32)  # past the image
    fresh = VisionLanguageModel(0, pretrained=str(folders[family]))
    used = VisionLanguageModel(0, pretrained=str(folders[family]))
    used(mx.array(ids), **images)
    assert mx.array_equal(used(text), fresh(text)).item()


def _rows(folder: Path, tmp: Path, n: int = 4) -> Path:
    for i in range(n):
        picture(i).save(tmp / f"{i}.png")
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": f"{i}.png"},
                                     {"type": "text", "text": f"Picture {i}?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog." * (i + 1)}]},
        {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}
        for i in range(n)]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(folder: Path, rows: Path, **kwargs):
    from mlxlab.data.vision_chat import VisionChat

    data = VisionChat(str(rows), val_file=str(rows), processor=str(folder),
                      tokenizer={"path": str(folder / "tokenizer.json")}, **kwargs)
    data.setup()
    return data


def test_loss_mask_equals_trls_vision_collation(folders, tmp_path):
    """Every assistant turn and nothing else, image tokens never: what TRL's
    DataCollatorForVisionLanguageModeling trains with assistant_only_loss on the same rows,
    both with TRL's Gemma 3 training template (its {% generation %} tags) and transformers'
    processor on TRL's side. (Gemma's own template has no tags; mlxlab's inferred turns end at
    <end_of_turn>, where the tagged one also takes the newline after it.)"""
    import transformers
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    folder = folders["gemma3"]
    tagged = REPO / "tests" / "chat_templates" / "gemma3_training.jinja"
    data = _data(folder, _rows(folder, tmp_path), chat_template=str(tagged))
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessor.from_pretrained(folder),
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder), image_seq_length=4)
    collate = DataCollatorForVisionLanguageModeling(processor=processor,
                                                    chat_template=tagged.read_text(),
                                                    assistant_only_loss=True)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    for ids, target, row in zip(data.train[0], data.train[1], rows):
        i = int(row["messages"][0]["content"][0]["image"][0])
        out = collate([{"images": [picture(i)], "messages": [
            {**m, "content": [{"type": "image"} if c.get("type") == "image" else c
                              for c in m["content"]]} for m in row["messages"]]}])
        assert np.array_equal(ids, out["input_ids"][0].numpy())
        trl_mask = (out["labels"][0] != -100).numpy()
        assert trl_mask.sum() > 0 and np.array_equal(target, trl_mask)


def test_image_tokens_never_trained_and_batches_join_images(folders, tmp_path):
    from mlxlab.data.batching import Batching

    for family in ("smolvlm", "qwen2_5_vl"):
        folder = folders[family]
        data = _data(folder, _rows(folder, tmp_path))
        image_ids = data._image_token_ids()
        for ids, target in zip(data.train[0], data.train[1]):
            assert np.isin(ids, list(image_ids)).sum() >= 4
            assert not target[np.isin(ids, list(image_ids))].any()
            assert target.sum() > 0
        batch = next(data.train_batches(Batching(batch_size=3), 0))
        single = processed(folder)
        for key in single:
            if key.startswith(("pixel_", "image_")):
                assert key in batch
        if family == "qwen2_5_vl":  # 3 rows' patches one after another, a grid a row
            assert batch["image_grid_thw"].shape == (3, 3)
        else:  # (rows, images, C, H, W)
            assert batch["pixel_values"].shape[:2] == (3, 1)


def test_lora_modules_choose_what_trains(folders):
    from mlxlab.errors import ConfigError
    from mlxlab.models.vision.vision_language import VisionLanguageModel, trainable_summary

    folder = str(folders["smolvlm"])
    lora = {"rank": 4, "targets": ["query", "value"]}
    language = trainable_summary(VisionLanguageModel(0, pretrained=folder, lora=lora))
    assert set(language) == {"language_model"}
    every = trainable_summary(VisionLanguageModel(
        0, pretrained=folder, lora={**lora, "modules": ["language_model", "projector",
                                                        "vision_tower"]}))
    assert set(every) == {"language_model", "connector", "vision_model"}
    with pytest.raises(ConfigError, match="model.lora.modules"):
        VisionLanguageModel(0, pretrained=folder, lora={**lora, "modules": ["eyes"]})


def _train(tmp_path: Path, folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MLXLAB, "train", "experiment=finetune_vision", f"model.pretrained={folder}",
         "trainer.max_steps=4", "trainer.eval_every_steps=2", "trainer.batch_size=2",
         f"paths.root_dir={tmp_path}", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def vision_run(folders, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real `mlxlab train experiment=finetune_vision` run on the tiny SmolVLM, tracked in
    MLflow, with checkpoint.save_base=true (every weight written): (its root, the process)."""
    root = tmp_path_factory.mktemp("vision-run")
    return root, _train(root, folders["smolvlm"], "checkpoint.save_base=true")


@pytest.mark.slow  # the default run's budget: test_serve_vision trains experiment=finetune_vision
def test_finetune_vision_trains_and_checkpoints(vision_run):
    """A real run of the shipped visual task on the tiny SmolVLM, tracked in MLflow."""
    root, done = vision_run
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((root / "outputs" / "finetune_vision").iterdir())
    assert len(runs) == 1
    assert list((runs[0] / "checkpoints").glob("step_*"))
    assert "val/loss" in done.stderr + done.stdout
    assert (root / "mlruns").is_dir()


@pytest.mark.parametrize("case", [pytest.param("missing image", marks=pytest.mark.slow),
                                  pytest.param("compiled step", marks=pytest.mark.slow),
                                  "text model"])  # the slow two load the model first
def test_bad_input_is_one_line_before_a_run_folder(folders, tmp_path, case):
    folder, extra = folders["smolvlm"], []
    if case == "missing image":
        rows = tmp_path / "bad.jsonl"
        rows.write_text(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": "nowhere.png"}]},
            {"role": "assistant", "content": "x"}]}) + "\n")
        extra = [f"data.train_file={rows}", f"data.val_file={rows}"]
        expect = "nowhere.png"
    elif case == "compiled step":
        extra, expect = ["trainer.compile=true"], "trainer.compile=false"
    else:
        folder = tmp_path / "text"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        expect = "text model"
    done = _train(tmp_path, folder, *extra)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("mlxlab") and "error" in line and expect in line, done.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_5_vl"])
def test_greedy_generation_with_an_image_equals_mlx_vlms(folders, family):
    """The image prompt's prefill and the cached steps after it: the same greedy tokens as
    mlx-vlm's own generate_step on the same model and inputs."""
    from mlx_vlm.generate import generate_step

    from mlxlab.decoding.generation import generate_tokens
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    inputs = processed(folders[family], CHAT[:1])
    ids = inputs["input_ids"][0].astype(np.int32)
    images = {k: mx.array(v) for k, v in inputs.items() if k.startswith(("pixel_", "image_"))}
    model = VisionLanguageModel(0, pretrained=str(folders[family]))
    ours = [t for t, _ in zip(generate_tokens(model, ids, temperature=0, inputs=images),
                              range(8))]
    extra = {k: v for k, v in images.items() if k != "pixel_values"}
    theirs = [int(t) for t, _ in generate_step(mx.array(ids)[None], model.vlm,
                                               images["pixel_values"], None, max_tokens=8,
                                               temperature=0.0, **extra)]
    assert ours == theirs[:8]


@pytest.mark.slow  # the default run's budget: test_serve_vision reaches the same generation path
def test_generate_verb_shows_an_image(folders, tmp_path):
    picture(3).save(tmp_path / "p.png")
    args = [MLXLAB, "generate", str(folders["smolvlm"]), "--chat", "--prompt", "What?",
            "--max-tokens", "4", "--temperature", "0"]
    done = subprocess.run([*args, "--image", str(tmp_path / "p.png")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text_only = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert text_only.returncode == 0 and done.stdout != text_only.stdout  # the picture counts
    missing = subprocess.run([*args, "--image", str(tmp_path / "none.png")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "none.png" in missing.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # the default run's budget: text runs' SIGKILL resumes hold the loop's part
def test_sigkilled_vision_run_resumes_bitwise(folders, tmp_path, cli_env):
    """A vision run killed after a checkpoint and resumed ends with the uninterrupted run's
    adapters and projector, bit for bit (images, masks and the data position restored)."""
    from run_helpers import committed_steps, final_weights, kill_when, run, start

    args = ["experiment=finetune_vision", f"model.pretrained={folders['smolvlm']}",
            "model.lora.modules=[language_model,projector]", "trainer.max_steps=8",
            "trainer.eval_every_steps=4", "trainer.batch_size=4", "trainer.log_every_steps=1",
            "checkpoint.save_every_steps=2", "checkpoint.save_every_minutes=null",
            "callbacks.progress.enabled=false", "tracking=none"]
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 3 for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < 8
    resumed = tmp_path / "resumed"
    run([*args, f"resume={killed}"], resumed, cli_env)
    expected, got = final_weights(reference), final_weights(resumed)
    assert expected.keys() == got.keys() and any("connector" in k for k in got)
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key


@pytest.mark.slow  # the default run's budget: the hf layout has its own test below
def test_export_mlx_vlm_and_hf_folders_hold_the_fine_tune(folders, tmp_path):
    """A trained vision run exports as an mlx-vlm folder and as transformers' folder (adapters
    fused, each checked where it is written: the report's gap), the mlx-vlm one generating what
    the run generates; a family whose transformers layout is not written is one line."""
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import load_model

    done = _train(tmp_path, folders["smolvlm"], "tracking=none",
                  "model.lora.modules=[language_model,projector]")
    assert done.returncode == 0, done.stderr[-2000:]
    run = next((tmp_path / "outputs" / "finetune_vision").iterdir())
    for fmt in ("mlx-vlm", "hf"):
        out = tmp_path / fmt
        made = subprocess.run([MLXLAB, "export", str(run), "--format", fmt, "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-2000:]
        check = json.loads((out / "export_report.json").read_text())["check"]
        assert check["status"] == "checked" and check["max_abs_logit_gap"] <= check["allowed_gap"]
    assert not any("lora" in k for k, _ in tree_flatten(load_model(tmp_path / "mlx-vlm")
                                                        .parameters()))
    picture(5).save(tmp_path / "p.png")
    replies = [subprocess.run([MLXLAB, "generate", str(m), "--chat", "--prompt", "What?",
                               "--image", str(tmp_path / "p.png"), "--max-tokens", "6",
                               "--temperature", "0"], capture_output=True, text=True,
                              timeout=300).stdout for m in (run, tmp_path / "mlx-vlm")]
    assert replies[0] and replies[0] == replies[1]
    from mlxlab.export.hf import ExportError
    from mlxlab.export.vision import check_vision_options

    with pytest.raises(ExportError, match="paligemma; use --format mlx-vlm"):
        check_vision_options("hf", None, "fuse", "paligemma")


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_hf_export_loads_in_transformers_with_the_fine_tunes_logits(folders, family, tmp_path):
    """Adapters moved off their start (so fusing them counts), exported to the hub's layout,
    loaded by transformers' image-text-to-text class: the fine-tune's logits on a probe with a
    picture (export_vision refuses a gap over 1e-4 of their scale)."""
    from mlx.utils import tree_flatten

    from mlxlab.export.vision import export_vision
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    model = VisionLanguageModel(0, pretrained=str(folders[family]),
                                lora={"rank": 4, "targets": ["query", "value"]})
    trained = [(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.05)
               for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))]
    model.load_weights(trained, strict=False)
    check = export_vision(model, tmp_path, "float32", tmp_path, fmt="hf")["check"]
    assert check["status"] == "checked" and check["checker"].startswith("transformers")
    assert check["max_abs_logit_gap"] <= check["allowed_gap"]


def _adapted(folder: Path):
    """A LoRA vision model whose adapters moved off their start (so fusing them counts)."""
    from mlx.utils import tree_flatten

    from mlxlab.models.vision.vision_language import VisionLanguageModel

    model = VisionLanguageModel(0, pretrained=str(folder),
                                lora={"rank": 4, "targets": ["query", "value"]})
    trained = [(k, mx.random.normal(v.shape, key=mx.random.key(i)) * 0.05)
               for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))]
    model.load_weights(trained, strict=False)
    return model


def _swap_mlp(rename):
    """The hub's names with layer 0's gate and up projections swapped: a wrong layout."""
    def swapped(name: str) -> str | None:
        hub = rename(name)
        if hub is None or ".layers.0.mlp." not in hub or "vision" in hub:
            return hub
        return hub.replace("gate_proj", "@").replace("up_proj", "gate_proj").replace("@", "up_proj")
    return swapped


def test_vision_exports_are_checked_at_the_dtype_they_write(folders, tmp_path, monkeypatch):
    """A bfloat16 export (a VLM's default) is checked as a float32 one is: the right folder
    passes within 1e-4 of the logits' scale (both sides computed in float32 over the written
    weights), a wrong layout (the hub folder) or a wrong forward (the mlx-vlm folder) is
    refused, and a weight transformers finds no tensor for is refused by name."""
    import mlx_vlm.utils

    from mlxlab.export import vision
    from mlxlab.export.hf import ExportError

    for fmt in ("hf", "mlx-vlm"):
        out = tmp_path / f"right-{fmt}"
        out.mkdir()
        check = vision.export_vision(_adapted(folders["gemma3"]), out, "bfloat16", out,
                                     fmt=fmt)["check"]
        assert check["status"] == "checked"
        assert check["max_abs_logit_gap"] <= check["allowed_gap"] == 1e-4 * check["logit_scale"]
    rename = vision.HF_NAMES["gemma3"]
    monkeypatch.setitem(vision.HF_NAMES, "gemma3", _swap_mlp(rename))
    with pytest.raises(ExportError, match="refused: transformers .* other logits"):
        vision.export_vision(_adapted(folders["gemma3"]), tmp_path, "bfloat16", tmp_path,
                             fmt="hf")
    monkeypatch.setitem(vision.HF_NAMES, "gemma3", lambda name: None if ".layers.0.mlp.down"
                        in name and "vision" not in name else rename(name))
    with pytest.raises(ExportError, match=r"found no tensor for 1 weight\(s\).*down_proj"):
        vision.export_vision(_adapted(folders["gemma3"]), tmp_path, "bfloat16", tmp_path,
                             fmt="hf")
    load = mlx_vlm.utils.load_model

    def off(folder, **kwargs):
        model = load(folder, **kwargs)
        up = model.language_model.layers[0].mlp.up_proj
        up.weight = up.weight * 2
        return model
    monkeypatch.setattr(mlx_vlm.utils, "load_model", off)
    with pytest.raises(ExportError, match="refused: mlx-vlm .* other logits"):
        vision.export_vision(_adapted(folders["smolvlm"]), tmp_path, "bfloat16", tmp_path)


def test_qlora_and_dora_on_the_language_model(folders):
    """model.quantize=4 quantizes the language model's layers (the vision tower stays float)
    and adapters train on them; DoRA adapters train too; a forward with a picture runs."""
    import mlx.nn as nn

    from mlxlab.models.vision.vision_language import VisionLanguageModel, trainable_summary

    inputs = processed(folders["smolvlm"])
    ids = mx.array(inputs["input_ids"].astype(np.int32))
    images = {k: mx.array(v) for k, v in inputs.items() if k.startswith(("pixel_", "image_"))}
    for kind, quantize in (("lora", 4), ("dora", None)):
        model = VisionLanguageModel(0, pretrained=str(folders["smolvlm"]), quantize=quantize,
                                    lora={"rank": 4, "kind": kind, "targets": ["query"]})
        layers = dict(model.vlm.named_modules())
        if quantize:
            assert model.quantized and any(isinstance(m, nn.QuantizedLinear) for n, m in
                                           layers.items() if n.startswith("language_model"))
            assert not any(isinstance(m, nn.QuantizedLinear) for n, m in layers.items()
                           if n.startswith("vision_model"))
        assert set(trainable_summary(model)) == {"language_model"}
        assert np.isfinite(np.array(model(ids, **images))).all()


def test_image_references_read_and_refused_in_one_line(tmp_path):
    """Paths, file:// and data: URLs, TRL's `images` lists and OpenAI's image_url parts; a
    network URL, a count that does not match, an image in an assistant turn, an unreadable or
    oversized file are each one ConfigError naming it."""
    import base64

    from mlxlab.data.images import chat_images, open_image
    from mlxlab.errors import ConfigError

    picture(0).save(tmp_path / "a.png")
    data = "data:image/png;base64," + base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image", "image": "a.png"},
        {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'a.png'}"}},
        {"type": "image_url", "image_url": {"url": data}}, {"type": "image"},
        {"type": "text", "text": "Four?"}]}]
    rendered, refs = chat_images(messages, images=["a.png"])
    assert [p["type"] for p in rendered[0]["content"]] == ["image"] * 4 + ["text"]
    for ref in refs:
        assert open_image(ref, tmp_path).size == (64, 64)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    bad = [(lambda: open_image("http://example.com/a.png", tmp_path), "network"),
           (lambda: open_image("gone.png", tmp_path), "gone.png"),
           (lambda: open_image("bad.png", tmp_path), "bad.png cannot be read"),
           (lambda: open_image("a.png", tmp_path, max_pixels=100), "max_image_pixels"),
           (lambda: chat_images(messages, images=[]), "'images' list"),
           (lambda: chat_images([{"role": "assistant", "content": [{"type": "image",
                                                                   "image": "a.png"}]}]),
            "assistant turn")]
    for call, words in bad:
        with pytest.raises(ConfigError, match=words):
            call()


def test_rows_with_two_images_and_rows_without(folders, tmp_path):
    """Several images a row and text-only rows batch together, and the model reads the batch."""
    from mlxlab.data.batching import Batching
    from mlxlab.models.vision.vision_language import VisionLanguageModel

    for i in range(2):
        picture(i).save(tmp_path / f"{i}.png")
    rows = [{"messages": [{"role": "user", "content": [
        {"type": "image", "image": "0.png"}, {"type": "image", "image": "1.png"},
        {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for family, per_image in (("smolvlm", 4), ("qwen2_5_vl", 4)):
        data = _data(folders[family], path)
        ids = data.train[0]
        image = data.processor.tokenizer.convert_tokens_to_ids(
            "<image>" if family == "smolvlm" else "<|image_pad|>")
        assert [int((row == image).sum()) for row in ids] == [2 * per_image, 0]
        batch = next(data.train_batches(Batching(batch_size=2), 0))
        model = VisionLanguageModel(0, pretrained=str(folders[family]))
        logits = model(batch["input_ids"], **{k: v for k, v in batch.items()
                                              if k.startswith(("pixel_", "image_"))})
        assert np.isfinite(np.array(logits)).all()


def test_full_fine_tuning_and_an_unknown_family(folders, tmp_path):
    from mlxlab.errors import ConfigError
    from mlxlab.models.vision.vision_language import VisionLanguageModel, trainable_summary

    every = trainable_summary(VisionLanguageModel(0, pretrained=str(folders["smolvlm"]),
                                                  lora={"rank": 0}))
    assert set(every) == {"language_model", "connector", "vision_model"}
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "seeing_llama",
                                                 "vision_config": {}}))
    with pytest.raises(ConfigError, match="seeing_llama.*not a vision-language family"):
        VisionLanguageModel(0, pretrained=str(odd))


def test_a_4bit_mlx_vlm_folder_stays_4bit(folders, tmp_path):
    """A folder `mlx_vlm.convert -q` wrote (as mlx-community's are) loads quantized, trains
    adapters on its quantized language model, and refuses model.quantize on top and full
    fine-tuning, in a text decoder's words (the one prepare_for_training)."""
    import contextlib
    import io

    from mlx_vlm.convert import convert

    from mlxlab.errors import ConfigError
    from mlxlab.models.vision.vision_language import VisionLanguageModel, trainable_summary

    out = tmp_path / "q4"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(folders["smolvlm"]), str(out), quantize=True, q_bits=4, q_group_size=64)
    model = VisionLanguageModel(0, pretrained=str(out), lora={"rank": 4, "targets": ["query"]})
    assert model.quantized and set(trainable_summary(model)) == {"language_model"}
    inputs = processed(out)
    logits = model(mx.array(inputs["input_ids"].astype(np.int32)),
                   **{k: mx.array(v) for k, v in inputs.items() if k.startswith("pixel_")})
    assert np.isfinite(np.array(logits)).all()
    with pytest.raises(ConfigError, match="already quantized"):
        VisionLanguageModel(0, pretrained=str(out), quantize=4, lora={"rank": 4})
    with pytest.raises(ConfigError, match=r"full fine-tuning \(model.lora.rank=0\) needs a float "
                                          "base and this one is quantized"):
        VisionLanguageModel(0, pretrained=str(out), lora={"rank": 0})


def test_eval_task_with_an_image_column(folders, tmp_path):
    """A generation task whose rows show pictures is answered by a vision model as `generate
    --image` answers (greedy, same tokens); without the chat template that places the
    pictures it is refused in one line."""
    from tokenizers import Tokenizer

    from mlxlab.data.chat import load_chat_template
    from mlxlab.errors import ConfigError
    from mlxlab.evaluation.scoring import score_task
    from mlxlab.evaluation.settings import TaskSettings
    from mlxlab.evaluation.tasks import read_task
    from mlxlab.models.vision.vision_language import VisionLanguageModel
    from mlxlab.runs.generate import continue_ids, image_prompt

    folder = folders["smolvlm"]
    for i in range(3):
        picture(i).save(tmp_path / f"{i}.png")
    (tmp_path / "seen.jsonl").write_text("".join(json.dumps(
        {"image": f"{i}.png", "prompt": "What?", "answer": "x"}) + "\n" for i in range(3)))
    task = read_task(tmp_path / "seen.jsonl")
    model = VisionLanguageModel(0, pretrained=str(folder))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = load_chat_template(folder)
    scores = score_task(model, tokenizer, task, TaskSettings(max_new_tokens=5), template)
    for i, row in enumerate(scores.rows):
        ids, inputs = image_prompt(model, template, [{"role": "user", "content": "What?"}],
                                   [tmp_path / f"{i}.png"])
        expected = tokenizer.decode(list(continue_ids(model, tokenizer, folder, ids, 5, 0.0, 0,
                                                      1.0, 0, inputs)))
        assert row["output"] == expected
    with pytest.raises(ConfigError, match="vision-language model"):
        score_task(model, tokenizer, task, TaskSettings(max_new_tokens=5), None)


@pytest.mark.slow  # the default run's budget: test_adapter_checkpoints holds save_base=true
def test_a_lora_run_saved_with_its_base_loads_with_its_adapters(folders, vision_run):
    """checkpoint.save_base=true writes every weight, the adapters' included: the run loads
    (load_run_model: generate, eval, export) rebuilt from the checkpoint's config with its
    adapters, to the logits of the model it saved."""
    from mlxlab.models.vision.vision_language import VisionLanguageModel
    from mlxlab.runs import load_run_model

    root, done = vision_run
    assert done.returncode == 0, done.stderr[-3000:]
    run = next((root / "outputs" / "finetune_vision").iterdir())
    model, state = load_run_model(run)
    saved = VisionLanguageModel(0, pretrained=str(folders["smolvlm"]),
                                lora=state.config["model"]["lora"])
    saved.load_weights(str(state.path / "model.safetensors"))  # strict: every weight
    inputs = processed(folders["smolvlm"])
    ids = mx.array(inputs["input_ids"].astype(np.int32))
    pixels = {k: mx.array(v) for k, v in inputs.items() if k.startswith("pixel_")}
    assert np.array_equal(np.array(model(ids, **pixels)), np.array(saved(ids, **pixels)))
