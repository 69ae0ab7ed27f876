"""What any Hugging Face (or mlx-lm) model folder holds, read the one way every model kind
reads it: its config.json, its *.safetensors weight files, and whether a tokenizer fits its
embedding table. BERT's own parameter names are encoders/bert_hf.py."""

from __future__ import annotations

import json
from pathlib import Path

from mlxlab.errors import ConfigError, MissingFileError


def read_config(path: str | Path) -> dict:
    """config.json of a local Hugging Face (or mlx-lm) model folder, with a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(
            f"pretrained model folder {path} does not exist; point model.pretrained at a local "
            "folder with config.json and *.safetensors (a Hugging Face or mlx-lm model)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{config_file} is missing; a Hugging Face model folder has one")
    return json.loads(config_file.read_text())


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names (sharded checkpoints),
    else every *.safetensors except other layouts' (Mistral's consolidated.*, adapters.*)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise MissingFileError(f"{index.name} names {missing[:3]}, missing from {path}")
        return [path / n for n in names]
    files = [f for f in sorted(path.glob("*.safetensors"))
             if not f.name.startswith(("consolidated", "adapters"))]
    if not files:
        hint = " (convert pytorch_model.bin to safetensors)" if (path / "pytorch_model.bin").exists() else ""
        raise MissingFileError(f"no *.safetensors weights in {path}{hint}")
    return files


def check_vocab(vocab_size: int, checkpoint_vocab: int, source: str | Path) -> None:
    """The data's tokenizer must fit the checkpoint's embedding table."""
    if vocab_size > checkpoint_vocab:
        raise ConfigError(
            f"tokenizer has {vocab_size} tokens but {source} embeds only {checkpoint_vocab}; "
            "use the checkpoint's tokenizer.json for the data"
        )
