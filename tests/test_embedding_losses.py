"""The embedding losses and the retrieval metrics equal sentence-transformers' own (the installed
library, PyTorch on the CPU): each loss on the same batch through the same weights (the tiny
random BERT folder of embedder_fixtures, read by both), its value and the gradients of two
weights; CachedMultipleNegativesRankingLoss's gradients equal the uncached loss's; the
per-query retrieval scores' means equal InformationRetrievalEvaluator's on the same embeddings."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from embedder_fixtures import write_tiny_folder
from mlxlab.data.batching import real_token_index
from mlxlab.data.sentence_pairs import column_keys, token_index_key
from mlxlab.models.embedders.embedder_model import EmbedderModel
from mlxlab.objectives.embedding.cached_mnrl import CachedMultipleNegativesRankingLoss
from mlxlab.objectives.embedding.cosent import CoSENTLoss
from mlxlab.objectives.embedding.distill_kl_div import DistillKLDivLoss
from mlxlab.objectives.embedding.margin_mse import MarginMSELoss
from mlxlab.objectives.embedding.matryoshka import MatryoshkaLoss
from mlxlab.objectives.embedding.mnrl import MultipleNegativesRankingLoss
from mlxlab.objectives.embedding.retrieval import SCORES, score_retrieval

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

ROWS = 6
COLUMN_TEXTS = [
    [f"the cat {w} sat" for w in "abcdef"],
    [f"a dog {w} on the mat" for w in "ghijkl"],
    [f"{w} mat" for w in "mnopqr"],
    ["dog", "the the cat", "on", "sat mat dog cat", "a b c", "zebra"],
]
# (name, our loss, sentence-transformers' loss from its model, columns, labels)
RNG = np.random.default_rng(3)
CASES = {
    "mnrl": (lambda: MultipleNegativesRankingLoss(),
             lambda m: st_losses.MultipleNegativesRankingLoss(m), 3, None),
    "mnrl_all_directions": (
        lambda: MultipleNegativesRankingLoss(directions=DIRS, partition_mode="joint"),
        lambda m: st_losses.MultipleNegativesRankingLoss(m, directions=DIRS), 4, None),
    "mnrl_symmetric": (
        lambda: MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
                                             partition_mode="per_direction"),
        lambda m: st_losses.MultipleNegativesSymmetricRankingLoss(m), 2, None),
    "cached_mnrl": (lambda: CachedMultipleNegativesRankingLoss(mini_batch_size=4),
                    lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4),
                    3, None),
    "matryoshka": (lambda: MatryoshkaLoss(MultipleNegativesRankingLoss(), [16, 8, 4], [1, 2, .5]),
                   lambda m: st_losses.MatryoshkaLoss(m, st_losses.MultipleNegativesRankingLoss(m),
                                                      [16, 8, 4], [1, 2, .5]), 3, None),
    "cosent": (lambda: CoSENTLoss(), lambda m: st_losses.CoSENTLoss(m), 2,
               np.array([0.1, 0.9, 0.5, 0.5, 0.0, 1.0], np.float32)),
    "margin_mse": (lambda: MarginMSELoss(), lambda m: st_losses.MarginMSELoss(m), 4,
                   RNG.normal(size=(ROWS, 3)).astype(np.float32)),
    "distill_kl_div": (lambda: DistillKLDivLoss(temperature=2.0),
                       lambda m: st_losses.DistillKLDivLoss(m, temperature=2.0), 4,
                       RNG.normal(size=(ROWS, 3)).astype(np.float32)),
}
DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# the weights whose gradients are compared: (ours, sentence-transformers' module path)
WEIGHTS = [("encoder.layers.0.attention.query.weight",
            "0.model.encoder.layer.0.attention.self.query.weight"),
           ("dense.0.linear.weight", "2.linear.weight")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = write_tiny_folder(tmp_path_factory.mktemp("tiny") / "st")
    theirs = st.SentenceTransformer(str(folder), device="cpu")
    theirs.eval()
    ours = EmbedderModel(vocab_size=10, pretrained=str(folder))
    ours.eval()
    return ours, theirs


def features(theirs, columns: int) -> tuple[list[dict], dict[str, mx.array]]:
    """sentence-transformers' tokenized columns, and our batch of the same ids: each column
    (rows, positions) at its own width, as sentence-transformers pads them."""
    feats = [theirs.preprocess(texts) for texts in COLUMN_TEXTS[:columns]]
    batch = {}
    for c, f in enumerate(feats):
        ids_key, mask_key = column_keys(c)
        batch[ids_key] = mx.array(f["input_ids"].numpy().astype(np.int32))
        batch[mask_key] = mx.array(f["attention_mask"].numpy().astype(np.int32))
    return feats, batch


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_sentence_transformers(models, case):
    ours_model, theirs_model = models
    make_ours, make_theirs, columns, labels = CASES[case]
    feats, batch = features(theirs_model, columns)
    theirs = make_theirs(theirs_model)
    theirs_model.zero_grad()
    target = torch.tensor(labels) if labels is not None else torch.zeros(ROWS)
    value = theirs(feats, target)
    value.backward()
    named = dict(theirs_model.named_parameters())
    if labels is not None:
        batch["labels"] = mx.array(labels)
    loss = make_ours()

    def ours_value(model):
        return loss.loss(model, batch)[0]

    mine, grads = nn.value_and_grad(ours_model, ours_value)(ours_model)
    grads = dict(tree_flatten(grads))
    print(f"{case}: ours {float(mine):.7f}, sentence-transformers {value.item():.7f}")
    assert abs(float(mine) - float(value)) <= 2e-5 * max(1.0, abs(float(value)))
    for mlx_name, torch_name in WEIGHTS:
        theirs_grad = named[torch_name].grad.numpy()
        scale = max(np.abs(theirs_grad).max(), 1e-6)
        assert np.abs(np.array(grads[mlx_name]) - theirs_grad).max() <= 1e-4 * scale, mlx_name


@pytest.mark.parametrize("multiple", [1, 4])
def test_unpadded_columns_equal_the_padded_pass(models, multiple):
    """The data's real-token index (rounded up to `multiple` with pad positions) makes BERT's
    dense layers run on those rows only (models/layers/unpadding.py): the embeddings, the loss and
    every gradient equal the padded pass's, whose loss equals sentence-transformers'."""
    ours_model, theirs_model = models
    _, padded = features(theirs_model, 4)
    unpadded, masks = dict(padded), [np.array(padded[column_keys(c)[1]]) for c in range(4)]
    assert any(m.sum() < m.size for m in masks)  # pads the padded pass computes, not the other
    for c, mask in enumerate(masks):
        unpadded[token_index_key(c)] = mx.array(real_token_index(mask, multiple))
    loss = MultipleNegativesRankingLoss()
    results = []
    for batch in (padded, unpadded):
        value, grads = nn.value_and_grad(ours_model, lambda m, b=batch: loss.loss(m, b)[0])(
            ours_model)
        results.append((float(value), dict(tree_flatten(grads)), loss.embed(ours_model, batch)))
    (plain, plain_grads, plain_vectors), (packed, packed_grads, packed_vectors) = results
    assert abs(plain - packed) < 1e-6
    for a, b in zip(plain_vectors, packed_vectors):
        assert np.abs(np.array(a) - np.array(b)).max() < 1e-6
    largest = max(float(np.abs(np.array(g)).max()) for g in plain_grads.values())
    for name in plain_grads:
        gap = np.abs(np.array(packed_grads[name]) - np.array(plain_grads[name])).max()
        assert gap <= 1e-5 * largest, (name, gap)


def test_cached_gradients_equal_the_uncached_loss(models):
    """GradCache's point: the same loss and gradients as MNRL over the whole batch."""
    ours_model, theirs_model = models
    _, batch = features(theirs_model, 3)
    results = []
    for loss in (MultipleNegativesRankingLoss(), CachedMultipleNegativesRankingLoss(
            mini_batch_size=2)):
        value, grads = nn.value_and_grad(ours_model, lambda m, f=loss: f.loss(m, batch)[0])(
            ours_model)
        results.append((float(value), dict(tree_flatten(grads))))
    (plain, plain_grads), (cached, cached_grads) = results
    assert abs(plain - cached) < 1e-6
    assert plain_grads.keys() == cached_grads.keys()
    # equal up to the order of float sums: 1e-5 of the largest gradient (a key bias's is 0 in
    # exact arithmetic, the softmax does not see it: both are rounding noise there)
    largest = max(float(np.abs(np.array(g)).max()) for g in plain_grads.values())
    for name in plain_grads:
        gap = np.abs(np.array(cached_grads[name]) - np.array(plain_grads[name])).max()
        assert gap <= 1e-5 * largest, (name, gap)


