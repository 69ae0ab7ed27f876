"""A pretrained model folder as the verbs load it to score, generate or serve: a
vision-language model (its config.json has vision settings) through mlx-vlm
(models/vision/vision_language.py), any other decoder through mlx-lm
(models/decoders/mlx_lm_decoder.py)."""

from __future__ import annotations

from pathlib import Path

from mlxlab.models.base import Model
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.hf import read_config
from mlxlab.models.vision.vision_language import VisionLanguageModel, is_vision_config


def pretrained_model(folder: str | Path, vocab_size: int = 1) -> Model:
    """The model of a local pretrained folder, frozen as it was saved."""
    if is_vision_config(read_config(Path(folder))):
        return VisionLanguageModel(vocab_size=vocab_size, pretrained=str(folder))
    return MLXLMDecoder(vocab_size=vocab_size, pretrained=str(folder))
