"""Cross-encoder rerankers: tiny BertForSequenceClassification folders score as
sentence-transformers' CrossEncoder.predict (against its stored scores by default, recomputed
live in the slow run, and on a folder transformers writes itself and on all-MiniLM-L6-v2 with a
fresh head); the objective's BinaryCrossEntropyLoss and ListNetLoss equal sentence-transformers'
on the same batch and weights; bad folders and rows are refused before a run folder exists;
`mlxlab serve` answers POST /v1/rerank over HTTP with CrossEncoder's scores; `mlxlab
mine-negatives` is cached by its inputs. The slow run trains, exports (CrossEncoder loads it
with equal scores), resumes a killed run bitwise, and mines with all-MiniLM-L6-v2 as
sentence-transformers' mine_hard_negatives does."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from cross_encoder_fixtures import LABELS, LISTS, PAIRS, stored_reference, write_variants
from mlxlab.data.batching import Batching
from mlxlab.data.rerank import RerankLists, RerankPairs
from mlxlab.errors import ConfigError
from mlxlab.models.cross_encoder import CrossEncoderModel, load_cross_encoder
from mlxlab.objectives.rerank.ranking_metrics import ndcg, reciprocal_rank
from mlxlab.objectives.rerank.reranking import Reranking
from mlxlab.runs.reranker import Reranker

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_variants(tmp_path_factory.mktemp("cross_encoders"))


def assert_scores(ours: np.ndarray, theirs, what: str) -> None:
    gap = float(np.abs(ours - np.asarray(theirs, np.float32)).max())
    print(f"{what}: max |score gap| {gap:.3g}")
    assert ours.shape == np.asarray(theirs).shape and gap < TOL, (what, gap)


def test_tiny_cross_encoders_score_as_crossencoder_predict(tiny):
    """One label (Sigmoid), three labels (Identity), one label with config.json's Identity; the
    long pair is cut longest-first at the tokenizer's model_max_length (24)."""
    reference = stored_reference()["scores"]
    for name, folder in tiny.items():
        reranker = Reranker.load(folder)
        assert_scores(reranker.predict(PAIRS, batch_size=2), reference[name], name)
    assert load_cross_encoder(tiny["one"]).activation == "Sigmoid"
    assert load_cross_encoder(tiny["identity"]).activation == "Identity"
    ranked = Reranker.load(tiny["one"]).rank("the cat", ["dog", "sat on the mat", "a"], top_k=2)
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1]


def _data(cls, folder: Path, tmp_path: Path, rows: list[dict]):
    file = tmp_path / f"{cls.__name__}.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = cls(str(file), val_file=str(file), tokenizer={"path": str(folder / "tokenizer.json")})
    data.setup(None)
    return data


def test_losses_equal_sentence_transformers(tiny, tmp_path):
    """The same pairs, labels and weights: BinaryCrossEntropyLoss (pos_weight none and 2.5) and
    ListNetLoss (a list padded to the longer one) equal sentence-transformers' values."""
    reference = stored_reference()
    model = load_cross_encoder(tiny["one"])
    pairs = _data(RerankPairs, tiny["one"], tmp_path,
                  [{"query": q, "passage": p, "label": y} for (q, p), y in zip(PAIRS, LABELS)])
    (batch,) = pairs.val_batches(Batching(batch_size=8))
    for weight in (None, 2.5):
        loss, aux = Reranking("BinaryCrossEntropyLoss", weight).loss(model, batch)
        assert abs(float(loss) - reference["bce"][str(weight)]) < TOL, (weight, float(loss))
        assert float(aux["ntokens"]) == len(PAIRS)
    lists = _data(RerankLists, tiny["one"], tmp_path,
                  [{"query": q, "passages": d, "labels": y} for q, d, y in LISTS])
    (batch,) = lists.val_batches(Batching(batch_size=8))
    assert batch["input_ids"].shape[:2] == (2, 3) and batch["doc_mask"].tolist()[1] == [1, 1, 0]
    loss, _ = Reranking("ListNetLoss").loss(model, batch)
    assert abs(float(loss) - reference["listnet"]) < TOL, float(loss)


