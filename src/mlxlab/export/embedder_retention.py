"""How much of a text embedder a quantized GGUF keeps, measured in llama.cpp on the written file.

A quantized BERT embedder (q8_0, q5_1, q5_0, q4_1, q4_0) cannot give mlxlab's vectors within the
f32 / f16 check, so it is judged as retention.py judges a decoder's export, on the embedder's own
measures. llama.cpp (the xllamacpp wheel) loads the written file in embedding mode and embeds:

- the probe texts: export/embedder.py's PROBE (its edge cases: an empty text, accents, CJK, a
  long text) and the queries and documents of a retrieval set, an embedder run's own
  (data.eval_dir), else the shipped one (SHIPPED, plain-word questions and field notes: 400
  texts, so a folder's mean is not the edge cases'): each vector's cosine with the source's
  (mlxlab's vectors, which are sentence-transformers' within 1e-5), reported as the mean and the
  minimum; the file loses the embedder when the mean is under COSINE_FLOOR;
- an embedder run with a retrieval set (data.eval_dir, BEIR held-out queries, the set its
  evaluations scored: data/beir.py): each query's nDCG@10 ranking the documents by llama.cpp's
  vectors, beside the source's (the run's written folder, its best weights) and its base's (the
  pretrained folder it started from), judged by retention.py: the share of the fine-tune's gain
  kept, the export against the source paired per query, lost when significantly worse and under
  KEEP of the gain.

llama.cpp does not truncate: a text longer than the embedder's max_length goes in as mlxlab's
truncated token ids, so both sides embed the same tokens. A loss refuses the export in one line
(retention.refusal) unless --accept-loss writes it, flagged; the entry is the report's
"retention", and a run's is recorded on its MLflow run (retention.record).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxlab.checkpoint import CheckpointState
from mlxlab.config import asset_path
from mlxlab.data.beir import RetrievalSet, read_beir
from mlxlab.export.embedder import PROBE
from mlxlab.export.gguf import GGUFExportError
from mlxlab.export.retention import Column, Scores, entry_of, gate, judge_scores, measure
from mlxlab.models.embedders.sentence_folder import TextEmbedder
from mlxlab.objectives.embedding.retrieval import score_retrieval

COSINE_FLOOR = 0.99   # the mean cosine to the source's vectors under which the file is refused
NDCG = "ndcg_at_10"
SHIPPED = "jargon_retrieval/jargon"  # the probe's texts for a source without a retrieval set


@dataclass
class EmbedderReference:
    """What a quantized file is judged against: the source's vectors on the probe texts and,
    for a run with a retrieval set, the source's and the base's per-query nDCG@10."""

    texts: list[str]
    vectors: np.ndarray
    retrieval: RetrievalSet | None = None
    run: Scores = field(default_factory=dict)
    base: Scores | None = None
    base_from: str = "none: a folder, not a run"
    state: CheckpointState | None = None


def llama_cpp_vectors(embedder: TextEmbedder, file: Path, texts: list[str]) -> np.ndarray:
    """llama.cpp's vectors of `texts` from the GGUF `file` (a text longer than max_length as
    mlxlab's truncated ids); a GGUFExportError when llama.cpp cannot embed with it."""
    import xllamacpp as xl

    inputs = [text if len(ids) < embedder.max_length else ids
              for text, ids in zip(texts, embedder.token_ids(texts))]
    params = xl.CommonParams()
    params.model.path = str(file)
    params.embedding = True
    params.n_ctx = params.n_batch = params.n_ubatch = embedder.max_length
    # one thread: llama.cpp's threads meet by spinning, and beside other work on the cores two
    # of them ran all-MiniLM-L6-v2's 407 probe texts in 190 s against one's 13 s (same vectors)
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    answer = xl.Server(params).handle_embeddings({"input": inputs})
    if "data" not in answer:
        raise GGUFExportError(f"llama.cpp could not embed with the written file: "
                              f"{str(answer.get('error', answer))[:200]}")
    rows = sorted(answer["data"], key=lambda row: row["index"])
    return np.array([row["embedding"] for row in rows], np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row of `a` against the same row of `b`."""
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-12)


def embedder_reference(embedder: TextEmbedder, state: CheckpointState | None
                       ) -> EmbedderReference:
    """The source's vectors on the probe, and a run's retrieval scores with its base's."""
    data = (state.config.get("data") or {}) if state is not None else {}
    retrieval = (read_beir(data["eval_dir"], data.get("eval_split") or "test")
                 if data.get("eval_dir") else None)
    probe = retrieval or read_beir(asset_path(SHIPPED))
    texts = [*PROBE, *probe.queries, *probe.corpus]
    reference = EmbedderReference(texts, embedder.encode(texts), retrieval, state=state)
    if state is None:
        return reference
    if retrieval is None:
        reference.base_from = "none: the run has no retrieval set (data.eval_dir)"
        return reference
    queries = len(PROBE) + len(retrieval.queries)
    reference.run = retrieval_scores(retrieval, reference.vectors[len(PROBE):queries],
                                     reference.vectors[queries:])
    reference.base, reference.base_from = _base_scores(state, retrieval)
    return reference


def retrieval_scores(retrieval: RetrievalSet, queries: np.ndarray, documents: np.ndarray
                     ) -> Scores:
    """Each query's nDCG@10 (`<set>/ndcg_at_10`), as the run's evaluations score it."""
    scored = score_retrieval(retrieval.name, queries, retrieval.query_ids, documents,
                             retrieval.corpus_ids, retrieval.relevant)
    return {f"{retrieval.name}/{NDCG}": Column(np.array([row[NDCG] for row in scored.rows]))}


def _base_scores(state: CheckpointState, retrieval: RetrievalSet) -> tuple[Scores | None, str]:
    """The run's base (model.pretrained) on the retrieval set, where it is at hand."""
    pretrained = (state.config.get("model") or {}).get("pretrained")
    if not pretrained:
        return None, "none: the run names no model.pretrained"
    try:
        from mlxlab.models.sources import model_folder

        folder = model_folder(str(pretrained))
        base = TextEmbedder(folder)
    except Exception as err:  # noqa: BLE001 - no base is a reported gap, not a failed export
        return None, f"none: {pretrained} did not load ({type(err).__name__}: {err})"[:200]
    scores = retrieval_scores(retrieval, base.encode(retrieval.queries),
                              base.encode(retrieval.corpus))
    return scores, str(folder)


def judge_embedder_file(reference: EmbedderReference, embedder: TextEmbedder, file: Path,
                        written: str, accept_loss: bool) -> dict:
    """The written file embedded by llama.cpp and judged (module docstring): the report's
    "retention" entry, or the refusal when it lost the embedder and the loss is not accepted."""
    theirs = llama_cpp_vectors(embedder, file, reference.texts)
    agreement = cosines(theirs, reference.vectors)
    measures = [cosine_measure(agreement)]
    if reference.retrieval is not None:
        queries = len(PROBE) + len(reference.retrieval.queries)
        exported = retrieval_scores(reference.retrieval, theirs[len(PROBE):queries],
                                    theirs[queries:])
        measures += [measure(k) for k in judge_scores(reference.run, reference.base, exported)]
    tasks = [str(reference.state.config["data"]["eval_dir"])] if reference.retrieval else []
    entry = entry_of(measures, written, accept_loss, reference.base_from, tasks)
    entry["checker"] = f"llama.cpp (xllamacpp {_xllamacpp_version()})"
    return gate(entry, accept_loss, "export --quant q8_0 (or f16, which equals the source)",
                what="the embedder")


def cosine_measure(agreement: np.ndarray) -> dict:
    """The probe's cosines as one measure of the entry, lost under COSINE_FLOOR."""
    mean, low = float(agreement.mean()), float(agreement.min())
    lost = mean < COSINE_FLOOR
    line = (f"probe/cosine: llama.cpp's vectors of the file against the source's on "
            f"{len(agreement)} texts: mean {mean:.5f}, min {low:.5f}; "
            + (f"under the floor {COSINE_FLOOR} on the mean" if lost else
               f"at least the floor {COSINE_FLOOR} on the mean"))
    return {"measure": "probe/cosine", "n": len(agreement), "mean": mean, "min": low,
            "floor": COSINE_FLOOR, "export": mean, "kept": None, "lost": lost, "line": line}


def _xllamacpp_version() -> str:
    import xllamacpp

    return xllamacpp.__version__
