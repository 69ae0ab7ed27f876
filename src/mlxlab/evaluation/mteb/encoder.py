"""mteb's encoder over an mlxlab text embedder: `MlxlabEncoder` is an `mteb.models.abs_encoder.AbsEncoder`
(mteb's base for model wrappers: its prompt lookup and similarity functions), whose `encode`
runs mlxlab's TextEmbedder (models/embedders/sentence_folder.py) on the texts mteb's data loader
yields.

Prompts follow sentence-transformers' wrapper in mteb: the folder's named prompts
(config_sentence_transformers.json) are the model's prompts, mteb picks one by task and by query
or document, and without one the folder's default prompt applies. Similarity is the folder's
similarity_fn_name (cosine unless it says dot), as sentence-transformers scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from mlxlab.errors import ConfigError
from mlxlab.models.embedders.sentence_folder import TextEmbedder

SIMILARITIES = {"cosine": ScoringFunction.COSINE, "dot": ScoringFunction.DOT_PRODUCT}


def similarity_of(folder: Path) -> ScoringFunction:
    """The folder's similarity_fn_name (config_sentence_transformers.json; default cosine)."""
    file = folder / "config_sentence_transformers.json"
    name = (json.loads(file.read_text(encoding="utf-8")).get("similarity_fn_name")
            if file.is_file() else None) or "cosine"
    if name not in SIMILARITIES:
        raise ConfigError(f"{file}: similarity_fn_name {name!r}; mlxlab scores MTEB tasks with "
                          f"{', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]


class MlxlabEncoder(AbsEncoder):
    """mteb's view of a TextEmbedder (`name`: what mteb's results call the model)."""

    def __init__(self, embedder: TextEmbedder, name: str | None = None) -> None:
        self.model = embedder
        self.model_prompts = dict(embedder.prompts) or None
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name or f"mlxlab/{embedder.folder.name}",
            "embed_dim": embedder.dimension, "max_tokens": embedder.max_length,
            "similarity_fn_name": similarity_of(embedder.folder), "modalities": ["text"]})

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        """(texts, dim) float32 vectors of every text the loader's batches hold, in order."""
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = self.get_prompt_name(task_metadata, prompt_type) if self.model_prompts else None
        return self.model.encode(texts, int(kwargs.get("batch_size") or 32), prompt_name=prompt)
