"""Embedders beyond BERT: RoBERTa and XLM-RoBERTa (positions counted from pad_token_id + 1) and
a Qwen3 decoder as Qwen3-Embedding lays one out (mlx-lm's decoder stack, last-token pooling,
left padding, an instruction prompt), each a tiny random model written by transformers and
sentence-transformers: mlxlab's vectors equal sentence-transformers' `encode` (slow: the
reference is sentence-transformers', ~15 s to import on 2 cores). By default: a decoder's
vector does not depend on which side its batch is padded."""

from __future__ import annotations

import numpy as np
import pytest

from embedder_families import QUERY_PROMPT, TEXTS, write_qwen3, write_roberta
from mlxlab.errors import ConfigError
from mlxlab.models.sentence_folder import TextEmbedder


def assert_equal_vectors(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    gap = float(np.abs(ours - reference).max())
    print(f"{what}: max abs diff {gap:.3g}")
    assert ours.shape == reference.shape and gap < 1e-5, (what, gap)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "qwen3"])
def test_family_matches_sentence_transformers(family, tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    folder = (write_qwen3(tmp_path / family) if family == "qwen3"
              else write_roberta(tmp_path / family, xlm=family == "xlm-roberta"))
    reference_model = st.SentenceTransformer(str(folder), device="cpu")
    embedder = TextEmbedder(folder)
    assert embedder.dimension == 32 and embedder.normalizes
    assert_equal_vectors(embedder.encode(TEXTS, batch_size=3),
                         reference_model.encode(TEXTS, batch_size=4), family)
    if family == "qwen3":  # the instruction prompt, by name as sentence-transformers takes it
        assert embedder.prompt("query") == QUERY_PROMPT and embedder.prompt() == ""
        assert_equal_vectors(embedder.encode(TEXTS, batch_size=3, prompt_name="query"),
                             reference_model.encode(TEXTS, batch_size=4, prompt_name="query"),
                             "qwen3 with the query prompt")
        with pytest.raises(ConfigError, match="'passage' is not one of .*document, query"):
            embedder.encode(["x"], prompt_name="passage")


def test_decoder_vectors_do_not_depend_on_the_padding_side():
    """A Qwen3 stack built from its config (random weights): rows right-padded and the same
    rows left-padded give the same last-token and mean vectors."""
    import mlx.core as mx

    from mlxlab.models.embedder import SentenceEmbedder

    config = {"model_type": "qwen3", "vocab_size": 50, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8, "intermediate_size": 64, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 64, "tie_word_embeddings": True, "rope_theta": 10000.0}
    model = SentenceEmbedder({"hf_config": config}, pooling=["lasttoken", "mean"])
    rows = [[5, 9, 3, 7, 2], [4, 8], [11, 12, 13]]
    width = max(map(len, rows))
    right = mx.array([r + [0] * (width - len(r)) for r in rows])
    left = mx.array([[0] * (width - len(r)) + r for r in rows])
    right_mask = mx.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    left_mask = mx.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    alone = np.concatenate([np.array(model(mx.array([r]))) for r in rows])
    np.testing.assert_allclose(np.array(model(right, right_mask)), alone, atol=1e-5)
    np.testing.assert_allclose(np.array(model(left, left_mask)), alone, atol=1e-5)
