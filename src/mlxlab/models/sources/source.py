"""What a resolved model source is: a local folder and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `folder` holds config.json, weights and tokenizer; `provenance` is what
    a run records ({"source", "kind", and per kind "repo_id"/"revision" or "sha256"/"file"})."""

    folder: Path
    kind: str  # folder | hub | gguf | ollama
    provenance: dict = field(default_factory=dict)
