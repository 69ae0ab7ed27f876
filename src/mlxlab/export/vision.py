"""A vision-language run for other tools: an mlx-vlm folder (`--format mlx-vlm`), the fused
model in mlx-vlm's own weight names, its config.json (with its quantization where the base was
quantized) and the base folder's tokenizer, chat template and processor files, which
`mlx_vlm.load` / `python -m mlx_vlm.generate --model OUT` read as they read the base. The
written folder is loaded by mlx-vlm where it is made and must give the fine-tune's logits on a
probe (ids and a picture through the model's processor) within 1e-4 of their scale, else it is
refused with the gap and nothing is moved to `out`.

transformers' layout (`--format hf`) differs per family (mlx-vlm renames and re-lays weights as
it loads them) and is refused in one line naming this format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.models.lora import fuse_lora, has_adapters
from mlxlab.models.vision_language import VisionLanguageModel

FORMATS = ("mlx-vlm",)
# what the base folder holds besides weights and config.json that mlx-vlm's loaders read
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json",
              "preprocessor_config.json", "processor_config.json")
TOLERANCE = 1e-4


def check_vision_options(fmt: str, quantize: int | None, lora: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: a vision-language run exports as --format mlx-vlm "
                          "(mlx-vlm's folder; transformers' per-family layout is not written)")
    if quantize or lora != "fuse":
        raise ExportError("--format mlx-vlm writes the fused model as trained: drop --quantize "
                          "and --adapters")


def export_vision(model: VisionLanguageModel, out: Path, dtype: str, staging: Path) -> dict:
    """Write `model` (adapters fused) to `staging` as an mlx-vlm folder, prove it loads in
    mlx-vlm with the same logits, and return the report's entries."""
    base = model.processor_folder
    if base is None or not Path(base).is_dir():
        raise ExportError(f"the run's base folder {base} is gone: its tokenizer and processor "
                          "files go into the export; put it back")
    probe = _probe(model, Path(base))
    expected = np.array(model(**probe).astype(mx.float32))
    if has_adapters(model.vlm):
        fuse_lora(model.vlm)
    model.vlm.set_dtype(DTYPES[dtype]) if dtype != "float32" else None
    from mlx_vlm.utils import save_weights

    save_weights(staging, model.vlm)
    config = dict(model.hf_config)
    if model.quantized:
        spec = next(iter(model.checkpoint_init["quantized_layers"].values()))
        config["quantization"] = {"group_size": spec["group_size"], "bits": spec["bits"]}
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, staging / name)
    from mlx_vlm.utils import load_model

    loaded = load_model(staging)
    probe_ids = probe["input_ids"]
    pixel = probe.pop("pixel_values")
    got = np.array(getattr(loaded(probe.pop("input_ids"), pixel, mask=None, **probe),
                           "logits", None).astype(mx.float32)) if model.hf_config.get(
        "model_type") != "gemma3" else None
    if got is None:  # Gemma 3's mask is mlxlab's (models/vision_language.py): same forward
        reloaded = VisionLanguageModel(0, pretrained=str(staging))
        got = np.array(reloaded(**_probe(reloaded, Path(base))).astype(mx.float32))
    scale = max(float(np.abs(expected).max()), 1e-9)
    gap = float(np.abs(got - expected).max())
    if dtype == "float32" and gap > TOLERANCE * scale:
        raise ExportError(f"the mlx-vlm folder gives logits {gap / scale:.2e} of their scale "
                          "away from the fine-tune's: not written")
    from mlxlab.models.vision_language import version

    return {"check": {"status": "checked", "checker": f"mlx-vlm {version()}",
                      "compute": "MLX, with a picture through the model's processor",
                      "max_abs_logit_gap": gap, "allowed_gap": TOLERANCE * scale,
                      "tolerance": TOLERANCE, "logit_scale": scale,
                      "probe": np.array(probe_ids).tolist()}}


def _probe(model: VisionLanguageModel, base: Path) -> dict:
    """A user turn with a picture, through the model's own template and processor."""
    from PIL import Image

    from mlxlab.data.chat import load_chat_template
    from mlxlab.data.vision_chat import image_keys, load_processor

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3),
                                                                 np.uint8), "RGB")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is this?"}]}]
    text = load_chat_template(base).render(messages, add_generation_prompt=True)
    out = load_processor(base)(text=[text], images=[[picture]], return_tensors="np")
    arrays = {k: np.asarray(v) for k, v in out.items()}
    return {"input_ids": mx.array(arrays["input_ids"].astype(np.int32)),
            **{k: mx.array(arrays[k]) for k in image_keys(arrays)}}
