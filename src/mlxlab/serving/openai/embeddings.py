"""OpenAI's `POST /v1/embeddings` over sentence-transformers folders mlxlab loads
(models/embedders/sentence_folder.py): the request and response shapes of OpenAI's API, so the
official `openai` client's `client.embeddings.create(model=..., input=...)` works unchanged.

    {"model": "all-MiniLM-L6-v2", "input": "a text" | ["texts", ...] | [ids] | [[ids], ...],
     "encoding_format": "float" | "base64", "dimensions": 128}
    -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}],
        "model": "all-MiniLM-L6-v2", "usage": {"prompt_tokens": 9, "total_tokens": 9}}

A text is embedded as `mlxlab embed` embeds it (the folder's tokenizer, truncation, default
prompt, pooling and Normalize); a list of token ids is the model's input as it is (special
tokens included, as the tokenizer's encoding gives them). `dimensions` keeps the first that
many components and scales the result back to unit length, as OpenAI's text-embedding-3 models
shorten a vector (Matryoshka). `base64` is each vector's little-endian float32 bytes, which the
openai client asks for by default and decodes back to floats. `prompt_name` (an mlxlab field: the
openai client sends it as `extra_body`) puts one of the folder's named prompts before each text,
as sentence-transformers' `encode(prompt_name=...)` does (Qwen3-Embedding's `query`).
`prompt_tokens` counts the tokens the model read. A bad request is OpenAI's error object
(errors.py), naming the field.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxlab.serving.openai.errors import ServingError

if TYPE_CHECKING:  # numpy and MLX come with the model, not with this module
    import numpy as np

    from mlxlab.models.embedders.sentence_folder import TextEmbedder

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
ENCODINGS = ("float", "base64")
FIELDS = ("model", "input", "encoding_format", "dimensions", "user", "prompt_name")


@dataclass
class ServedEmbedder:
    """A text embedder as the server runs it, under the names a request's `model` may use
    (`names[0]` is listed first). The lock runs one request's forward passes at a time."""

    names: tuple[str, ...]
    embedder: TextEmbedder
    source: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict = field(default_factory=lambda: {"shared_bytes": 0})

    @property
    def name(self) -> str:
        return self.names[0]


def load_embedder(names: tuple[str, ...], folder: Path) -> ServedEmbedder:
    """The sentence-transformers folder loaded to serve."""
    from mlxlab.models.embedders.sentence_folder import TextEmbedder

    return ServedEmbedder(names, TextEmbedder(folder), str(folder))


@dataclass(frozen=True)
class EmbeddingRequest:
    """What a checked request asks for: token id rows (texts already tokenized), the
    encoding, the kept dimensions (None: all)."""

    rows: list[list[int]]
    encoding: str
    dimensions: int | None


def read_request(body: Mapping[str, Any], served: ServedEmbedder) -> EmbeddingRequest:
    """The request's fields checked against the model, else a ServingError naming the field."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ServingError(f"{unknown[0]}: not a field of an embeddings request (this server "
                           f"reads {', '.join(FIELDS)})", param=unknown[0])
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise ServingError(f"encoding_format: use float or base64, got {encoding!r:.40}",
                           param="encoding_format")
    dimensions = _dimensions(body.get("dimensions"), served)
    prompt_name = body.get("prompt_name")
    if prompt_name is not None and (not isinstance(prompt_name, str)
                                    or prompt_name not in served.embedder.prompts):
        named = ", ".join(served.embedder.prompts) or "none"
        raise ServingError(f"prompt_name: {served.name}'s prompts are {named}; got "
                           f"{prompt_name!r:.40}", param="prompt_name")
    return EmbeddingRequest(_rows(body.get("input"), served, prompt_name), encoding, dimensions)


def _dimensions(value: Any, served: ServedEmbedder) -> int | None:
    if value is None:
        return None
    full = served.embedder.dimension
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= full:
        raise ServingError(f"dimensions: {served.name} makes {full}-dimensional vectors; give a "
                           f"whole number from 1 to {full}, got {value!r:.40}", param="dimensions")
    return value


def _rows(given: Any, served: ServedEmbedder, prompt_name: str | None) -> list[list[int]]:
    """The input as token id rows: texts tokenized, id lists checked against the vocabulary
    and the model's length."""
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not given:
        raise ServingError("input: give a string, a non-empty list of strings, a list of token "
                           "ids or a list of such lists", param="input")
    if len(given) > MAX_INPUTS:
        raise ServingError(f"input: {len(given)} inputs; send at most {MAX_INPUTS} a request",
                           param="input")
    if all(isinstance(item, str) for item in given):
        return served.embedder.token_ids(given, prompt_name)
    if any(isinstance(item, str) for item in given):
        raise ServingError("input: a list holds texts or token ids, not both", param="input")
    if prompt_name is not None:
        raise ServingError("prompt_name: a prompt goes before texts; token ids are the model's "
                           "input as they are", param="prompt_name")
    if all(_is_id(item) for item in given):
        given = [given]
    for i, row in enumerate(given):
        _check_ids(row, f"input[{i}]" if len(given) > 1 else "input", served)
    return [list(row) for row in given]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ids(row: Any, where: str, served: ServedEmbedder) -> None:
    embedder = served.embedder
    vocab = embedder.vocab_size
    if not isinstance(row, list) or not row or not all(_is_id(t) for t in row):
        raise ServingError(f"{where}: a list of texts is all strings, a list of token ids all "
                           "whole numbers (and not empty)", param="input")
    if not all(0 <= t < vocab for t in row):
        raise ServingError(f"{where}: token ids are 0 to {vocab - 1} in {served.name}'s "
                           "vocabulary", param="input")
    if len(row) > embedder.max_length:
        raise ServingError(f"{where}: {len(row)} tokens; {served.name} reads at most "
                           f"{embedder.max_length}: shorten it", param="input",
                           code="context_length_exceeded")


def answer(request: EmbeddingRequest, served: ServedEmbedder, model_name: str) -> dict:
    """OpenAI's embeddings response for a checked request."""
    with served.lock:
        vectors = served.embedder.encode_ids(request.rows)
    if request.dimensions is not None:
        vectors = shorten(vectors, request.dimensions)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, request.encoding)}
            for i, v in enumerate(vectors)]
    tokens = sum(len(row) for row in request.rows)
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def shorten(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """The first `dimensions` components of each row, scaled to unit length (a zero row stays
    zero)."""
    import numpy as np

    kept = vectors[:, :dimensions]
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    return kept / np.maximum(norms, 1e-12)


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
