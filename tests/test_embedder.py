"""Sentence-transformers folders as mlxlab embedders, and `mlxlab embed`: the vectors equal
sentence-transformers' own `encode` on a tiny random BERT folder (every pooling mode, Dense,
Normalize; against its stored vectors by default, recomputed in the slow run) and, in the slow
run, on a tiny BERT written by transformers and sentence-transformers and on the real
all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder_fixtures import (
    DENSE_OUT,
    HIDDEN,
    TEXTS,
    VOCAB,
    live_reference,
    stored_reference,
    write_tiny_folder,
)
from mlxlab.cli.main import main
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.embedders.pooling import POOLERS
from mlxlab.models.embedders.sentence_folder import TextEmbedder, load_sentence_embedder


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min cosine) over the rows."""
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    return float(np.abs(ours - ref).max()), float(cos.min())


def assert_parity(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    max_abs, min_cos = compare(ours, ref)
    print(f"{what}: max abs diff {max_abs:.3g}, min cosine {min_cos:.9f} (1 - {1 - min_cos:.2g})")
    assert ours.shape == ref.shape and max_abs < 1e-5 and min_cos >= 1 - 1e-6, (max_abs, min_cos)


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "full")


def test_tiny_folder_matches_sentence_transformers(tiny_st, tmp_path):
    """All six pooling modes concatenated, Dense (tanh), Normalize; then the bare folder
    (Transformer, Pooling with the legacy CLS + max flags)."""
    reference = stored_reference()
    embedder = TextEmbedder(tiny_st)
    assert embedder.max_length == 24 and embedder.normalizes and embedder.dimension == DENSE_OUT
    ours = embedder.encode(TEXTS, batch_size=4)
    assert_parity(ours, reference["full"], "tiny folder")
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-6)
    bare = TextEmbedder(write_tiny_folder(tmp_path / "bare", bare=True))
    assert bare.dimension == 2 * HIDDEN and not bare.normalizes
    assert_parity(bare.encode(TEXTS, batch_size=2), reference["bare"], "tiny bare folder")


@pytest.mark.slow
def test_stored_reference_is_what_sentence_transformers_computes(tmp_path):
    pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    stored, live = stored_reference(), live_reference(tmp_path)
    for name in ("full", "bare"):
        np.testing.assert_allclose(stored[name], live[name], atol=1e-6,
                                   err_msg="rewrite it: python tests/embedder_fixtures.py")


@pytest.mark.slow
def test_folder_written_by_sentence_transformers_matches(tmp_path):
    """A random BERT built by transformers, in a folder sentence-transformers saves itself
    (its own modules.json and config layout), every pooling mode, Dense and Normalize."""
    st = pytest.importorskip("sentence_transformers",
                             reason="the folder is written by sentence-transformers")
    import torch
    from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(tmp_path / "bert")
    modes = tuple(POOLERS)
    model = st.SentenceTransformer(modules=[
        models.Transformer(str(tmp_path / "bert"), max_seq_length=24),
        models.Pooling(HIDDEN, pooling_mode=modes),
        models.Dense(HIDDEN * len(modes), DENSE_OUT, activation_function=torch.nn.Tanh()),
        models.Normalize()], device="cpu")
    model.save(str(tmp_path / "st"))
    reference = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS,
                                                                                batch_size=4)
    assert_parity(TextEmbedder(tmp_path / "st").encode(TEXTS, batch_size=3), reference,
                  "transformers-built tiny BERT")


def test_normalize_override_and_batching(tiny_st):
    embedder = TextEmbedder(tiny_st)
    raw = embedder.encode(TEXTS, batch_size=len(TEXTS), normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    one_by_one = embedder.encode(TEXTS, batch_size=1)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), one_by_one,
                               atol=1e-6)


def write_folder(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (path / "config.json").write_text(json.dumps(config))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return path


def test_folders_that_are_not_embedders_mlxlab_reads_are_one_line(tmp_path):
    decoder = write_folder(tmp_path / "decoder", {"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ConfigError, match="not a whole llama config .*num_hidden_layers"):
        load_sentence_embedder(decoder)
    other = write_folder(tmp_path / "other", {"model_type": "whisper"})
    with pytest.raises(ConfigError, match="'whisper', neither an encoder .* nor a decoder"):
        load_sentence_embedder(other)
    mpnet = write_folder(tmp_path / "mpnet", {"model_type": "mpnet"})
    with pytest.raises(ConfigError, match="another encoder family.*MPNet and DeBERTa are not supported"):
        load_sentence_embedder(mpnet)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not a sentence-transformers folder"):
        load_sentence_embedder(plain)
    with pytest.raises(MissingFileError, match="no such model folder"):
        load_sentence_embedder(tmp_path / "absent")


def test_embed_cli_writes_npy_and_jsonl(tiny_st, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:3]) + "\n")
    assert main(["embed", str(tiny_st), "--input", str(texts), "--out", str(tmp_path / "v.npy"),
                 "--batch-size", "2"]) == 0
    vectors = np.load(tmp_path / "v.npy")
    np.testing.assert_allclose(vectors, TextEmbedder(tiny_st).encode(TEXTS[:3]), atol=1e-6)
    assert f"embedded 3 texts as {DENSE_OUT}-dim vectors (unit length)" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "dog", "id": "d1"}\n\n{"text": "cat"}\n')
    assert main(["embed", str(tiny_st), "--input", str(rows), "--out", str(tmp_path / "v.jsonl"),
                 "--no-normalize"]) == 0
    out = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ["d1", 1] and len(out[0]["embedding"]) == DENSE_OUT
    assert abs(np.linalg.norm(out[0]["embedding"]) - 1) > 1e-3


