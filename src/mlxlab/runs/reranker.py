"""A cross-encoder reranker ready to score: a cross-encoder folder or a finished reranker run,
its model (models/embedders/cross_encoder.py) and its pair tokenizer (data/rerank.py), as
sentence-transformers' CrossEncoder.predict and .rank score (query, passage) pairs.

    reranker = Reranker.load("path/to/cross-encoder")        # or a run: outputs/rerank/<time>
    reranker.predict([("what are pandas?", "Pandas are bears.")])   # (N,) scores
    reranker.rank("what are pandas?", ["...", "..."], top_k=3)     # [(index, score)], best first
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxlab.data.batching import bucket_length
from mlxlab.data.rerank import encode_pairs, pad_encodings, pair_tokenizer
from mlxlab.errors import ConfigError
from mlxlab.models.embedders.cross_encoder import CrossEncoderModel, load_cross_encoder
from mlxlab.models.sources import as_local


class Reranker:
    """A CrossEncoderModel and the tokenizer that pairs its texts (see the module)."""

    def __init__(self, model: CrossEncoderModel, tokenizer: Tokenizer, source: str):
        # read now, on this thread: a lazy weight is bound to the stream that loaded it, and a
        # server scores on threads of its own
        mx.eval(model.parameters())
        self.model, self.tokenizer, self.source = model, tokenizer, source
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    @classmethod
    def load(cls, source: str | Path, which: str = "best") -> Reranker:
        """A cross-encoder folder (or hub id), or a reranker run (its best checkpoint, else
        `which`); anything else is one ConfigError line."""
        folder = Path(as_local(str(source)))
        if (folder / "config.json").is_file():
            return cls(load_cross_encoder(folder), pair_tokenizer(folder / "tokenizer.json"),
                       str(source))
        from mlxlab.runs.model import load_run_model
        from mlxlab.runs.tokenizer import require_run_tokenizer

        model, state = load_run_model(folder, which)
        if not isinstance(model, CrossEncoderModel):
            raise ConfigError(f"{source} is a {type(model).__name__} run, not a reranker "
                              "(train one with experiment=rerank)")
        tokenizer_json = require_run_tokenizer(folder, "reranker")
        max_length = (state.config.get("data") or {}).get("max_length")
        return cls(model, pair_tokenizer(tokenizer_json, max_length), str(source))

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> np.ndarray:
        """CrossEncoder.predict's scores of (query, passage) pairs: (N,) for one label, else
        (N, labels); longest pairs batched first, a pair's score independent of its batch."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        encodings = encode_pairs(self.tokenizer, [(str(q), str(p)) for q, p in pairs])
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
        out: list[np.ndarray | None] = [None] * len(encodings)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            chunk = [encodings[i] for i in rows]
            width = bucket_length(max(len(e.ids) for e in chunk), 8,
                                  self.tokenizer.truncation["max_length"])
            ids, mask, types = (mx.array(a) for a in pad_encodings(chunk, self.pad_id, width))
            scores = np.array(self.model.scores(ids, mask, types).astype(mx.float32))
            for i, score in zip(rows, scores):
                out[i] = score
        width = () if self.model.classifier.weight.shape[0] == 1 else (-1,)
        return np.stack(out).reshape(len(out), *width) if out else np.zeros(0, np.float32)

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
             batch_size: int = 32) -> list[tuple[int, float]]:
        """(document index, score) of `documents` for `query`, highest score first (ties: the
        earlier document), at most `top_k` of them."""
        if self.model.classifier.weight.shape[0] != 1:
            raise ConfigError(f"{self.source} scores {self.model.classifier.weight.shape[0]} "
                              "labels a pair; ranking needs a one-score reranker")
        scores = self.predict([(query, d) for d in documents], batch_size)
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
        return [(i, float(scores[i])) for i in order[:top_k]]
