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
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from cross_encoder_fixtures import LABELS, LISTS, PAIRS, stored_reference, write_variants
from mlxlab.data.batching import Batching
from mlxlab.data.rerank import RerankLists, RerankPairs
from mlxlab.errors import ConfigError
from mlxlab.models.embedders.cross_encoder import CrossEncoderModel, load_cross_encoder
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
    """The same pairs, labels and weights: BinaryCrossEntropyLoss (pos_weight none and 2.5),
    ListNetLoss and LambdaLoss (a list padded to the longer one) equal sentence-transformers'."""
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
    loss, aux = Reranking("LambdaLoss").loss(model, batch)  # NDCGLoss2++ weighting
    assert abs(float(loss) - reference["lambda"]) < TOL, float(loss)
    assert float(aux["ntokens"]) == 4  # the pairs whose labels differ: 3 + 1
    for name in ("ListNetLoss", "LambdaLoss"):  # the step differentiates them (sorts included)
        loss_fn = Reranking(name).loss
        _, grads = nn.value_and_grad(model, lambda m, b, f=loss_fn: f(m, b)[0])(model, batch)
        norms = [float(mx.abs(g).max()) for _, g in tree_flatten(grads)]
        assert all(np.isfinite(norms)) and max(norms) > 0, name


def test_unpadded_pairs_equal_the_padded_pass(tiny, tmp_path):
    """A batch names its pairs' real tokens (a padding passage's one token included) and the
    encoder computes those alone: ListNetLoss and every gradient equal the padded pass's, train
    batches padded to the epoch's most real tokens."""
    model = load_cross_encoder(tiny["one"])
    lists = _data(RerankLists, tiny["one"], tmp_path,
                  [{"query": q, "passages": d, "labels": y} for q, d, y in LISTS])
    (train,) = lists.train_batches(Batching(batch_size=8), 0)
    (batch,) = lists.val_batches(Batching(batch_size=8))
    mask = np.array(batch["attention_mask"])
    assert int(mask.sum()) <= batch["token_index"].shape[0] < mask.size  # pads left out
    assert train["token_index"].shape == batch["token_index"].shape
    results = []
    for b in (batch, {k: v for k, v in batch.items() if k != "token_index"}):
        loss, grads = nn.value_and_grad(model, lambda m, x=b: Reranking("ListNetLoss").loss(m, x)[0])(
            model)
        results.append((float(loss), dict(tree_flatten(grads))))
    (unpadded, packed_grads), (padded, plain_grads) = results
    assert abs(unpadded - padded) < 1e-6
    largest = max(float(mx.abs(g).max()) for g in plain_grads.values())
    for name, g in plain_grads.items():
        assert float(mx.abs(packed_grads[name] - g).max()) <= 1e-5 * largest, name


def test_ranking_metrics():
    """MRR and nDCG per list, padding left out, a tie averaged over its two orders (the
    relevant passage first or second): MRR (1 + 1/2) / 2, DCG (1 + 1/log2(3)) / 2."""
    scores = mx.array([[0.1, 0.9, 0.5], [0.3, 0.3, 9.0]])
    labels = mx.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    valid = mx.array([[True, True, True], [True, True, False]])
    assert np.allclose(reciprocal_rank(scores, labels, valid), [1 / 3, 0.75])
    assert np.allclose(ndcg(scores, labels, valid), [0.5, (1 + 1 / np.log2(3)) / 2])


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
    """A row without a label: one line, exit 2, no outputs/ folder. (Both refusals in turn in
    one process: mlxlab-train, the training app `mlxlab train` supervises.)"""
    from one_process import each_in_one_process

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "a", "passage": "b"}\n')
    common = ["mlxlab-train", "experiment=rerank", f"model.pretrained={tiny['one']}",
              "tracking=none"]
    # a query's rows are scored together: a token-budget batch is refused by the config checks
    (code, err, names), (code2, err2, names2) = each_in_one_process(
        [[*common, f"data.train_file={rows}"], [*common, "trainer.batching.dynamic=true"]],
        cli_env, cwd=tmp_path, after="one_process:names_here")
    assert code == 2 and "rows.jsonl:1 has no 'label'" in err, err[-2000:]
    assert "outputs" not in names, names
    assert code2 == 2 and err2.strip().endswith("set trainer.batching.dynamic=false"), err2[-2000:]
    assert "outputs" not in names2, names2


