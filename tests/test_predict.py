"""`mlxlab predict` and `mlxlab eval` on a finished Titanic run (inference.py underneath): a
Kaggle-style submission for a test CSV, metrics on a labelled CSV, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import mlxlab
from mlxlab.cli.main import main
from mlxlab.evaluation.file_metrics import evaluate
from mlxlab.runs.inference import load_run, predict_frame


def val_rows(titanic: pd.DataFrame) -> pd.DataFrame:
    """The validation rows of the run (default split settings), shuffled to test row order."""
    from mlxlab.data.tabular import stratified_split

    _, val_idx = stratified_split(titanic["Survived"].to_numpy(), 0.2, 42)
    return titanic.iloc[val_idx].sample(frac=1.0, random_state=0)


def test_predict_matches_the_runs_validation_accuracy(classifier_run, tmp_path):
    run_dir, metrics, titanic, _ = classifier_run
    rows = val_rows(titanic)
    test_csv = tmp_path / "test.csv"
    rows.drop(columns=["Survived"]).to_csv(test_csv, index=False)
    out = tmp_path / "sub" / "submission.csv"

    done = mlxlab("predict", run_dir, test_csv, "--out", out)

    assert done.returncode == 0, done.stderr
    assert f"wrote {len(rows)} predictions to {out}" in done.stdout
    written = pd.read_csv(out)
    assert list(written.columns) == ["PassengerId", "Survived"]
    assert written["PassengerId"].tolist() == rows["PassengerId"].tolist()  # row order kept
    assert set(written["Survived"]) <= {0, 1}
    # Same text, tokens and weights as the run's own evaluation (the best checkpoint): the
    # accuracy on these rows is the run's val/accuracy (one row of slack for float ties).
    accuracy = (written["Survived"].to_numpy() == rows["Survived"].to_numpy()).mean()
    assert accuracy == pytest.approx(metrics["val/accuracy"], abs=1.01 / len(rows))
    assert accuracy > (rows["Survived"] == 0).mean() + 0.05, "the tiny run learned nothing"
    in_process = predict_frame(load_run(run_dir), rows)
    pd.testing.assert_frame_equal(written, in_process, check_dtype=False)


def test_eval_reports_the_runs_validation_metrics(classifier_run, tmp_path, capsys):
    """`mlxlab eval` on the run's own validation rows gives its val/ metrics (best checkpoint);
    the confusion matrix adds up to the rows and is drawn as a PNG with the given names."""
    run_dir, metrics, titanic, _ = classifier_run
    labelled = tmp_path / "val.csv"
    val_rows(titanic).to_csv(labelled, index=False)
    png = tmp_path / "plots" / "confusion.png"

    done = mlxlab("eval", run_dir, labelled, "--json", "--confusion", png,
                  "--label-names", "died,survived")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == len(val_rows(titanic)) and report["labels"] == ["died", "survived"]
    for name in ("accuracy", "f1", "roc_auc", "loss"):
        assert report[name] == pytest.approx(metrics[f"val/{name}"], abs=2e-3), name
    cm = report["confusion"]
    assert sum(map(sum, cm)) == report["rows"]
    assert (cm[0][0] + cm[1][1]) / report["rows"] == pytest.approx(report["accuracy"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["confusion_png"] == str(png)

    capsys.readouterr()  # the table: the verb's main in this process
    assert main(["eval", str(run_dir), str(labelled), "--checkpoint", "last"]) == 0
    table = capsys.readouterr().out
    assert "checkpoints/step_" in table and "roc_auc" in table
    assert "true \\ pred" in table  # the confusion matrix, with the label values


def test_checkpoint_dir_and_extra_columns_give_the_same_predictions(classifier_run):
    run_dir, _, titanic, _ = classifier_run
    rows = titanic.head(25).drop(columns=["Survived"])
    # Extra columns and another column order must not change the text the model sees.
    shuffled = rows.assign(Comment="extra").iloc[:, ::-1]
    by_run = predict_frame(load_run(run_dir), rows)
    by_checkpoint = predict_frame(load_run(run_dir / "checkpoints" / "best"), shuffled)
    pd.testing.assert_frame_equal(by_run, by_checkpoint)
    assert len(by_run) == 25
    with_probability = predict_frame(load_run(run_dir), rows, probability=True)
    assert with_probability["probability"].between(0.5, 1.0).all()


def test_bad_input_is_one_clear_line(classifier_run, tmp_path, capsys):
    run_dir, _, titanic, _ = classifier_run
    no_sex = tmp_path / "no_sex.csv"
    titanic.head(5).drop(columns=["Survived", "Sex"]).to_csv(no_sex, index=False)
    bad = mlxlab("predict", run_dir, no_sex, "--out", tmp_path / "x.csv")
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxlab predict: error: ") and "lacks column(s) ['Sex']" in last
    assert not (tmp_path / "x.csv").exists()

    assert main(["predict", str(run_dir), str(tmp_path / "nope.csv")]) == 2
    assert "CSV not found" in capsys.readouterr().err
    assert main(["eval", str(run_dir), str(no_sex)]) == 2  # no label column
    assert "Survived" in capsys.readouterr().err

    run = load_run(run_dir)
    no_id = titanic.head(5).drop(columns=["PassengerId"])
    with pytest.raises(ValueError, match="PassengerId"):
        predict_frame(run, no_id)
    odd = tmp_path / "odd.csv"
    titanic.head(5).assign(Survived=7).to_csv(odd, index=False)
    with pytest.raises(ValueError, match=r"label value\(s\) \['7'\]"):
        evaluate(run, odd)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "no_run")
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "tokenizer.json").write_text("{}")
    with pytest.raises((FileNotFoundError, ValueError), match="no checkpoints|no committed"):
        load_run(empty_run)


def test_quantized_checkpoint_is_smaller_and_scores_what_the_run_logged(classifier_run, tmp_path,
                                                                        capsys):
    """trainer.quantize_bits=4 (the shared run): checkpoints/quantized holds the best weights
    packed to 4 bits, smaller than the float ones; `mlxlab eval --checkpoint quantized` on the
    validation rows gives the val_q4/ metrics the run logged, and predict writes from it."""
    from mlflow.tracking import MlflowClient

    from mlxlab.checkpoint import CheckpointState

    run_dir, metrics, titanic, uri = classifier_run
    quantized, best = run_dir / "checkpoints" / "quantized", run_dir / "checkpoints" / "best"
    assert CheckpointState.read(quantized).extra["quantization"] == {"bits": 4, "group_size": 32}
    # 32 wide: the float embedding table is most of it; the Linear weights shrink ~6x
    assert metrics["model/q4_size_mb"] < 0.8 * metrics["model/size_mb"]
    assert (quantized / "model.safetensors").stat().st_size < 0.8 * (
        best / "model.safetensors").stat().st_size
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["val_q4/accuracy"] == metrics["val_q4/accuracy"]
    assert "checkpoint_quantized" in {a.path for a in client.list_artifacts(run.info.run_id)}

    labelled = tmp_path / "val.csv"
    val_rows(titanic).to_csv(labelled, index=False)
    # the verbs' mains in this process (the tests above run them as processes)
    capsys.readouterr()
    assert main(["eval", str(run_dir), str(labelled), "--json", "--checkpoint", "quantized"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("accuracy", "loss"):
        assert report[name] == pytest.approx(metrics[f"val_q4/{name}"], abs=2e-3), name
    out = tmp_path / "submission.csv"
    assert main(["predict", str(run_dir), str(labelled), "--out", str(out), "--checkpoint",
                 "quantized"]) == 0
    assert len(pd.read_csv(out)) == len(val_rows(titanic))

    # what `mlxlab serve RUN --checkpoint quantized` serves (its model folder, loaded by MLflow
    # as the server loads it): the quantized weights' answers, not the float ones'
    import mlflow

    from mlxlab.serving.registry import save_run_model

    rows = val_rows(titanic).head(20).drop(columns=["Survived"])
    served = mlflow.pyfunc.load_model(str(save_run_model(run_dir, tmp_path / "served",
                                                         "quantized"))).predict(rows)
    direct = predict_frame(load_run(run_dir, "quantized"), rows, probability=True)
    assert served["probability"].tolist() == direct["probability"].tolist()
    floats = predict_frame(load_run(run_dir), rows, probability=True)["probability"]
    assert served["probability"].tolist() != floats.tolist()