def test_ranking_metrics():
    """MRR and nDCG per list, padding left out, ties to the earlier passage."""
    scores = mx.array([[0.1, 0.9, 0.5], [0.3, 0.3, 9.0]])
    labels = mx.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    valid = mx.array([[True, True, True], [True, True, False]])
    assert np.allclose(reciprocal_rank(scores, labels, valid), [1 / 3, 1 / 2])
    assert np.allclose(ndcg(scores, labels, valid), [0.5, 1 / np.log2(3)])


def test_bad_folders_and_rows_are_refused(tiny, tmp_path):
    decoder = tmp_path / "decoder"
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ConfigError, match="not a sequence classifier"):
        CrossEncoderModel.check_config({"pretrained": str(decoder)})
    with pytest.raises(ConfigError, match="not a sequence classifier"):
        load_cross_encoder(decoder)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "a", "passage": "b", "label": 1}\n{"query": "a", "passage": "c"}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl:2 has no 'label'"):
        RerankPairs(str(rows))
    with pytest.raises(ConfigError, match="ListNetLoss trains on rerank_lists"):
        Reranking.check_config({"objective": {"loss": "ListNetLoss"}}, "rerank_pairs")


def test_train_refuses_a_bad_row_before_a_run_folder(tiny, tmp_path, cli_env):
    """A row without a label: one line, exit 2, no outputs/ folder."""
    from conftest import mlxlab

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "a", "passage": "b"}\n')
    out = mlxlab("train", "experiment=rerank", f"model.pretrained={tiny['one']}",
                 f"data.train_file={rows}", "tracking=none", env=cli_env)
    assert out.returncode == 2 and "rows.jsonl:1 has no 'label'" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


def test_serve_answers_rerank_over_http(tiny, tmp_path, cli_env):
    """A running `mlxlab serve` of a cross-encoder folder: /v1/rerank's relevance scores are
    CrossEncoder's, best first, top_n and return_documents honoured; a field it does not read
    is refused (400)."""
    from serve_helpers import serving

    theirs = stored_reference()["scores"]["one"]
    query, documents = PAIRS[3][0], [PAIRS[3][1], "dog", {"text": "a b c"}]
    with serving([str(tiny["one"])], tmp_path / "serve.log", cli_env) as url:
        def post(body: dict) -> tuple[int, dict]:
            request = urllib.request.Request(f"{url}/rerank", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return answer.status, json.loads(answer.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, body = post({"model": "one", "query": query, "documents": documents,
                             "top_n": 2, "return_documents": True})
        refused, error = post({"model": "one", "query": query, "documents": ["x"], "rank": 1})
    assert status == 200 and body["model"].endswith("one") and body["usage"]["total_tokens"] > 0
    results = body["results"]
    assert [r["relevance_score"] for r in results] == sorted(
        [r["relevance_score"] for r in results], reverse=True) and len(results) == 2
    top = next(r for r in results if r["index"] == 0)  # the pair CrossEncoder scored
    assert abs(top["relevance_score"] - theirs[3]) < TOL and top["document"] == {"text": documents[0]}
    assert refused == 400 and error["error"]["param"] == "rank"


def test_mine_negatives_is_cached(tmp_path, capsys):
    """The same command twice: the second copies the kept file (mines nothing) and the rows
    are the same; a bad setting is one line, exit 2, nothing written."""
    from embedder_fixtures import write_tiny_folder

    from mlxlab.cli.main import main

    model = write_tiny_folder(tmp_path / "embedder")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": q, "passage": p}) + "\n" for q, p in
                            [("the cat", "sat on the mat"), ("dog", "a dog ran"),
                             ("mat", "the mat is red"), ("zebra", "stripes"), ("c", "d e")]))
    args = ["mine-negatives", str(model), "--data", str(data), "--num-negatives", "2",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "mined: 10 triplet rows" in capsys.readouterr().err
    (kept,) = (tmp_path / "cache").glob("*.jsonl")
    stamp = kept.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert "found in the cache" in capsys.readouterr().err and kept.stat().st_mtime_ns == stamp
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert main([*args, "--range-min", "9", "--range-max", "4", "--out",
                 str(tmp_path / "c.jsonl")]) == 2
    assert "range_min=9" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
