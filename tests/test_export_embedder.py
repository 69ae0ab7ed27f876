"""`mlxlab export` of a text embedder: a sentence-transformers folder written from the model whose
files, read back, give sentence-transformers' own vectors (the tiny folder's stored reference by
default; sentence-transformers reading the written folder of all-MiniLM-L6-v2, RoBERTa and a
Qwen3 decoder embedder in the slow run), and a BERT embedder as GGUF that llama.cpp itself (the
xllamacpp wheel) embeds with cosine >= 1 - 1e-4 to mlxlab's vectors; quantized (an embedder run
of the tiny BERT; all-MiniLM-L6-v2 in the slow run), the file's retention measured in llama.cpp
(cosine to the source's vectors, the run's held-out nDCG@10), recorded on a tracked run's MLflow
run (slow), and q4_0 refused under the cosine floor unless --accept-loss. What an embedder export cannot write is one line, exit 2, nothing
written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder_fixtures import TEXTS, stored_reference, write_tiny_folder
from mlxlab.cli.main import main
from mlxlab.models.embedders.sentence_folder import TextEmbedder


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


CANNOT = {"dense to gguf": (["--format", "gguf"], "Dense layer"),
          "hf format": (["--format", "hf"], "--format hf does not apply"),
          "quant for a folder": (["--format", "sentence-transformers", "--quant", "f16"], "--quant"),
          "out not empty": (["--format", "sentence-transformers", "--no-check"], "not empty"),
          "not an embedder": (["--format", "sentence-transformers"], "no modules.json"),
          "k-quant": (["--format", "gguf", "--quant", "q4_k_m"], "gguf-py has no K-quants"),
          "unjudged quant": (["--format", "gguf", "--quant", "q8_0", "--no-check"],
                             "judged by its retention"),
          "exact with accept-loss": (["--format", "gguf", "--quant", "f16", "--accept-loss"],
                                     "drop --accept-loss"),
          "folder with accept-loss": (["--format", "sentence-transformers", "--accept-loss"],
                                      "--accept-loss does not apply")}


@pytest.mark.parametrize("case", list(CANNOT))
def test_what_an_embedder_export_cannot_write_is_one_line(tmp_path, capsys, case):
    source = write_tiny_folder(tmp_path / "tiny")
    argv, says = CANNOT[case]
    out = tmp_path / ("e.gguf" if "gguf" in argv else "out")
    if case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    target = tmp_path if case == "not an embedder" else source
    assert main(["export", str(target), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlxlab export: error: "), err
    print(err[0])
    assert says in err[0]
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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """A few steps of experiment=embed_retrieval on the mean-pooled tiny BERT: a run with the
    shipped BEIR set (data.eval_dir) and its base, the folder it started from."""
    from test_embedding_training import FAST, train_in

    root = tmp_path_factory.mktemp("embedder_run")
    source = mean_pooled_bert(root / "bert")
    return train_in(root / "run", *FAST, f"model.pretrained={source}", "trainer.max_steps=4")


def test_a_q8_0_embedder_run_keeps_its_vectors_and_queries_in_llama_cpp(tiny_run):
    """q8_0 of an embedder run: the matrices Q8_0 and the rest F32 as llama.cpp's converter
    leaves them; its retention measured in llama.cpp on the probe and the run's 200 held-out
    queries, the source's nDCG@10 the run's own."""
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    import gguf

    from mlxlab.export.gguf_embedder import export_embedder_gguf

    run, metrics = tiny_run
    report = export_embedder_gguf(run, run.parent / "q8.gguf", "q8_0")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(run.parent / "q8.gguf").tensors}
    kept_f32 = [n for n in kinds if n.endswith(("norm.weight", ".bias"))
                or n.startswith(("position_embd", "token_types"))]
    assert {kinds[n] for n in kept_f32} == {"F32"} and len(kept_f32) == 24
    assert {kinds[n] for n in kinds if n not in kept_f32} == {"Q8_0"}  # token_embd with them
    assert report["tensor_types"] == {"Q8_0": 13, "F32": 24}
    entry = report["retention"]
    cosine, ndcg = entry["measures"]
    for m in entry["measures"]:
        print(m["line"])
    assert cosine["n"] == 7 + 400 and cosine["mean"] > 0.9999 and cosine["min"] > 0.9998
    assert ndcg["measure"] == "jargon/ndcg_at_10" and ndcg["n"] == 200
    assert ndcg["run"] == pytest.approx(metrics["val/ndcg_at_10"], abs=1e-6)
    assert ndcg["base"] is not None and entry["base"].endswith("bert")
    assert entry["verdict"] == "kept" and not ndcg["lost"]
    assert entry["recorded"].startswith("the run has no MLflow run")  # tracking=none


def test_q4_0_under_the_floor_is_refused_unless_accepted(tiny_run, capsys):
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    run, _ = tiny_run
    out = run.parent / "q4.gguf"
    argv = ["export", str(run), "--format", "gguf", "--quant", "q4_0", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    print(err)
    assert err.startswith("mlxlab export: error: refused: the written file loses the embedder: "
                          "probe/cosine:") and "under the floor 0.99" in err
    assert not out.exists() and not [p for p in run.parent.iterdir() if p.name.startswith(".")]
    assert main([*argv, "--accept-loss"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "written with --accept-loss although it lost on probe/cosine" in printed
    assert "jargon/ndcg_at_10:" in printed and out.is_file()


@pytest.mark.slow  # a tracked run and an export in subprocesses, llama.cpp embedding: ~30 s
def test_a_tracked_embedder_runs_q8_0_retention_is_on_its_mlflow_run(tmp_path, cli_env):
    """`mlxlab train` of the tiny BERT embedder tracked in a sqlite store, then `mlxlab export
    RUN --format gguf --quant q8_0`: the retention figures are on the run's MLflow run as a
    decoder export writes them (export/<file>/<measure>[/kept] at the checkpoint's step, the
    entry as exports/<file>/retention.json), the figures the report prints."""
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    from mlflow import MlflowClient

    from conftest import mlxlab
    from test_embedding_training import FAST

    source = mean_pooled_bert(tmp_path / "bert")
    uri, run = f"sqlite:///{tmp_path}/mlruns/mlflow.db", tmp_path / "run"
    done = mlxlab("train", *[a for a in FAST if a != "tracking=none"], "tracking=mlflow",
                  f"tracking.uri={uri}", f"model.pretrained={source}", "trainer.max_steps=4",
                  f"hydra.run.dir={run}", env=cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tiny-q8.gguf"
    done = mlxlab("export", run, "--format", "gguf", "--quant", "q8_0", "--out", out,
                  env=cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "retention recorded: on the run's MLflow run" in done.stdout, done.stdout[-2000:]
    client = MlflowClient(tracking_uri=uri)
    (tracked,) = client.search_runs(client.get_experiment_by_name("embed_retrieval")
                                    .experiment_id)
    artifact = client.download_artifacts(tracked.info.run_id,
                                         f"exports/{out.name}/retention.json", str(tmp_path))
    stored = json.loads(Path(artifact).read_text())
    measures = {m["measure"]: m for m in stored["measures"]}
    assert set(measures) == {"probe/cosine", "jargon/ndcg_at_10"} and stored["verdict"] == "kept"
    metrics = tracked.data.metrics
    assert metrics[f"export/{out.name}/probe/cosine"] == pytest.approx(
        measures["probe/cosine"]["mean"]) and measures["probe/cosine"]["mean"] > 0.9999
    ndcg = measures["jargon/ndcg_at_10"]
    assert metrics[f"export/{out.name}/jargon/ndcg_at_10"] == pytest.approx(ndcg["export"])
    assert metrics[f"export/{out.name}/jargon/ndcg_at_10/kept"] == pytest.approx(ndcg["kept"])
    assert ndcg["run"] == pytest.approx(metrics["val/ndcg_at_10"], abs=1e-6)
    history = client.get_metric_history(tracked.info.run_id, f"export/{out.name}/probe/cosine")
    assert [m.step for m in history] == [4]  # the checkpoint's step
    for m in stored["measures"]:  # the figures the export printed
        assert m["line"] in done.stdout


@pytest.mark.slow  # the real all-MiniLM-L6-v2: a base evaluation run and three exports, ~1 min
def test_all_minilm_l6_v2_q8_0_in_llama_cpp_keeps_the_f32_vectors(tmp_path):
    """A run of all-MiniLM-L6-v2 (its base evaluation on the shipped BEIR set) as f32, q8_0 and
    q4_0 GGUF: llama.cpp's q8_0 vectors against its f32 ones have cosine >= 0.99 on every text
    (measured: min 0.9984, mean 0.9997), and q4_0's reported retention is lower than q8_0's."""
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    from mlxlab.config import asset_path
    from mlxlab.data.beir import read_beir
    from mlxlab.export.embedder import PROBE
    from mlxlab.export.embedder_retention import cosines, llama_cpp_vectors
    from mlxlab.export.gguf_embedder import export_embedder_gguf
    from real_models import packaged_folder
    from test_embedding_training import FAST, train_in

    run, _ = train_in(tmp_path / "run", *FAST[:3], f"model.pretrained={packaged_folder()}",
                      "trainer.max_steps=0")
    reports = {q: export_embedder_gguf(run, tmp_path / f"{q}.gguf", q, accept_loss=q == "q4_0")
               for q in ("f32", "q8_0", "q4_0")}
    assert reports["f32"]["check"]["min_cosine"] >= 1 - 1e-4
    embedder = TextEmbedder(run / "sentence_transformer")
    held_out = read_beir(asset_path("jargon_retrieval/jargon"))
    texts = [*PROBE, *held_out.queries, *held_out.corpus]
    exact, q8 = (llama_cpp_vectors(embedder, tmp_path / f"{q}.gguf", texts) for q in ("f32", "q8_0"))
    agreement = cosines(q8, exact)
    print(f"q8_0 vs f32 in llama.cpp on {len(texts)} texts: mean {agreement.mean():.5f}, "
          f"min {agreement.min():.5f}")
    assert agreement.min() >= 0.99 and agreement.mean() >= 0.999
    kept = {q: {m["measure"]: m for m in reports[q]["retention"]["measures"]}
            for q in ("q8_0", "q4_0")}
    for q, measures in kept.items():
        for m in measures.values():
            print(q, m["line"])
    assert kept["q4_0"]["probe/cosine"]["mean"] < kept["q8_0"]["probe/cosine"]["mean"]
    assert kept["q4_0"]["probe/cosine"]["lost"] and not kept["q8_0"]["probe/cosine"]["lost"]
    assert set(kept["q8_0"]) == {"probe/cosine", "jargon/ndcg_at_10"}


def test_an_embedder_run_exports_its_best_weights_as_a_folder(tiny_run, capsys):
    run, _ = tiny_run
    out = run.parent / "folder"
    assert main(["export", str(run), "--format", "sentence-transformers", "--out", str(out),
                 "--no-check"]) == 0
    np.testing.assert_allclose(TextEmbedder(out).encode(TEXTS),
                               TextEmbedder(run / "sentence_transformer").encode(TEXTS), atol=1e-6)
