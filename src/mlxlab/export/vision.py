"""A vision-language run for other tools, its adapters fused:
- `--format mlx-vlm`: the model in mlx-vlm's own weight names, its config.json (with its
  quantization where the base was quantized) and the base folder's tokenizer, chat template and
  processor files, which `mlx_vlm.load` / `python -m mlx_vlm.generate --model OUT` read as they
  read the base; loaded by mlx-vlm where it is made.
- `--format hf`: the hub's layout of the families whose way back from mlx-vlm's names is written
  here (HF_NAMES: SmolVLM / Idefics3, Gemma 3, Qwen2.5-VL), float weights, the base's config.json; loaded by
  transformers' image-text-to-text class where it is made. Another family is one line.
Either way the written folder must give the fine-tune's logits on a probe (ids and a picture
through the model's processor) within 1e-4 of their scale (at least 1), else it is refused with
the gap and nothing is moved to `out`; a weight transformers finds no tensor for is refused by
name. As for a text export (export/proof.py), mlxlab's side is the model as written (fused,
cast to the export's dtype) and both sides compute in float32, so the same limit holds at
every dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.config.vision_families import FAMILIES, family_ways
from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.export.proof import (
    Checker,
    compare,
    mlxlab_logits,
    torch_logits,
    transformers_model,
)
from mlxlab.models.adapters.lora import fuse_lora, has_adapters
from mlxlab.models.vision.vision_language import VisionLanguageModel, mlx_vlm_config

FORMATS = ("mlx-vlm", "hf")
# what the base folder holds besides weights and config.json that mlx-vlm's loaders read
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "generation_config.json",
              "preprocessor_config.json", "processor_config.json")
# The gap allowed, of the logits' scale, passed to proof.compare: both sides compute in float32
# from the weights as written, so one limit holds at every export dtype (a bfloat16 folder is
# checked as strictly as a float32 one). 1e-4 rather than a text export's proof.TOLERANCE
# (1e-3, set for text types whose logits grow with the model): the vision families match
# transformers' and mlx-vlm's forwards to 3e-7 of their scale and their parity tests hold them
# to 1e-4 (tests/test_vision.py), which the written folder is held to too.
TOLERANCE = 1e-4
PICTURE = "with a picture through the model's processor"


# model_type -> (mlx-vlm's weight name -> the hub's; None: not written, a tied head): the
# families whose row in config/vision_families.py has the hub's names
HF_NAMES = {name: family.hub_name for name, family in FAMILIES.items() if family.hub_name}
# MLX's convolution weights (out, *kernel, in) -> PyTorch's (out, in, *kernel), by rank
TORCH_CONV = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
CONV_WEIGHTS = ("patch_embedding.weight", "patch_embed.proj.weight")


def check_vision_options(fmt: str, quantize: int | None, lora: str,
                         model_type: str | None = None) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: a vision-language run exports as --format mlx-vlm "
                          "(mlx-vlm's folder) or hf (transformers')")
    if fmt == "hf" and model_type not in HF_NAMES:
        raise ExportError(f"--format hf: the way back from mlx-vlm's weights to transformers' "
                          f"layout is written for {sorted(HF_NAMES)}, not {model_type}; use "
                          "--format mlx-vlm")
    if quantize or lora != "fuse":
        raise ExportError(f"--format {fmt} writes the fused model as trained: drop --quantize "
                          "and --adapters")


def export_vision(model: VisionLanguageModel, out: Path, dtype: str, staging: Path,
                  fmt: str = "mlx-vlm") -> dict:
    """Write `model` (adapters fused) to `staging` as an mlx-vlm (or transformers) folder,
    prove it loads there with the same logits, and return the report's entries."""
    if fmt == "hf":
        return _export_hf(model, dtype, staging)
    base = model.processor_folder
    if base is None or not Path(base).is_dir():
        raise ExportError(f"the run's base folder {base} is gone: its tokenizer and processor "
                          "files go into the export; put it back")
    probe = _probe(model, Path(base))
    if has_adapters(model.vlm):
        fuse_lora(model.vlm)
    model.vlm.set_dtype(DTYPES[dtype]) if dtype != "float32" else None
    from mlx_vlm.utils import save_weights

    save_weights(staging, model.vlm)
    config = mlx_vlm_config(model.hf_config)
    if model.quantized:
        spec = next(iter(model.checkpoint_init["quantized_layers"].values()))
        config["quantization"] = {"group_size": spec["group_size"], "bits": spec["bits"]}
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, staging / name)
    from mlx_vlm.utils import load_model

    expected = mlxlab_logits(model, **probe)
    if family_ways(model.hf_config.get("model_type")).blocks:
        # Gemma 3's mask is mlxlab's (models/vision/vision_language.py): the same forward
        got = mlxlab_logits(VisionLanguageModel(0, pretrained=str(staging)), **probe)
    else:
        loaded = load_model(staging)
        loaded.set_dtype(mx.float32)
        images = {k: v for k, v in probe.items() if k not in ("input_ids", "pixel_values")}
        got = np.array(loaded(probe["input_ids"], probe["pixel_values"], mask=None,
                              **images).logits.astype(mx.float32))
    from mlxlab.models.vision.vision_language import version

    return {"check": compare(expected, got, probe["input_ids"], Checker(
        f"mlx-vlm {version()}", TOLERANCE, f"MLX float32, {PICTURE}",
        "this model's forward differs in mlx-vlm's loader: its weights stay usable in mlxlab "
        "(generate, eval, serve)"))}


