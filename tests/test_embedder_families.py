"""Embedders beyond BERT: RoBERTa and XLM-RoBERTa (positions counted from pad_token_id + 1), a
Qwen3 decoder as Qwen3-Embedding lays one out (mlx-lm's decoder stack, last-token pooling,
left padding, an instruction prompt) and ModernBERT (mlx-embeddings' MLX code, global and
sliding-window layers), each a tiny random model written by transformers and
sentence-transformers: mlxlab's vectors equal sentence-transformers' `encode`, and a ModernBERT
fine-tunes on the training loop into a folder sentence-transformers reads (slow: the reference
is sentence-transformers', ~15 s to import on 2 cores). By default: a decoder's vector does not
depend on which side its batch is padded; a ModernBERT folder without mlx-embeddings is one
line."""

from __future__ import annotations

import numpy as np
import pytest

from embedder_families import QUERY_PROMPT, TEXTS, write_modernbert, write_qwen3, write_roberta
from mlxlab.errors import ConfigError
from mlxlab.models.embedders.sentence_folder import TextEmbedder


def assert_equal_vectors(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    gap = float(np.abs(ours - reference).max())
    print(f"{what}: max abs diff {gap:.3g}")
    assert ours.shape == reference.shape and gap < 1e-5, (what, gap)


def write_family(family: str, folder):
    if family == "modernbert":
        pytest.importorskip("mlx_embeddings", reason="ModernBERT runs on mlx-embeddings")
        return write_modernbert(folder)
    return (write_qwen3(folder) if family == "qwen3"
            else write_roberta(folder, xlm=family == "xlm-roberta"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "qwen3", "modernbert"])
def test_family_matches_sentence_transformers(family, tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    folder = write_family(family, tmp_path / family)
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

    from mlxlab.models.embedders.embedder import SentenceEmbedder

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


def test_modernbert_without_mlx_embeddings_is_one_line(tmp_path, monkeypatch):
    import json
    import sys

    from mlxlab.models.embedders.embedder_model import EmbedderModel

    folder = tmp_path / "modernbert"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "modernbert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48}))
    for name in ("mlx_embeddings", "mlx_embeddings.models", "mlx_embeddings.models.modernbert"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (imported or not)
    with pytest.raises(ConfigError, match=r"^a ModernBERT encoder runs on mlx-embeddings' MLX "
                       r"code: pip install \"mlxlab\[modernbert\]\"$"):
        EmbedderModel.check_config({"pretrained": str(folder)})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "modernbert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "hidden_activation": "silu"}))
    with pytest.raises(ConfigError, match="hidden_activation='silu'; mlxlab's ModernBERT has gelu"):
        EmbedderModel.check_config({"pretrained": str(folder)})


@pytest.mark.slow  # sentence-transformers writes the folder and reads the fine-tune back
@pytest.mark.parametrize("family", ["modernbert", "qwen3"])
def test_a_family_fine_tunes_and_sentence_transformers_reads_it(family, tmp_path):
    """A few MNRL steps, every weight and with LoRA (each encoder's default layers: Wqkv in
    ModernBERT): the best evaluation is after step 0, the written folder holds new weights, and
    sentence-transformers' vectors of it equal mlxlab's."""
    st = pytest.importorskip("sentence_transformers")
    from test_embedding_training import FAST, train_in

    base = write_family(family, tmp_path / "base")
    before = TextEmbedder(base).encode(TEXTS)
    for name, extra in [("full", []), ("lora", ["model.lora.rank=4"])]:
        run_dir, metrics = train_in(tmp_path / name, *FAST, f"model.pretrained={base}",
                                    "trainer.max_steps=8", *extra)
        assert metrics["best_step"] > 0, name
        written = run_dir / "sentence_transformer"
        ours = TextEmbedder(written).encode(TEXTS)
        assert float(np.abs(ours - before).max()) > 1e-3, name  # the weights moved
        assert_equal_vectors(ours, st.SentenceTransformer(str(written), device="cpu").encode(
            TEXTS, batch_size=4), f"{family} fine-tuned ({name})")
