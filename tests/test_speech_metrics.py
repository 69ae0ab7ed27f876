"""Word error rate per utterance: Whisper's normalization, jiwer's counts, the corpus rate, the
paired verdict of two runs (its direction: lower is better) and the refusal to pair runs scored
on different utterances; then the whole pipeline on a tiny random Whisper folder (a random
model's WER is ~100 %: the test checks the plumbing, not the number)."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import numpy as np
import pytest

from mlxlab.errors import ConfigError
from mlxlab.evaluation.paired import pair_runs, pair_task, verdict
from mlxlab.evaluation.results import SavedTask, intervals, read_scores, write_scores
from mlxlab.evaluation.scoring import TaskScores
from mlxlab.evaluation.speech.word_errors import (
    SPELLING_MAP,
    corpus_rates,
    score_transcriptions,
    text_normalizer,
    utterance_errors,
)
from mlxlab.evaluation.tasks import TRANSCRIPTION, read_task

# --- one utterance, counted by hand --------------------------------------------------------------


def test_the_cat_sat_against_the_bat_sat_on_is_two_errors_in_three_words():
    e = utterance_errors("the cat sat", "the bat sat on")
    assert (e["errors"], e["words"]) == (2, 3)  # cat -> bat substituted, "on" inserted
    assert (e["substitutions"], e["deletions"], e["insertions"]) == (1, 0, 1)
    assert e["wer"] == pytest.approx(2 / 3)
    # characters: "the cat sat" is 11; c -> b substituted, " on" inserted: 4 of 11
    assert (e["char_errors"], e["chars"]) == (4, 11)
    assert e["cer"] == pytest.approx(4 / 11)


def test_deletions_and_an_empty_transcription():
    e = utterance_errors("one two three four", "one three")
    assert (e["errors"], e["words"], e["deletions"]) == (2, 4, 2)
    silent = utterance_errors("one two three four", "")
    assert (silent["errors"], silent["words"], silent["wer"]) == (4, 4, 1.0)


def test_the_corpus_rate_is_errors_over_words_as_jiwer_not_a_mean_of_rates():
    refs = ["the cat sat", "a b c d e f g h i j", "hello"]
    hyps = ["the bat sat on", "a b c d e f g h i j", "yellow fellow"]
    rows = score_transcriptions(["0", "1", "2"], refs, hyps, text_normalizer("none"))
    # 2 + 0 + 2 errors over 3 + 10 + 1 words
    assert corpus_rates(rows)["wer"] == pytest.approx(4 / 14)
    assert corpus_rates(rows)["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert corpus_rates(rows)["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    mean_of_rates = np.mean([r["wer"] for r in rows])
    assert abs(mean_of_rates - 4 / 14) > 0.3  # (2/3 + 0 + 2) / 3: another number


# --- normalization -------------------------------------------------------------------------------


def test_english_normalizer_spelling_fillers_case_and_numbers():
    norm = text_normalizer("auto", "en")
    assert norm("The COLOUR, uh, is grey!") == "the color is gray"
    assert norm("Twenty-five organisations analysed it.") == "25 organizations analyzed it"
    rows = score_transcriptions(["0"], ["The colour is grey."], ["the color is gray"], norm)
    assert rows[0]["errors"] == 0
    # without normalization the same pair is three errors in four words
    raw = score_transcriptions(["0"], ["The colour is grey."], ["the color is gray"],
                               text_normalizer("none"))
    assert (raw[0]["errors"], raw[0]["words"]) == (3, 4)


def test_normalizers_equal_transformers_whisper_tokenizer_with_the_spelling_map(tmp_path):
    """WhisperTokenizer.normalize reads the checkpoint's normalizer.json: given mlxlab's map it
    normalizes as mlxlab does; basic_normalize is the other languages' normalizer."""
    from transformers import WhisperTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps(
        {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")} | {"<|endoftext|>": 26}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                           normalizer_file=str(SPELLING_MAP))
    texts = ["Mr. Smith's neighbour paid $3.50, didn't he?", "Hmm [NOISE] the theatre (aside)",
             "It's 10% of twenty thousand", "¡Hola, Mundo! ¿Qué tal?", "Grüße aus Köln"]
    english, basic = text_normalizer("english"), text_normalizer("auto", "de")
    for text in texts:
        assert english(text) == " ".join(tok.normalize(text).split())
        assert basic(text) == " ".join(tok.basic_normalize(text).split())
    assert text_normalizer("auto", "es")("¡Hola, Mundo!") == "hola mundo"


def test_a_reference_that_normalizes_to_nothing_is_refused():
    with pytest.raises(ConfigError, match="utterance u7: its reference 'Uh, um.' normalizes"):
        score_transcriptions(["u7"], ["Uh, um."], ["hello"], text_normalizer("english"))
    with pytest.raises(ConfigError, match="eval.normalizer='loud'"):
        text_normalizer("loud")


# --- the task file ------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_task_of_audio_and_text_rows_is_a_transcription_task(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_bytes(b"RIFF")
    task = read_task(write_jsonl(tmp_path / "asr.jsonl", [
        {"id": "a", "audio": "clips/a.wav", "text": "the cat sat"}]))
    assert (task.kind, task.metrics) == (TRANSCRIPTION, ("wer", "cer"))
    assert task.examples[0].audio == str(tmp_path / "clips" / "a.wav")
    assert task.examples[0].text == "the cat sat"
    with pytest.raises(ConfigError, match=r"asr2.jsonl:1: audio file .*b.wav not found"):
        read_task(write_jsonl(tmp_path / "asr2.jsonl", [{"audio": "b.wav", "text": "x"}]))
    with pytest.raises(ConfigError, match="asr3.jsonl:1: an audio row needs text"):
        read_task(write_jsonl(tmp_path / "asr3.jsonl", [{"audio": "clips/a.wav"}]))


def test_a_transcription_task_on_a_language_model_is_refused(tmp_path):
    import mlx.nn as nn

    from mlxlab.evaluation.speech.scoring import check_pairing

    (tmp_path / "a.wav").write_bytes(b"RIFF")
    task = read_task(write_jsonl(tmp_path / "asr.jsonl", [{"audio": "a.wav", "text": "x"}]))
    with pytest.raises(ConfigError, match="^task asr is a transcription task and the model is "
                       "a language model: score transcription tasks"):
        check_pairing(nn.Linear(2, 2), [task])


# --- pairing two runs ---------------------------------------------------------------------------


def saved(name: str, refs: list[str], hyps: list[str], ids: list[str] | None = None
          ) -> SavedTask:
    """A transcription task's scores as a run keeps them (written and read back)."""
    ids = ids or [f"u{i}" for i in range(len(refs))]
    rows = score_transcriptions(ids, refs, hyps, text_normalizer("english"))
    return SavedTask(name, TRANSCRIPTION, corpus_rates(rows), rows)


REFS = [f"the {w} sat on the mat today" for w in
        ["cat", "dog", "bird", "fish", "cow", "pig", "hen", "fox", "owl", "ant"] * 3]


def worse(refs: list[str]) -> list[str]:
    """Two of seven words wrong in every transcription."""
    return [r.replace("sat", "sad").replace("mat", "map") for r in refs]


def test_pairing_reports_corpus_wer_and_lower_is_better():
    good, bad = saved("asr", REFS, REFS[:25] + worse(REFS[25:])), saved("asr", REFS, worse(REFS))
    by_metric = {p.metric: p for p in pair_task(bad, good, rounds=2000)}
    wer = by_metric["wer"]
    assert wer.a == pytest.approx(jiwer.wer(REFS, worse(REFS)))  # 60 of 210 words
    assert wer.a == pytest.approx(60 / 210)
    assert wer.b == pytest.approx(10 / 210)
    assert wer.diff == pytest.approx(10 / 210 - 60 / 210)
    assert wer.low < wer.diff < wer.high < 0 and wer.p < 0.05
    assert not wer.higher_is_better
    assert verdict(wer).startswith("B is better on asr wer: -0.2381")
    # the other way round: A is the better one
    back = {p.metric: p for p in pair_task(good, bad, rounds=2000)}["wer"]
    assert back.diff > 0 and verdict(back).startswith("A is better on asr wer")
    assert {p.metric for p in pair_runs({"asr": bad}, {"asr": good}, rounds=500)} == {"wer", "cer"}


def test_equal_transcriptions_show_no_difference():
    a, b = saved("asr", REFS, worse(REFS)), saved("asr", REFS, worse(REFS))
    wer = {p.metric: p for p in pair_task(a, b, rounds=500)}["wer"]
    assert wer.diff == 0 and verdict(wer).startswith("no difference detected on asr wer")


def test_runs_scored_on_different_utterances_do_not_pair():
    a = saved("asr", REFS, REFS)
    fewer = saved("asr", REFS[:20], REFS[:20])
    with pytest.raises(ValueError, match=r"^task asr: the runs transcribed different "
                       r"utterances \(30 and 20, 10 and 0 of them not in the other\)"):
        pair_task(a, fewer)
    other = saved("asr", [r.replace("today", "now") for r in REFS], REFS)
    with pytest.raises(ValueError, match=r"30 utterance\(s\) \(u0 first\) have another "
                       "normalized reference"):
        pair_task(a, other)


def test_two_configs_pair_over_seeds_on_their_utterances_averaged_errors():
    from mlxlab.evaluation.paired import pair_replicates, replicate_verdict

    bad = {s: {"asr": saved("asr", REFS, worse(REFS))} for s in ("1", "2")}
    good = {"1": {"asr": saved("asr", REFS, REFS)},
            "2": {"asr": saved("asr", REFS, REFS[:20] + worse(REFS[20:]))}}
    wer = {p.metric: p for p in pair_replicates(bad, good, rounds=1000)}["wer"]
    # B's errors per utterance averaged over its seeds: (0 + 20) / 2 of 210 words
    assert (wer.a, wer.b, wer.seeds_a, wer.n) == (pytest.approx(60 / 210),
                                                  pytest.approx(10 / 210), 2, 30)
    assert replicate_verdict(wer).startswith("B is better on asr wer")
    fewer = {"1": {"asr": saved("asr", REFS[:10], REFS[:10])}}
    with pytest.raises(ValueError, match="transcribed different utterances"):
        pair_replicates(bad, fewer)


def test_intervals_of_a_transcription_task_bracket_its_corpus_rates():
    task = saved("asr", REFS, REFS[:15] + worse(REFS[15:]))
    bounds = intervals(task)
    for rate in ("wer", "cer"):
        value, low, high = bounds[rate]
        assert value == pytest.approx(task.metrics[rate])
        assert low < value < high


def test_runs_compare_pairs_two_folders_and_refuses_other_utterances(tmp_path, capsys):
    """`mlxlab runs compare A B` on two run folders with saved transcription scores: the
    verdict; then B scored on a subset: one error line, exit 2."""
    from mlxlab.cli.main import main

    def folder(name: str, task: SavedTask) -> Path:
        scores = TaskScores(task.task, task.kind, task.metrics, task.rows)
        write_scores([scores], tmp_path / name / "eval_tasks" / "best", step=10)
        return tmp_path / name

    a = folder("a", saved("asr", REFS, worse(REFS)))
    b = folder("b", saved("asr", REFS, REFS[:25] + worse(REFS[25:])))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "mlflow.db").touch()  # a store, empty: the folders are not tracked runs
    assert main(["runs", "compare", str(a), str(b), "--uri", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    wer = next(p for p in out["paired"] if p["metric"] == "wer")
    assert wer["verdict"].startswith("B is better on asr wer") and wer["n"] == 30
    assert read_scores(b / "eval_tasks" / "best")["asr"].rows[0]["hypothesis"] == \
        "the cat sat on the mat today"
    c = folder("c", saved("asr", REFS[:20], REFS[:20]))
    assert main(["runs", "compare", str(a), str(c), "--uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "mlxlab runs compare: error: task asr: the runs transcribed different utterances")


# --- the pipeline on a tiny random Whisper --------------------------------------------------------


@pytest.fixture(scope="module")
def speech_world(tmp_path_factory) -> dict:
    """A tiny random Whisper folder, 8 training and 6 held-out tone utterances; the held-out
    file (data=speech's file_name/transcription rows) is the transcription task."""
    from speech_fixtures import utterance_set
    from speech_fixtures import write_jsonl as write_rows
    from whisper_fixtures import whisper_folder

    root = tmp_path_factory.mktemp("speechmetrics")
    model = whisper_folder(root / "model")
    train = write_rows(root / "data" / "train.jsonl", utterance_set(root / "data", 8, "tr"))
    held = write_rows(root / "data" / "held_out.jsonl", utterance_set(root / "data", 6, "ho"))
    return {"root": root, "model": model, "train": train, "held": held}


@pytest.mark.slow  # the tiny folder alone takes torch and transformers ~10-50 s to write
def test_a_whisper_transcribes_the_task_and_every_utterance_is_scored(speech_world):
    """score_task on the loaded folder: one row per utterance, its counts those of its own
    normalized texts, the metrics the corpus rates of the rows."""
    from mlxlab.evaluation.scoring import score_task
    from mlxlab.evaluation.settings import TaskSettings
    from mlxlab.runs.speech_model import is_speech_source, load_speech_model

    assert is_speech_source(speech_world["model"])
    source = load_speech_model(speech_world["model"])
    task = read_task(speech_world["held"])
    scores = score_task(source.model, source.tokenizer, task, TaskSettings(batch_size=4))
    assert [r["id"] for r in scores.rows] == [f"houtt{i}.wav" for i in range(6)]
    refs = [ex.text for ex in task.examples]
    for row, ref in zip(scores.rows, refs):
        assert row["reference"] == text_normalizer("english")(ref)
        again = utterance_errors(row["reference"], row["hypothesis"])
        assert (row["errors"], row["words"]) == (again["errors"], again["words"])
    hyps = [r["hypothesis"] or "" for r in scores.rows]
    assert scores.metrics["wer"] == pytest.approx(
        jiwer.wer([r["reference"] for r in scores.rows], hyps))
    assert scores.prompts == "en, english normalizer"
    beam = score_task(source.model, source.tokenizer, task, TaskSettings(beam_size=2))
    assert len(beam.rows) == 6 and beam.metrics["wer"] >= 0


def mlflow_run(uri: str, run_id: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)


@pytest.mark.slow
def test_eval_train_and_compare_a_whisper_end_to_end(speech_world, cli_env, capsys):
    """`mlxlab eval` on the base folder (its MLflow run: eval/held_out/wer and the per-utterance
    file), a fine-tune scoring the task at its evaluations (the same metric and artifacts), and
    `runs compare` pairing the two into a verdict whose direction follows the sign."""
    import subprocess

    from conftest import PYTHON
    from mlxlab.cli.main import main
    from mlxlab.evaluation.run_scores import run_scores

    root, held = speech_world["root"], speech_world["held"]
    uri = f"sqlite:///{root}/mlflow.db"
    capsys.readouterr()
    assert main(["eval", str(speech_world["model"]), str(held), "--uri", uri, "--json",
                 "--out", str(root / "base_scores")]) == 0
    report = json.loads(capsys.readouterr().out)
    wer = report["tasks"]["held_out"]["metrics"]["wer"]
    assert wer["low"] <= wer["value"] <= wer["high"]
    rows = read_scores(root / "base_scores")["held_out"].rows
    assert wer["value"] == pytest.approx(sum(r["errors"] for r in rows)
                                         / sum(r["words"] for r in rows))
    base = mlflow_run(uri, report["run_id"])
    assert base.data.metrics["eval/held_out/wer"] == pytest.approx(wer["value"])
    assert base.data.params["eval.normalizer"] == "auto"

    run_dir = root / "run"
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.train", "model=whisper", "data=speech",
         "objective=speech_to_text", f"model.pretrained={speech_world['model']}",
         f"data.train_file={speech_world['train']}", f"data.val_file={held}",
         "optimized_metric=val/loss", "optimized_mode=min", f"eval.tasks=[{held}]",
         "trainer.batch_size=4", "trainer.max_steps=4", "trainer.eval_every_steps=2",
         "trainer.schedule.warmup_steps=0", "trainer.batching.bucket_multiple=32",
         "optimizer.learning_rate=1e-3", "callbacks.progress.enabled=false",
         "tracking=mlflow", f"tracking.uri={uri}", f"hydra.run.dir={run_dir}"],
        cwd=root, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    best = read_scores(run_dir / "eval_tasks" / "best")["held_out"]
    assert len(best.rows) == 6 and {"errors", "words", "hypothesis"} <= set(best.rows[0])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    trained = [r for r in client.search_runs([e.experiment_id for e in
                                               client.search_experiments()])
               if r.info.run_id != base.info.run_id]
    assert len(trained) == 1 and "eval/held_out/wer" in trained[0].data.metrics
    logged = run_scores(client, trained[0], None, "best")  # from the MLflow artifacts
    assert logged["held_out"].metrics == pytest.approx(best.metrics)

    # the finished run scored again by `mlxlab eval`: its best checkpoint transcribes as the
    # run's own best evaluation did
    assert main(["eval", str(run_dir), str(held), "--no-track", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["tasks"]["held_out"]["metrics"]["wer"]["value"]
    assert again == pytest.approx(best.metrics["wer"])
    # a task of another kind on a Whisper: one line, before anything loads or is logged
    mc = write_jsonl(root / "mc.jsonl", [{"prompt": "a", "choices": ["b", "c"], "answer": 0}])
    assert main(["eval", str(speech_world["model"]), str(mc), "--uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlxlab eval: error: task mc does not fit {speech_world['model']}: a Whisper "
                   "model scores transcription tasks (audio/text rows), a language model the "
                   "others"]

    assert main(["runs", "compare", base.info.run_id, str(run_dir), "--uri", uri,
                 "--json"]) == 0
    paired = {p["metric"]: p for p in json.loads(capsys.readouterr().out)["paired"]}
    wer = paired["wer"]
    assert wer["n"] == 6 and wer["higher_is_better"] is False
    assert wer["diff"] == pytest.approx(best.metrics["wer"] - base.data.metrics[
        "eval/held_out/wer"])
    expected = ("no difference detected" if wer["p"] >= 0.05 or wer["diff"] == 0
                else "B is better" if wer["diff"] < 0 else "A is better")
    assert wer["verdict"].startswith(expected)