@pytest.mark.slow  # a server process; serve's HTTP path: test_serve_embeddings, the scores: above
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
    from mlxlab.cli.cache import entries

    args = ["mine-negatives", str(model), "--data", str(data), "--num-negatives", "2",
            "--cache-dir", str(tmp_path / "cache" / "mined_negatives")]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "mined: 10 triplet rows" in capsys.readouterr().err
    (kept,) = (tmp_path / "cache" / "mined_negatives").glob("*/rows.jsonl")
    (entry,) = [e for e in entries(tmp_path / "cache") if e.kind == "mined negatives"]
    assert entry.path == kept.parent and "triplet rows of" in entry.source
    stamp = kept.stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert "found in the cache" in capsys.readouterr().err and kept.stat().st_mtime_ns == stamp
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert main([*args, "--range-min", "9", "--range-max", "4", "--out",
                 str(tmp_path / "c.jsonl")]) == 2
    assert "range_min=9" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
    # bounds that keep nothing, and filters that happen to keep nothing: refused, nothing kept
    assert main([*args, "--min-score", "0.9", "--max-score", "0.1", "--out",
                 str(tmp_path / "d.jsonl")]) == 2
    assert "min_score=0.9 is above max_score=0.1" in capsys.readouterr().err
    assert main([*args, "--max-score", "-2", "--out", str(tmp_path / "e.jsonl")]) == 2
    assert "no negative was mined from 5 pairs" in capsys.readouterr().err
    assert main([*args, "--corpus", str(tmp_path / "absent.txt"), "--out",
                 str(tmp_path / "f.jsonl")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert not [p for p in tmp_path.glob("[def].jsonl")]
    assert len(list((tmp_path / "cache" / "mined_negatives").glob("*/rows.jsonl"))) == 1


# --- the slow run: live references, real models, training ------------------------------------


def _cross_encoder(folder: Path):
    from sentence_transformers.cross_encoder import CrossEncoder

    return CrossEncoder(str(folder), device="cpu")


@pytest.mark.slow
def test_stored_reference_is_what_sentence_transformers_computes(tiny):
    pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    from cross_encoder_fixtures import sentence_transformers_reference

    stored, live = stored_reference(), sentence_transformers_reference(tiny)
    for name in tiny:
        np.testing.assert_allclose(stored["scores"][name], live["scores"][name], atol=1e-6,
                                   err_msg="rewrite it: python tests/cross_encoder_fixtures.py")
    assert stored["bce"] == pytest.approx(live["bce"], abs=1e-6)
    assert stored["listnet"] == pytest.approx(live["listnet"], abs=1e-6)
    assert stored["lambda"] == pytest.approx(live["lambda"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("num_labels", [1, 3])
def test_folder_written_by_transformers_scores_as_crossencoder(tmp_path, num_labels):
    """A random BertForSequenceClassification and its BertTokenizer saved by transformers."""
    pytest.importorskip("sentence_transformers")
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from embedder_fixtures import HIDDEN, VOCAB

    torch.manual_seed(num_labels)
    folder = tmp_path / "ce"
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=num_labels, initializer_range=0.3)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)},
                  model_max_length=20).save_pretrained(folder)
    assert_scores(Reranker.load(folder).predict(PAIRS, batch_size=3),
                  _cross_encoder(folder).predict(PAIRS, batch_size=2),
                  f"transformers-written, {num_labels} label(s)")


