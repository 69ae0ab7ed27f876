"""`mlxlab export` of a text embedder: a sentence-transformers folder written from the model whose
files, read back, give sentence-transformers' own vectors (the tiny folder's stored reference by
default; sentence-transformers reading the written folder of all-MiniLM-L6-v2, RoBERTa and a
Qwen3 decoder embedder in the slow run), and a BERT embedder as GGUF that llama.cpp itself (the
xllamacpp wheel) embeds with cosine >= 1 - 1e-4 to mlxlab's vectors. What an embedder export
cannot write is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder_fixtures import TEXTS, stored_reference, write_tiny_folder
from mlxlab.cli.main import main
from mlxlab.models.sentence_folder import TextEmbedder


def mean_pooled_bert(folder: Path) -> Path:
    """The tiny BERT folder reduced to what llama.cpp's BERT graph computes: mean pooling, no
    Dense, Normalize."""
    write_tiny_folder(folder)
    shutil.rmtree(folder / "2_Dense")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([modules[0], modules[1], modules[3]]))
    return folder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_sentence_transformers_folder_read_back_equals_the_reference(tmp_path, capsys):
    """The tiny folder (six poolings, Dense, Normalize) exported: the written folder is laid out
    as sentence-transformers reads one and its vectors are sentence-transformers' (stored
    reference)."""
    source = write_tiny_folder(tmp_path / "tiny")
    out = tmp_path / "exported"
    assert main(["export", str(source), "--format", "sentence-transformers", "--out", str(out),
                 "--no-check"]) == 0
    assert "read back: max |vector gap| mlxlab 0" in capsys.readouterr().out
    kinds = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert kinds == [f"sentence_transformers.models.{k}"
                     for k in ("Transformer", "Pooling", "Dense", "Normalize")]
    assert (out / "model.safetensors").is_file() and (out / "2_Dense" / "model.safetensors").is_file()
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["why_not_sentence_transformers"] == "--no-check"
    np.testing.assert_allclose(TextEmbedder(out).encode(TEXTS), stored_reference()["full"],
                               atol=1e-5)


def test_bert_embedder_as_gguf_embeds_in_llama_cpp(tmp_path, capsys):
    xl = pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    source = mean_pooled_bert(tmp_path / "bert")
    out = tmp_path / "bert.gguf"
    assert main(["export", str(source), "--format", "gguf", "--quant", "f32", "--out",
                 str(out)]) == 0
    assert "checked in llama.cpp" in capsys.readouterr().out
    embedder = TextEmbedder(source)  # llama.cpp does not truncate: the texts that fit whole
    texts = [t for t, ids in zip(TEXTS, embedder.token_ids(TEXTS)) if len(ids) < 24]
    assert len(texts) == len(TEXTS) - 1
    params = xl.CommonParams()  # the file read again here, apart from the export's own check
    params.model.path, params.embedding, params.n_ctx = str(out), True, 64
    answer = xl.Server(params).handle_embeddings({"input": texts})
    theirs = np.array([r["embedding"] for r in sorted(answer["data"], key=lambda r: r["index"])])
    ours = embedder.encode(texts)
    print("min cosine llama.cpp vs mlxlab:", cosines(theirs, ours).min())
    assert cosines(theirs, ours).min() >= 1 - 1e-4


@pytest.mark.parametrize("case", ["dense to gguf", "hf format", "quant for a folder",
                                  "out not empty", "not an embedder"])
def test_what_an_embedder_export_cannot_write_is_one_line(tmp_path, capsys, case):
    source = write_tiny_folder(tmp_path / "tiny")
    out = tmp_path / ("e.gguf" if case == "dense to gguf" else "out")
    if case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    argv = {"dense to gguf": ["--format", "gguf"], "hf format": ["--format", "hf"],
            "quant for a folder": ["--format", "sentence-transformers", "--quant", "f16"],
            "out not empty": ["--format", "sentence-transformers", "--no-check"],
            "not an embedder": ["--format", "sentence-transformers"]}[case]
    target = tmp_path if case == "not an embedder" else source
    assert main(["export", str(target), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlxlab export: error: "), err
    print(err[0])
    assert not (out.exists() and case != "out not empty")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["minilm", "roberta", "qwen3"])
def test_sentence_transformers_reads_the_written_folder(family, tmp_path):
    """The export, with its own check (mlxlab and sentence-transformers reading the written
    folder), then sentence-transformers reading it here: the source's vectors to 1e-5."""
    st = pytest.importorskip("sentence_transformers", reason="the reader is sentence-transformers")
    from embedder_families import write_qwen3, write_roberta
    from mlxlab.export.embedder import export_embedder
    from real_models import packaged_folder

    source = {"minilm": packaged_folder, "roberta": lambda: write_roberta(tmp_path / "roberta"),
              "qwen3": lambda: write_qwen3(tmp_path / "qwen3")}[family]()
    report = export_embedder(source, tmp_path / "out")
    assert set(report["check"]["max_abs_gap"]) == {"mlxlab", f"sentence-transformers {st.__version__}"}
    texts = ["A man is eating food.", "Café naïve résumé, ÀÉÎ", "", "word " * 300]
    written = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    for prompt in [None, *TextEmbedder(source).prompts]:
        gap = np.abs(written.encode(texts, prompt_name=prompt)
                     - TextEmbedder(source).encode(texts, prompt_name=prompt)).max()
        print(f"{family} (prompt {prompt}): sentence-transformers on the export vs mlxlab on the "
              f"source: {gap:.3g}")
        assert gap < 1e-5


@pytest.mark.slow
def test_all_minilm_l6_v2_as_f16_gguf_in_llama_cpp(tmp_path):
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    from mlxlab.export.gguf_embedder import export_embedder_gguf
    from real_models import packaged_folder

    report = export_embedder_gguf(packaged_folder(), tmp_path / "minilm.gguf", "f16")
    print(report["check"])
    assert report["check"]["status"] == "checked" and report["check"]["min_cosine"] >= 1 - 1e-4
    assert (tmp_path / "minilm.gguf").stat().st_size == report["bytes"]