def test_columns_at_their_own_widths_give_the_loss_of_one_width(models):
    """Each text column padded to its own longest (one forward pass per width) gives the loss
    and gradients of every column padded to the widest and run in one pass."""
    ours_model, theirs_model = models
    _, batch = features(theirs_model, 3)
    width = max(v.shape[1] for v in batch.values())
    assert len({v.shape[1] for v in batch.values()}) > 1  # the columns' widths differ
    wide = {k: mx.pad(v, [(0, 0), (0, width - v.shape[1])]) for k, v in batch.items()}
    loss = MultipleNegativesRankingLoss()
    (own, own_grads), (one, one_grads) = [
        nn.value_and_grad(ours_model, lambda m, b=b: loss.loss(m, b)[0])(ours_model) for b in (batch, wide)]
    assert abs(float(own) - float(one)) <= 1e-6 * max(1.0, abs(float(one)))
    own_grads, one_grads = dict(tree_flatten(own_grads)), dict(tree_flatten(one_grads))
    largest = max(float(np.abs(np.array(g)).max()) for g in one_grads.values())
    for name, grad in one_grads.items():
        assert np.abs(np.array(own_grads[name]) - np.array(grad)).max() <= 1e-5 * largest, name


def test_retrieval_scores_equal_information_retrieval_evaluator():
    """Per-query scores averaged = InformationRetrievalEvaluator's metrics, on the same vectors
    without ties (tied documents are averaged over their orders, where the evaluator takes
    torch.topk's: tests/test_tied_rankings.py)."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    rng = np.random.default_rng(0)
    docs = rng.normal(size=(150, 12)).astype(np.float32)
    queries = (docs[rng.integers(0, 150, 40)] + rng.normal(size=(40, 12)) * 1.2).astype(np.float32)
    doc_ids, query_ids = [f"d{i:03d}" for i in range(150)], [f"q{i}" for i in range(40)]
    relevant = {q: {doc_ids[j] for j in rng.choice(150, rng.integers(1, 4), replace=False)}
                for q in query_ids[:35]}  # 5 queries without judgements are left out
    relevant["q0"] |= {"d010", "d042"}
    vectors = {"query": torch.tensor(queries), "document": torch.tensor(docs)}

    class SameVectors(InformationRetrievalEvaluator):
        def embed_inputs(self, model, sentences, encode_fn_name=None, **kwargs):
            return vectors[encode_fn_name][[int(s[1:]) for s in sentences]]

    evaluator = SameVectors({q: q for q in query_ids}, {d: d for d in doc_ids}, relevant,
                            map_at_k=[100], write_csv=False)
    evaluator.score_functions = {"cosine": st.util.cos_sim}
    evaluator._score_functions_from_model = False
    theirs = evaluator.compute_metrices(None)["cosine"]
    ours = score_retrieval("t", queries, query_ids, docs, doc_ids, relevant)
    assert len(ours.rows) == 35 and [r["id"] for r in ours.rows] == query_ids[:35]
    for name in SCORES:
        metric, k = name.rsplit("_at_", 1)
        expected = float(theirs[f"{metric}@k"][int(k)])
        assert ours.metrics[name] == pytest.approx(expected, abs=1e-12), name