@pytest.fixture(scope="module")
def minilm_cross_encoder(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2's encoder with a fresh one-score head, saved by transformers."""
    pytest.importorskip("sentence_transformers")
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from real_models import packaged_folder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("minilm") / "cross-encoder"
    model = BertForSequenceClassification.from_pretrained(packaged_folder(), num_labels=1)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(packaged_folder()).save_pretrained(folder)
    return folder


def _story_pairs(n: int) -> tuple[list[str], list[str]]:
    from mlxlab.config.compose import asset_path

    rows = [json.loads(line) for line in Path(asset_path("rerank/story_pairs.jsonl"))
            .read_text().splitlines()]
    kept = [r for r in rows if r["label"] == 1][:n]
    return [r["query"] for r in kept], [r["passage"] for r in kept]


@pytest.mark.slow
def test_minilm_cross_encoder_scores_as_crossencoder(minilm_cross_encoder):
    queries, passages = _story_pairs(12)
    pairs = list(zip(queries, passages[1:] + passages[:1])) + list(zip(queries, passages))
    assert_scores(Reranker.load(minilm_cross_encoder).predict(pairs, batch_size=8),
                  _cross_encoder(minilm_cross_encoder).predict(pairs, batch_size=5),
                  "all-MiniLM-L6-v2 + fresh head")


MINING = [dict(), dict(output_format="n-tuple", num_negatives=4, range_min=2, max_score=0.5),
          dict(absolute_margin=0.05, output_format="labeled-pair", range_max=8),
          dict(relative_margin=0.1, output_format="labeled-list", range_max=8)]


@pytest.mark.slow
def test_mined_negatives_equal_sentence_transformers(minilm_cross_encoder):
    """TinyStories pairs (src/mlxlab/assets/rerank) and all-MiniLM-L6-v2: the rows
    mine_hard_negatives returns (sampling_strategy top) for several settings, and rescored by a
    cross-encoder (MiniLM with a fresh head) under a margin."""
    pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as theirs

    from mlxlab.models.embedders.sentence_folder import TextEmbedder
    from mlxlab.runs.hard_negatives import MiningSettings, mine_hard_negatives
    from real_models import packaged_folder

    queries, passages = _story_pairs(40)
    dataset = Dataset.from_dict({"query": queries, "passage": passages})
    model, embedder = SentenceTransformer(str(packaged_folder()), device="cpu"), \
        TextEmbedder(packaged_folder())
    for settings in MINING:
        expected = theirs(dataset, model, verbose=False, **settings).to_list()
        got = mine_hard_negatives(embedder, queries, passages, MiningSettings(**settings),
                                  keys=("query", "passage"))
        print(settings, len(expected), "rows")
        assert got == expected, settings
    rescored = dict(absolute_margin=0.0, num_negatives=2, range_max=5)
    dataset = dataset.select(range(15))
    expected = theirs(dataset, model, cross_encoder=_cross_encoder(minilm_cross_encoder),
                      verbose=False, **rescored).to_list()
    got = mine_hard_negatives(embedder, queries[:15], passages[:15], MiningSettings(**rescored),
                              reranker=Reranker.load(minilm_cross_encoder),
                              keys=("query", "passage"))
    assert got == expected and got


def _train_args(folder: Path, *extra: str) -> list[str]:
    return ["experiment=rerank", f"model.pretrained={folder}", "trainer.max_steps=8",
            "trainer.eval_every_steps=4", "trainer.log_every_steps=1",
            "optimizer.learning_rate=1e-3", "callbacks.progress.enabled=false",
            "checkpoint.save_every_steps=2", "checkpoint.save_every_minutes=null", *extra]


@pytest.mark.slow
def test_trained_reranker_exports_as_a_crossencoder_folder(tiny, tmp_path, cli_env):
    """experiment=rerank on the tiny cross-encoder: the run's best checkpoint, its export
    (`mlxlab export --format hf`) read back by mlxlab and CrossEncoder loading the export score
    alike; listwise runs (ListNetLoss, LambdaLoss) report MRR and nDCG."""
    pytest.importorskip("sentence_transformers")
    from conftest import mlxlab
    from run_helpers import run

    out = run(_train_args(tiny["one"]), tmp_path / "pairs", cli_env)
    assert "val/accuracy" in out.stdout + out.stderr
    exported = tmp_path / "exported"
    done = mlxlab("export", str(tmp_path / "pairs"), "--format", "hf", "--out", str(exported),
                  env=cli_env)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((exported / "config.json").read_text())
    assert config["sentence_transformers"]["activation_fn"].endswith("Sigmoid")
    from_run = Reranker.load(tmp_path / "pairs").predict(PAIRS)
    assert_scores(Reranker.load(exported).predict(PAIRS), from_run, "export read back")
    assert_scores(from_run, _cross_encoder(exported).predict(PAIRS), "CrossEncoder on the export")
    assert not np.allclose(from_run, stored_reference()["scores"]["one"], atol=1e-3)  # trained
    for loss in ("ListNetLoss", "LambdaLoss"):
        lists = run(_train_args(tiny["one"], "data=rerank_lists", f"objective.loss={loss}",
                                "optimized_metric=val/ndcg", "optimized_mode=max"),
                    tmp_path / loss, cli_env)
        log = lists.stdout + lists.stderr
        assert "val/mrr" in log and "val/ndcg" in log, log[-2000:]


@pytest.mark.slow
def test_a_killed_reranker_run_resumes_bitwise(tiny, tmp_path, cli_env):
    from run_helpers import committed_steps, kill_when, run, start
    from test_resume import assert_same_weights

    args = _train_args(tiny["one"], "tracking=none")
    killed = tmp_path / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 4 for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < 8
    run([*args, f"resume={killed}"], tmp_path / "resumed", cli_env)
    run(args, tmp_path / "reference", cli_env)
    assert_same_weights(tmp_path / "reference", tmp_path / "resumed", "rerank")