def _export_hf(model: VisionLanguageModel, dtype: str, staging: Path) -> dict:
    """The hub's layout (module docstring), checked in transformers."""
    base = Path(model.processor_folder or "")
    if not base.is_dir():
        raise ExportError(f"the run's base folder {base} is gone: its config, tokenizer and "
                          "processor files go into the export; put it back")
    try:
        import torch
        import transformers
    except ImportError:
        raise ExportError("--format hf is checked in transformers, which needs PyTorch here: "
                          "pip install torch, or export --format mlx-vlm") from None
    probe = _probe(model, base)
    if has_adapters(model.vlm):
        fuse_lora(model.vlm, dequantize=True)
    if model.quantized:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model.vlm)
    rename = HF_NAMES[model.hf_config.get("model_type")]
    weights = {}
    for name, value in tree_flatten(model.vlm.parameters()):
        hub = rename(name)
        if hub is None:
            continue
        if name.endswith(CONV_WEIGHTS):
            value = value.transpose(TORCH_CONV[value.ndim])
        weights[hub] = value.astype(DTYPES[dtype])
    model.vlm.set_dtype(DTYPES[dtype])  # what the check computes from: the weights as written
    mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "pt"})
    shutil.copyfile(base / "config.json", staging / "config.json")
    for name in SIDE_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, staging / name)
    expected = mlxlab_logits(model, **probe)  # the weights as written, computed in float32
    loaded = transformers_model(transformers.AutoModelForImageTextToText, staging)
    inputs = {k: torch.tensor(np.array(v)) for k, v in probe.items()}
    inputs["input_ids"] = inputs["input_ids"].long()
    inputs.update(image_token_types(model.hf_config, inputs["input_ids"]))
    got = torch_logits(loaded, inputs)
    return {"check": compare(expected, got, probe["input_ids"], Checker(
        f"transformers {transformers.__version__}", TOLERANCE, f"PyTorch float32, {PICTURE}",
        "this family's layout or forward differs in transformers: --format mlx-vlm writes "
        "mlx-vlm's folder"))}


def image_token_types(config: dict, input_ids: Any) -> dict:
    """What transformers reads to know a prompt's image tokens, which its processors add only
    on request: Gemma 3's mask (token_type_ids) and Qwen's M-RoPE positions
    (mm_token_type_ids); without them it lays the image tokens out as text."""
    return family_ways(config.get("model_type")).transformers_token_types(input_ids, config)


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
