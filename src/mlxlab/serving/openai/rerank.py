"""`POST /v1/rerank` (also `/rerank` and `/v2/rerank`), in the shape vLLM and Cohere answer it:
a query and documents in, the documents' relevance scores out, best first.

    request:  {"model": NAME, "query": "...", "documents": ["...", {"text": "..."}, ...],
               "top_n": 3 (optional: all), "return_documents": false (optional)}
    response: {"id": "rerank-...", "model": NAME,
               "results": [{"index": 2, "relevance_score": 0.93, "document": {"text": "..."}}],
               "usage": {"total_tokens": N}}

A served reranker is a cross-encoder folder or a reranker run (runs/reranker.py); its
relevance_score is CrossEncoder.predict's score of (query, document), ties to the earlier
document. A field this endpoint does not read, a missing query or documents, an empty document
list, a top_n below 1 or a document that is neither a string nor {"text": string} is refused
(400, OpenAI's error object), an unknown model 404. One reranker scores one request at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxlab.runs.reranker import Reranker
from mlxlab.serving.openai.checks import served_model
from mlxlab.serving.openai.errors import ServingError

RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
FIELDS = ("model", "query", "documents", "top_n", "return_documents")


def _own_stream() -> None:
    # MLX keeps a stream per thread: the reranker's worker thread makes its own
    mx.set_default_stream(mx.new_stream(mx.default_device()))


@dataclass(eq=False)
class ServedReranker:
    """A reranker under the names a request's `model` may use (`names[0]` listed first); it
    scores on one worker thread of its own, a request at a time."""

    names: tuple[str, ...]
    reranker: Reranker
    source: str
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, "rerank", initializer=_own_stream))

    @property
    def name(self) -> str:
        return self.names[0]

    def rank(self, query: str, texts: list[str], top_n: int | None) -> list[tuple[int, float]]:
        """Reranker.rank on the worker thread."""
        return self.worker.submit(self.reranker.rank, query, texts, top_n).result()


def load_rerankers(targets: Sequence[Any], which: str = "best") -> list[ServedReranker]:
    """Each reranker target (served.py's Target: a cross-encoder folder or a reranker run)
    loaded to answer /v1/rerank under its names."""
    return [ServedReranker(tuple(dict.fromkeys(t.names)), Reranker.load(t.path, which), t.text)
            for t in targets]


def document_texts(documents: Any) -> list[str]:
    """The documents' texts: strings, or {"text": string} objects (Cohere's and vLLM's)."""
    if not isinstance(documents, list) or not documents:
        raise ServingError("documents: give a non-empty list of strings or {\"text\": ...} "
                           "objects", param="documents")
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) and set(doc) == {"text"} else doc
        if not isinstance(text, str):
            raise ServingError(f"documents[{i}]: a string or {{\"text\": string}}, not "
                               f"{str(doc)[:80]!r}", param=f"documents[{i}]")
        texts.append(text)
    return texts


def _check(body: Mapping[str, Any]) -> tuple[str, list[str], int | None, bool]:
    """(query, texts, top_n, return_documents) of a rerank request, or its refusal."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ServingError(f"{unknown[0]}: not a field of /v1/rerank (it reads "
                           f"{', '.join(FIELDS)}); leave it out", param=unknown[0])
    query = body.get("query")
    if not isinstance(query, str):
        raise ServingError("query: required, a string", param="query")
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ServingError(f"top_n: a whole number >= 1, not {top_n!r}", param="top_n")
    keep = body.get("return_documents", False)
    if not isinstance(keep, bool):
        raise ServingError(f"return_documents: true or false, not {keep!r}",
                           param="return_documents")
    return query, document_texts(body.get("documents")), top_n, keep


def rerank_response(body: Mapping[str, Any], served: Mapping[str, ServedReranker],
                    listed: Sequence[str]) -> dict:
    """The answer to one rerank request (see the module), or a ServingError."""
    model = served_model(body, served, list(dict.fromkeys(listed)))
    query, texts, top_n, keep = _check(body)
    ranked = model.rank(query, texts, top_n)
    encodings = model.reranker.tokenizer.encode_batch([(query, t) for t in texts])
    results = []
    for index, score in ranked:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if keep:
            result["document"] = {"text": texts[index]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model.name, "results": results,
            "usage": {"total_tokens": sum(len(e.ids) for e in encodings)}}
