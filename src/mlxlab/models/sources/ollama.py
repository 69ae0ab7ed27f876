"""`ollama:NAME[:TAG]`: the GGUF blob of a model in the local Ollama store.

Ollama keeps a model as a manifest (models/manifests/<registry>/<namespace>/<name>/<tag>, JSON)
whose layer of media type `application/vnd.ollama.image.model` names a blob
(models/blobs/sha256-<hex>) that is a GGUF file. The store is $OLLAMA_MODELS, else
~/.ollama/models. Nothing is downloaded: a model Ollama has not pulled is an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxlab.errors import MissingFileError

MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def ollama_blob(name: str) -> Path:
    """The GGUF blob of NAME[:TAG] (tag `latest` by default; NAME may be namespace/name or
    registry/namespace/name as Ollama spells them)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    store = ollama_store()
    manifest = store / "manifests" / Path(*parts) / (tag or "latest")
    if not manifest.is_file():
        raise MissingFileError(f"model.pretrained=ollama:{name}: Ollama's store {store} has no "
                               f"manifest {manifest.relative_to(store)}; `ollama pull {name}` "
                               "first, or set OLLAMA_MODELS to the store that has it")
    layers = json.loads(manifest.read_text()).get("layers", [])
    digests = [layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER]
    if not digests:
        raise MissingFileError(f"ollama:{name}: its manifest {manifest} has no model layer")
    blob = store / "blobs" / digests[0].replace(":", "-")
    if not blob.is_file():
        raise MissingFileError(f"ollama:{name}: the blob {blob} its manifest names is missing; "
                               f"`ollama pull {name}` again")
    return blob
