"""MTEB's retrieval tasks on an mlxlab embedder (evaluation/mteb/): mteb's own evaluation of a
retrieval task whose data is made here (an AbsTaskRetrieval subclass that loads it from memory,
as mteb's mock tasks do) on the tiny random BERT embedder, its nDCG@10 against mlxlab's own
retrieval metric on the very vectors mteb asked for; and the one line for a task whose data is
not in the local Hugging Face cache. Nothing touches the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mteb")

from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from embedder_fixtures import write_tiny_folder  # noqa: E402
from mlxlab.errors import ConfigError  # noqa: E402
from mlxlab.evaluation.mteb.encoder import MlxlabEncoder  # noqa: E402
from mlxlab.evaluation.mteb.scores import KIND, score_mteb  # noqa: E402
from mlxlab.evaluation.mteb.tasks import check_mteb_entries  # noqa: E402
from mlxlab.models.embedders.sentence_folder import TextEmbedder  # noqa: E402
from mlxlab.objectives.embedding.retrieval import score_retrieval  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "abc", "zebra", "bed", "fig", "hug", "jam"]


def _texts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    texts: list[str] = []
    while len(texts) < n:  # unique texts: a vector is looked up by its text below
        text = " ".join(rng.choice(WORDS, int(rng.integers(low, high))))
        if text not in texts:
            texts.append(text)
    return texts


def _local_data() -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    rng = np.random.default_rng(3)
    corpus = {f"d{i}": t for i, t in enumerate(_texts(rng, 40, 3, 9))}
    queries = {f"q{i}": t for i, t in enumerate(_texts(rng, 12, 2, 5))}
    qrels = {q: {f"d{j}": 1 for j in rng.choice(40, int(rng.integers(1, 4)), replace=False)}
             for q in queries}
    return corpus, queries, qrels


class LocalRetrieval(AbsTaskRetrieval):
    """A retrieval task whose data is made in memory (no hub dataset behind it)."""

    metadata = TaskMetadata(
        name="LocalRetrieval", description="made in the test", reference=None,
        dataset={"path": "local/none", "revision": "local"}, type="Retrieval", category="t2t",
        modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        corpus, queries, qrels = _local_data()
        self.dataset = {"default": {"test": RetrievalSplitData(
            corpus=Dataset.from_list([{"id": k, "text": v, "title": ""} for k, v in corpus.items()]),
            queries=Dataset.from_list([{"id": k, "text": v} for k, v in queries.items()]),
            relevant_docs=qrels, top_ranked=None)}}
        self.data_loaded = True


class RecordingEncoder(MlxlabEncoder):
    """MlxlabEncoder keeping every text it was asked for and the vector it returned."""

    def __init__(self, embedder: TextEmbedder) -> None:
        super().__init__(embedder)
        self.seen: dict[str, np.ndarray] = {}

    def encode(self, inputs, **kwargs) -> np.ndarray:
        vectors = super().encode(inputs, **kwargs)
        texts = [text for batch in inputs for text in batch["text"]]
        self.seen.update(zip(texts, vectors))
        return vectors


def test_mteb_ndcg_is_mlxlab_ndcg_on_the_same_vectors(tmp_path: Path) -> None:
    encoder = RecordingEncoder(TextEmbedder(write_tiny_folder(tmp_path / "tiny")))
    [scores] = score_mteb(encoder, [LocalRetrieval()], batch_size=8)
    assert scores.task == "LocalRetrieval" and scores.kind == KIND
    corpus, queries, qrels = _local_data()
    assert set(encoder.seen) == {*corpus.values(), *queries.values()}  # every text, once each
    ours = score_retrieval("local", np.stack([encoder.seen[t] for t in queries.values()]),
                           list(queries), np.stack([encoder.seen[t] for t in corpus.values()]),
                           list(corpus), {q: set(docs) for q, docs in qrels.items()})
    assert 0 < scores.metrics["ndcg_at_10"] < 1
    assert scores.metrics["ndcg_at_10"] == pytest.approx(ours.metrics["ndcg_at_10"], abs=1e-5)
    assert scores.metrics["main_score"] == scores.metrics["ndcg_at_10"]
    assert scores.metrics["recall_at_10"] == pytest.approx(ours.metrics["recall_at_10"], abs=1e-5)


def test_uncached_task_is_one_line_and_a_cached_one_passes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        check_mteb_entries(["mteb:SciFact"], cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message == ("mteb:SciFact: its data (mteb/scifact) is not in the local Hugging Face "
                       "datasets cache; load it once where the network is open: python -c "
                       "\"import mteb; mteb.get_task('SciFact').load_data()\" (HF_HUB_OFFLINE "
                       "unset)")
    # where datasets keeps a dataset it prepared (<org>___<name>/<config>/<version>/<hash>)
    (tmp_path / "mteb___scifact" / "corpus" / "0.0.0" / "f00d").mkdir(parents=True)
    [task] = check_mteb_entries(["mteb:SciFact"], cache_dir=str(tmp_path))
    assert task.metadata.name == "SciFact"


def test_eval_verb_refuses_an_uncached_task_before_loading(tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    import datasets.config

    from mlxlab.cli.main import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    store = tmp_path / "mlruns"
    code = main(["eval", str(tmp_path / "no-model"), "--tasks", "mteb:SciFact",
                 "--uri", store.as_uri()])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not store.exists()
    assert err.startswith("mlxlab eval: error: mteb:SciFact: its data (mteb/scifact) is not in")


@pytest.mark.parametrize(("tasks", "start"), [
    ("mteb:SciFct", "mteb:SciFct: mteb has no task 'SciFct' "
     "(Did you mean: 'SciFact'?)"),
    ("mteb:STS12", "mteb:STS12 is an MTEB STS task; mlxlab scores MTEB's Retrieval tasks"),
    ("mteb:SciFact,mc.jsonl", "mc.jsonl beside mteb:SciFact: MTEB tasks score a text embedder"),
])
def test_eval_verb_refuses_other_entries(tmp_path: Path, capsys, tasks: str, start: str) -> None:
    from mlxlab.cli.main import main

    assert main(["eval", str(tmp_path), "--tasks", tasks, "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"mlxlab eval: error: {start}"), err


def test_training_eval_tasks_refuse_mteb() -> None:
    from mlxlab.evaluation.settings import TaskSettings

    with pytest.raises(ConfigError, match=r"^eval.tasks: mteb:SciFact is an MTEB task, not "
                       r"scored at a training run's evaluations; score the finished embedder "
                       r"with `mlxlab eval RUN --tasks mteb:SciFact`$"):
        TaskSettings(tasks=("mteb:SciFact",))


@pytest.mark.slow  # mteb's evaluation again, and an MLflow store
def test_eval_verb_scores_prints_and_logs_an_mteb_task(tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    """`mlxlab eval FOLDER --tasks mteb:LocalRetrieval --json` with the task made here standing
    for a cached one (the name check and the cache check give it back): mteb's figures printed,
    and logged as eval/<task>/<metric> in an eval run."""
    import json

    from mlflow import MlflowClient

    import mlxlab.evaluation.mteb.tasks as mteb_tasks
    from mlxlab.cli.main import main

    monkeypatch.setattr(mteb_tasks, "check_mteb_entries", lambda entries: [LocalRetrieval()])
    folder = write_tiny_folder(tmp_path / "tiny")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    [expected] = score_mteb(MlxlabEncoder(TextEmbedder(folder)), [LocalRetrieval()], 8)
    capsys.readouterr()
    assert main(["eval", str(folder), "--tasks", "mteb:LocalRetrieval", "--uri", uri,
                 "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    task = report["tasks"]["LocalRetrieval"]
    assert report["kind"] == "sentence-transformers" and task["kind"] == KIND
    assert task["metrics"]["ndcg_at_10"]["value"] == expected.metrics["ndcg_at_10"]
    run = MlflowClient(tracking_uri=uri).get_run(report["run_id"])
    assert run.data.metrics["eval/LocalRetrieval/ndcg_at_10"] == pytest.approx(
        expected.metrics["ndcg_at_10"])
    assert run.data.params["tasks"] == "mteb:LocalRetrieval"
