"""Embedders on the one training loop (experiment=embed_retrieval on the tiny random BERT folder
of embedder_fixtures): a run scores its retrieval set per query, writes its best weights as a
sentence-transformers folder that scores the same, and pairs query by query against a base
model's evaluation (trainer.max_steps=0); bad input is one line before a run folder exists; a
SIGKILLed run resumes bitwise (slow); and, slow, the real all-MiniLM-L6-v2 fine-tuned on the
shipped jargon task beats its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import compose_cfg
from embedder_fixtures import write_tiny_folder
from mlxlab.config import asset_path, validate
from mlxlab.data.beir import read_beir
from mlxlab.errors import ConfigError
from mlxlab.evaluation.paired import pair_runs
from mlxlab.evaluation.run_scores import folder_scores
from mlxlab.models.embedders.sentence_folder import TextEmbedder
from mlxlab.objectives.embedding.retrieval import score_retrieval

FAST = ["experiment=embed_retrieval", "tracking=none", "callbacks.progress.enabled=false",
        "trainer.batch_size=16", "trainer.eval_every_steps=4", "trainer.log_every_steps=2",
        "trainer.schedule.warmup_steps=0", "optimizer.learning_rate=1e-3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "st")


def train_in(root: Path, *overrides: str) -> tuple[Path, dict]:
    from mlxlab.train import train

    cfg = compose_cfg(root, overrides)
    try:
        metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir), metrics


def test_fine_tune_pairs_with_its_base_query_by_query(tiny, tmp_path):
    base_dir, base = train_in(tmp_path / "base", *FAST, f"model.pretrained={tiny}",
                              "trainer.max_steps=0")
    run_dir, tuned = train_in(tmp_path / "tuned", *FAST, f"model.pretrained={tiny}",
                              "trainer.max_steps=8", "objective=matryoshka",
                              "objective.matryoshka_dims=[16,8]")
    assert base["best_step"] == 0 and tuned["best_step"] > 0
    # the written folder is the best checkpoint: it scores the held-out queries as the run did
    found = read_beir(asset_path("jargon_retrieval/jargon"))
    embedder = TextEmbedder(run_dir / "sentence_transformer")
    again = score_retrieval("jargon", embedder.encode(found.queries), found.query_ids,
                            embedder.encode(found.corpus), found.corpus_ids, found.relevant)
    assert again.metrics["ndcg_at_10"] == pytest.approx(tuned["val/ndcg_at_10"], abs=1e-6)
    saved = folder_scores(run_dir)["jargon"]
    summary = json.loads((run_dir / "eval_tasks" / "best" / "summary.json").read_text())
    assert summary["step"] == tuned["best_step"] and len(saved.rows) == 200
    assert np.mean([r["ndcg_at_10"] for r in saved.rows]) == pytest.approx(
        tuned["val/ndcg_at_10"])
    paired = {p.metric: p for p in pair_runs(folder_scores(base_dir), folder_scores(run_dir))}
    assert set(paired) == {"ndcg_at_10", "mrr_at_10", "map_at_100", "recall_at_10",
                           "accuracy_at_1"}
    ndcg = paired["ndcg_at_10"]  # the paired means are the runs' own figures
    assert ndcg.n == 200 and ndcg.a == pytest.approx(base["val/ndcg_at_10"])
    assert ndcg.b == pytest.approx(tuned["val/ndcg_at_10"])
    assert paired["accuracy_at_1"].test == "mcnemar"


def _refusal(tmp_path: Path, *overrides: str) -> str:
    cfg = compose_cfg(tmp_path, ["experiment=embed_retrieval", *overrides])
    try:
        with pytest.raises(ConfigError) as err:
            validate(cfg)
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "outputs").exists()
    return str(err.value)


def test_bad_input_is_one_line_before_anything_exists(tiny, tmp_path):
    beir = tmp_path / "beir"
    shutil.copytree(asset_path("jargon_retrieval/jargon"), beir)
    with open(beir / "qrels" / "test.tsv", "a") as f:
        f.write("q3\tnowhere\t1\n")
    line = _refusal(tmp_path, f"model.pretrained={tiny}", f"data.eval_dir={beir}")
    assert "corpus id 'nowhere' is not in corpus.jsonl" in line and "test.tsv:202" in line
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": " "}\n')
    line = _refusal(tmp_path, f"model.pretrained={tiny}", f"data.train_file={rows}")
    assert "rows.jsonl:2: 'positive' is empty" in line
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny, decoder)
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    assert "neither an encoder mlxlab reads" in _refusal(tmp_path, f"model.pretrained={decoder}")
    line = _refusal(tmp_path, f"model.pretrained={tiny}", "objective=cosent")
    assert "CoSENTLoss" in line and "'score'" in line
    line = _refusal(tmp_path, f"model.pretrained={tiny}", "data.eval_dir=null")
    assert "optimized_metric=val/ndcg_at_10" in line


def test_dynamic_batching_is_refused_before_a_run_folder(tiny, tmp_path, cli_env):
    """In-batch negatives need fixed batches: `mlxlab train` with trainer.batching.dynamic=true
    is one line and exit 2 from the config checks, with no outputs/ folder; the data module
    built outside a run refuses the same at its first batch."""
    from conftest import mlxlab
    from mlxlab.data.batching import Batching
    from mlxlab.data.sentence_pairs import SentencePairs

    out = mlxlab("train", "experiment=embed_retrieval", f"model.pretrained={tiny}",
                 "trainer.batching.dynamic=true", "tracking=none", env=cli_env)
    line = ("data=sentence_pairs makes fixed batches (the rows of a batch are scored together): "
            "set trainer.batching.dynamic=false")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"mlxlab: error: {line}", out.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()
    data = SentencePairs(str(asset_path("jargon_retrieval/train.jsonl")),
                         tokenizer={"path": str(tiny / "tokenizer.json")})
    data.setup()
    with pytest.raises(ConfigError, match=r"set trainer\.batching\.dynamic=false"):
        next(data.train_batches(Batching(batch_size=4, dynamic=True), 0))
    assert len(next(data.train_batches(Batching(batch_size=4), 0))["index"]) == 4


@pytest.mark.slow  # three runs in subprocesses
def test_a_sigkilled_embedder_run_resumes_bitwise(tiny, tmp_path, cli_env):
    from test_resume import assert_resumes_bitwise

    args = [*FAST, f"model.pretrained={tiny}", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            "tracking=mlflow", "trainer.max_steps=10", "trainer.eval_every_steps=5",
            "checkpoint.save_every_steps=5", "checkpoint.save_every_minutes=null",
            "objective=cached_mnrl", "objective.mini_batch_size=4"]
    args.remove("tracking=none")
    assert_resumes_bitwise(args, tmp_path, cli_env, "embedder")


@pytest.mark.slow  # the real all-MiniLM-L6-v2: a base evaluation and a fine-tune, ~2 min
def test_minilm_learns_the_jargon_and_sentence_transformers_reads_the_folder(tmp_path):
    """An epoch of MNRL lifts the held-out nDCG@10 over the base's, the per-query verdict
    says so, and sentence-transformers reads the written folder: its vectors equal ours."""
    from sentence_transformers import SentenceTransformer

    from mlxlab.evaluation.paired import verdict
    from real_models import MINILM, packaged_folder

    minilm = packaged_folder(MINILM)
    common = [*FAST[:3], f"model.pretrained={minilm}", "trainer.batch_size=32",
              "optimizer.learning_rate=5e-5", "callbacks.early_stopping.patience=0"]
    base_dir, base = train_in(tmp_path / "base", *common, "trainer.max_steps=0")
    run_dir, tuned = train_in(tmp_path / "tuned", *common, "trainer.max_epochs=1",
                              "trainer.eval_every_steps=null")
    (ndcg,) = [p for p in pair_runs(folder_scores(base_dir, "last"), folder_scores(run_dir, "last"))
               if p.metric == "ndcg_at_10"]
    print(f"base {base['val/ndcg_at_10']:.4f} -> {tuned['val/ndcg_at_10']:.4f}; {verdict(ndcg)}")
    assert ndcg.low > 0 and verdict(ndcg).startswith("B is better")
    texts = ["Which striped lizard of the swamp eats rocks?", "Survey note: a dull text."]
    theirs = SentenceTransformer(str(run_dir / "sentence_transformer"), device="cpu").encode(texts)
    ours = TextEmbedder(run_dir / "sentence_transformer").encode(texts)
    assert np.abs(theirs - ours).max() < 1e-5


def test_texts_are_cut_where_the_encoder_has_positions(tiny, tmp_path):
    """A folder with no max_seq_length and the tokenizer's "no limit" (1e30) cuts texts at the
    encoder's max_position_embeddings, a RoBERTa's less its pad offset (its positions start at
    pad_token_id + 1), as sentence-transformers does; a given max_seq_length below it wins."""
    import json
    import shutil

    from mlxlab.data.rerank import pair_tokenizer
    from mlxlab.data.sentence_pairs import SentencePairs

    folder = tmp_path / "st"
    shutil.copytree(tiny, folder)
    (folder / "sentence_bert_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    config = json.loads((folder / "config.json").read_text())
    rows = asset_path("jargon_retrieval/train.jsonl")

    def cut() -> tuple[int, int]:
        data = SentencePairs(str(rows), tokenizer={"path": str(folder / "tokenizer.json")})
        data.setup()
        return data.max_length, pair_tokenizer(folder / "tokenizer.json").truncation["max_length"]

    assert cut() == (config["max_position_embeddings"],) * 2
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "roberta",
                                                    "pad_token_id": 1}))
    assert cut() == (config["max_position_embeddings"] - 2,) * 2
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 7}))
    assert cut() == (7, 7)