@pytest.mark.parametrize("case", ["missing input", "empty input", "not an embedder", "bad jsonl",
                                  "bad out suffix"])
def test_embed_cli_bad_input_is_one_line_and_writes_nothing(tiny_st, tmp_path, capsys, case):
    texts = tmp_path / "texts.txt"
    texts.write_text("" if case == "empty input" else "some text\n")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"txt": "no text key"}\n')
    model = str(tmp_path) if case == "not an embedder" else str(tiny_st)
    source = {"missing input": str(tmp_path / "absent.txt"), "bad jsonl": str(bad_rows)}
    out = tmp_path / ("v.csv" if case == "bad out suffix" else "v.npy")
    assert main(["embed", model, "--input", source.get(case, str(texts)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlxlab embed: error: "), err
    assert not out.exists() and not list(tmp_path.glob(".v.*"))


@pytest.mark.slow
def test_all_minilm_l6_v2_matches_sentence_transformers():
    from real_models import packaged_folder

    folder = packaged_folder()
    texts = ["A man is eating food.", "A man is riding a horse.", "Café naïve résumé, ÀÉÎ",
             "中文 text 日本語", "", "word " * 300, "The new movie is awesome"]
    st = pytest.importorskip("sentence_transformers", reason="the reference is sentence-transformers'")
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=4)
    ours = TextEmbedder(folder).encode(texts, batch_size=3)
    assert ours.shape == (len(texts), 384)
    assert_parity(ours, reference, "all-MiniLM-L6-v2")


def test_default_prompt_goes_before_every_text(tiny_st, tmp_path):
    """sentence-transformers' default_prompt_name: its prompt prefixes each text; a Pooling
    that would leave the prompt out (include_prompt=false) is refused in one line."""
    prompted = tmp_path / "prompted"
    write_tiny_folder(prompted)
    (prompted / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "the ", "document": ""}, "default_prompt_name": "query"}))
    np.testing.assert_allclose(TextEmbedder(prompted).encode(["cat", "dog"]),
                               TextEmbedder(tiny_st).encode(["the cat", "the dog"]), atol=1e-6)
    pooling = prompted / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "include_prompt": False}))
    with pytest.raises(ConfigError, match="include_prompt=false"):
        TextEmbedder(prompted)


def test_pooling_ignores_padding_on_either_side():
    """Every mode gives the same vector for a text right-padded and left-padded."""
    import mlx.core as mx

    from mlxlab.models.embedders.pooling import pool

    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((3, 4)).astype(np.float32)  # 3 real tokens
    pad = rng.standard_normal((2, 4)).astype(np.float32)  # what the encoder put at pads
    right = mx.array(np.concatenate([tokens, pad])[None])
    left = mx.array(np.concatenate([pad, tokens])[None])
    for mode in POOLERS:
        np.testing.assert_allclose(
            np.array(pool(right, mx.array([[1, 1, 1, 0, 0]]), [mode])),
            np.array(pool(left, mx.array([[0, 0, 1, 1, 1]]), [mode])), atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(np.array(pool(right, mx.array([[1, 1, 1, 0, 0]]), ["mean"]))[0],
                               tokens.mean(0), atol=1e-6)


def test_embed_cli_reads_stdin_and_writes_jsonl_to_stdout(tiny_st, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("dog\nthe cat\n"))
    assert main(["embed", str(tiny_st), "--batch-size", "1"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    np.testing.assert_allclose([r["embedding"] for r in rows],
                               TextEmbedder(tiny_st).encode(["dog", "the cat"]), atol=1e-6)
    assert "-> stdout" in captured.err


def test_a_transformer_in_its_own_subfolder(tiny_st, tmp_path):
    """Older sentence-transformers folders keep the Transformer (weights, tokenizer,
    sentence_bert_config.json) in 0_Transformer/."""
    old = tmp_path / "old"
    shutil.copytree(tiny_st, old)
    (old / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "sentence_bert_config.json"):
        (old / name).rename(old / "0_Transformer" / name)
    modules = json.loads((old / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (old / "modules.json").write_text(json.dumps(modules))
    embedder = TextEmbedder(old)
    assert embedder.max_length == 24
    np.testing.assert_allclose(embedder.encode(TEXTS), TextEmbedder(tiny_st).encode(TEXTS),
                               atol=1e-6)
