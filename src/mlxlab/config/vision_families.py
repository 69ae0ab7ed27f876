"""The vision-language families mlxlab trains, one row each, keyed by config.json's
`model_type`: how the family's processor lays out its pixel arrays (and so how a batch joins
them), whether a text-only row may sit in a batch with images, and the family's other ways
(its attention mask over image tokens, its image scale, its M-RoPE positions, its image-grid
tokens, the hub's weight names, what transformers reads to find the image tokens). Every
vision file reads this table rather than asking `model_type` itself or guessing from shapes.

Pixel layouts (`pixels`):
- "images": one array of all the batch's images, images first (N_images, C, H, W), in row
  order; a row without images adds none (Gemma 3, LLaVA, PaliGemma);
- "rows": a per-row axis, (rows, images, C, H, W), padded with empty (all-zero) images to the
  batch's most, which the family drops (SmolVLM / Idefics3, and its pixel_attention_mask);
- "patches": all images' patches flattened one after another, (patches, dim), with a grid a
  row in `image_grid_thw` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxlab.errors import ConfigError

LAYOUTS = ("images", "rows", "patches")


def _idefics3_name(name: str) -> str:
    """mlx-vlm's Idefics3 / SmolVLM weight name -> the hub's."""
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    for mine, hub in (("language_model.", "model.text_model."),
                      ("vision_model.", "model.vision_model."), ("connector.", "model.connector.")):
        if name.startswith(mine):
            return hub + name.removeprefix(mine)
    return name


def _qwen_vl_name(name: str) -> str:
    """mlx-vlm's Qwen2.5-VL weight name -> the hub's."""
    for mine, hub in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("vision_tower.", "visual.")):
        if name.startswith(mine):
            return hub + name.removeprefix(mine)
    return name


def _gemma3_name(name: str) -> str | None:
    """mlx-vlm's Gemma 3 weight name -> the hub's (the same; the tied head is not written)."""
    return None if name == "language_model.lm_head.weight" else name


@dataclass(frozen=True)
class VisionFamily:
    """One family's row of the table (module docstring)."""

    name: str
    pixels: str  # one of LAYOUTS
    # whether a text-only row may share a batch with rows that have images (False: the
    # family's processor and model need an image in every row)
    text_rows: bool = True
    # which tokens attend to one another both ways on top of the causal mask (transformers'
    # blocks): "images" each image's tokens (Gemma 3); "prefix" the row's prefix, its images
    # and prompt, before the answer (PaliGemma, where its config asks for both ways); "" none
    blocks: str = ""
    # mlx-vlm scales image features by a top-level hidden_size the hub config lacks: the
    # language model's width stands in (Gemma 3)
    image_scale_from_text_width: bool = False
    # what mlx-vlm's M-RoPE language model keeps from the last prompt with images, forgotten
    # at each new sequence (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
    prompt_positions: tuple[str, ...] = ()
    # the family's image-grid tokens (Idefics3's <row_i_col_j>), expanded from images
    grid_tokens: bool = False
    # mlx-vlm's weight name -> the hub's (None: not written); None: no hub layout written
    hub_name: Callable[[str], str | None] | None = None
    # what transformers reads to know the image tokens (a config key naming the image token,
    # and the keyword it takes their 0/1 marks as), where its processor adds it on request
    token_types: tuple[str, str] | None = None
    # mlx-vlm's image merge takes one row; mlxlab's own batched merge stands in
    batched_merge: bool = False
    # text settings config.json may leave out (or give as transformers 5's rope_parameters)
    # read as transformers reads them, where mlx-vlm's defaults differ
    text_defaults_from_transformers: bool = False

    def transformers_token_types(self, input_ids: Any, config: dict) -> dict:
        """The 0/1 marks of the image tokens under transformers' keyword, or {}."""
        if self.token_types is None:
            return {}
        key, keyword = self.token_types
        return {keyword: (input_ids == int(config[key])).long()}


_QWEN = dict(pixels="patches", prompt_positions=("_position_ids", "_rope_deltas"))
_IDEFICS3 = dict(pixels="rows", grid_tokens=True, hub_name=_idefics3_name)
FAMILIES: dict[str, VisionFamily] = {f.name: f for f in (
    VisionFamily("smolvlm", **_IDEFICS3),
    VisionFamily("idefics3", **_IDEFICS3),
    VisionFamily("qwen2_vl", **_QWEN),
    VisionFamily("qwen2_5_vl", **_QWEN, hub_name=_qwen_vl_name,
                 token_types=("image_token_id", "mm_token_type_ids")),
    VisionFamily("qwen3_vl", **_QWEN),
    VisionFamily("gemma3", pixels="images", blocks="images",
                 image_scale_from_text_width=True, hub_name=_gemma3_name,
                 token_types=("image_token_index", "token_type_ids")),
    VisionFamily("llava", pixels="images", batched_merge=True,
                 text_defaults_from_transformers=True),
    # PaliGemma's processor refuses a row without an image (and transformers' model reads
    # its images as a prefix)
    VisionFamily("paligemma", pixels="images", text_rows=False, batched_merge=True,
                 blocks="prefix",
                 image_scale_from_text_width=True, text_defaults_from_transformers=True),
)}


def vision_family(model_type: str | None) -> VisionFamily:
    """The table's row for `model_type`, or one line naming the families it holds."""
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise ConfigError(f"model_type {model_type!r}: mlxlab batches the vision-language "
                          f"families {', '.join(FAMILIES)}; this one's pixel layout is not in "
                          "its table (config/vision_families.py)")
    return family


def family_ways(model_type: str | None) -> VisionFamily:
    """The table's row for `model_type`; a family it does not hold has none of the ways above
    (mlx-vlm's model as it is; a sequence's stored M-RoPE positions, where it keeps any, are
    forgotten at the next), and its batches are refused (vision_family)."""
    return FAMILIES.get(str(model_type)) or VisionFamily(
        str(model_type), pixels="", prompt_positions=_QWEN["prompt_positions"])
