"""A sentence-transformers folder as a model the training loop fine-tunes (`model=
sentence_embedder`): the folder's SentenceEmbedder (embedder.py: BERT, pooling, Dense layers,
Normalize) with its weights, in full or with LoRA adapters on the encoder's attention
(model.lora). `model(input_ids, attention_mask)` is the (rows, dim) embedding the objectives of
objectives/embedding/ train. A run's end writes the best weights as a sentence-transformers
folder (`save_native`: `<run dir>/sentence_transformer/`), which sentence-transformers and
`mlxlab embed` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.lora import maybe_apply_lora
from mlxlab.models.base import Model
from mlxlab.models.embedders.embedder import SentenceEmbedder
from mlxlab.models.embedders.sentence_folder import (
    embedder_settings,
    encoder_sizes,
    load_folder_weights,
    read_modules,
)
from mlxlab.models.embedders.sentence_folder_save import save_sentence_folder
from mlxlab.models.hf import check_vocab
from mlxlab.models.sources import describe, model_folder

NATIVE_FOLDER = "sentence_transformer"  # in the run folder
LORA_DEFAULTS = {"ModernBertEncoder": ("Wqkv",), "DecoderEncoder": ("q_proj", "v_proj")}


class EmbedderModel(SentenceEmbedder, Model):
    """A trainable sentence-transformers embedder (see the module); `dropout` overrides the
    encoder's hidden dropout (null: the folder's config)."""

    def __init__(self, vocab_size: int, num_labels: int | None = None,
                 pretrained: str | None = None, revision: str | None = None,
                 dropout: float | None = None, lora: Mapping | None = None) -> None:
        if not pretrained:
            raise ConfigError("model=sentence_embedder fine-tunes a sentence-transformers "
                              "folder: set model.pretrained=<folder or hub id>")
        folder = Path(model_folder(pretrained, revision))  # a hub id at its revision
        modules = read_modules(folder)
        settings = embedder_settings(modules)
        if dropout is not None:
            check_number("model.dropout", dropout, float, 0.0)
            settings["encoder"]["dropout"] = float(dropout)
        super().__init__(**settings)
        check_vocab(vocab_size, self.encoder.vocab_size, folder)
        load_folder_weights(self, folder, modules)
        # LoRA's default layers (by the encoder's class): BERT's query and value, ModernBERT's
        # fused query-key-value, a decoder's q_proj and v_proj (mlx-lm's names)
        maybe_apply_lora(self, lora, LORA_DEFAULTS.get(type(self.encoder).__name__,
                                                       ("query", "value")))
        self.folder = folder
        self.max_seq_len = self.encoder.max_length
        self._architecture = {**settings["encoder"], "pooling": list(self.pooling),
                              "dense": len(self.dense), "normalize": self.normalize}

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """A local folder that is no sentence-transformers embedder mlxlab reads (another
        encoder family, no modules.json, ModernBERT without mlx-embeddings) is one line before
        anything is created."""
        pretrained = node.get("pretrained")
        if not pretrained:
            raise ConfigError("model.pretrained must be set: a sentence-transformers folder "
                              "(or its hub id), e.g. sentence-transformers/all-MiniLM-L6-v2")
        if describe(pretrained) == "folder":
            modules = read_modules(Path(str(pretrained)).expanduser())
            encoder_sizes(modules[0][1])

    def save_native(self, run_dir: Path) -> Path | None:
        return save_sentence_folder(self, self.folder, Path(run_dir) / NATIVE_FOLDER)
