"""scripts/predict.py: a finished Titanic run writes a Kaggle-style submission for a test CSV."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import FAST, PYTHON, REPO, compose_cfg
from mlxlab.config import asset_path
from mlxlab.train import train

sys.path.insert(0, str(REPO / "scripts"))
from predict import predict  # noqa: E402

# Long enough to learn more than the majority class, so the accuracy check below has teeth.
TINY_RUN = [*FAST, "tracking=none", "trainer.max_epochs=5", "trainer.max_steps=100",
            "trainer.eval_every_steps=100", "optimizer.learning_rate=3e-3"]  # corrected Adam: 1e-3 stays on the majority class


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny finished run: (run dir, its best val metrics, its data rows). Its training CSV
    is deleted after training: predicting needs only the run folder."""
    root = tmp_path_factory.mktemp("predict")
    train_csv = Path(shutil.copy(asset_path("titanic/train.csv"), root / "train.csv"))
    titanic = pd.read_csv(train_csv)
    cfg = compose_cfg(root, [*TINY_RUN, f"data.path={train_csv}"])
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    train_csv.unlink()
    return Path(cfg.paths.output_dir), metrics, titanic


def val_rows(titanic: pd.DataFrame) -> pd.DataFrame:
    """The validation rows of the run (default split settings), shuffled to test row order."""
    from mlxlab.data.tabular import stratified_split

    _, val_idx = stratified_split(titanic["Survived"].to_numpy(), 0.2, 42)
    return titanic.iloc[val_idx].sample(frac=1.0, random_state=0)


def test_predict_matches_the_runs_validation_accuracy(run, tmp_path):
    run_dir, metrics, titanic = run
    rows = val_rows(titanic)
    test_csv = tmp_path / "test.csv"
    rows.drop(columns=["Survived"]).to_csv(test_csv, index=False)
    out = tmp_path / "sub" / "submission.csv"

    submission = predict(run_dir, test_csv, out)

    written = pd.read_csv(out)
    assert list(written.columns) == ["PassengerId", "Survived"]
    pd.testing.assert_frame_equal(written, submission.reset_index(drop=True), check_dtype=False)
    assert written["PassengerId"].tolist() == rows["PassengerId"].tolist()  # row order kept
    assert set(written["Survived"]) <= {0, 1}
    # Same text, tokens and weights as the run's own evaluation (the best checkpoint): the
    # accuracy on these rows is the run's val/accuracy (one row of slack for float ties).
    accuracy = (written["Survived"].to_numpy() == rows["Survived"].to_numpy()).mean()
    assert accuracy == pytest.approx(metrics["val/accuracy"], abs=1.01 / len(rows))
    assert accuracy > (rows["Survived"] == 0).mean() + 0.05, "the tiny run learned nothing"


def test_checkpoint_dir_and_extra_columns_give_the_same_predictions(run, tmp_path):
    run_dir, _, titanic = run
    rows = titanic.head(25).drop(columns=["Survived"])
    plain = tmp_path / "plain.csv"
    rows.to_csv(plain, index=False)
    # Extra columns and another column order must not change the text the model sees.
    shuffled = tmp_path / "shuffled.csv"
    rows.assign(Comment="extra").iloc[:, ::-1].to_csv(shuffled, index=False)

    by_run = predict(run_dir, plain)
    by_checkpoint = predict(run_dir / "checkpoints" / "best", shuffled)
    pd.testing.assert_frame_equal(by_run, by_checkpoint)
    assert len(by_run) == 25


def test_cli_writes_submission_and_reports_errors(run, tmp_path):
    run_dir, _, titanic = run
    test_csv = tmp_path / "test.csv"
    titanic.head(10).drop(columns=["Survived"]).to_csv(test_csv, index=False)
    out = tmp_path / "submission.csv"
    script = str(REPO / "scripts" / "predict.py")

    done = subprocess.run([PYTHON, script, str(run_dir), str(test_csv), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 10 predictions" in done.stdout
    written = pd.read_csv(out)
    assert written["PassengerId"].tolist() == titanic["PassengerId"].head(10).tolist()
    pd.testing.assert_frame_equal(written, predict(run_dir, test_csv), check_dtype=False)

    bad = subprocess.run([PYTHON, script, str(run_dir), str(tmp_path / "nope.csv")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("predict: error: test CSV not found")


def test_missing_columns_and_paths_are_clear_errors(run, tmp_path):
    run_dir, _, titanic = run
    no_sex = tmp_path / "no_sex.csv"
    titanic.head(5).drop(columns=["Survived", "Sex"]).to_csv(no_sex, index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Sex'\]"):
        predict(run_dir, no_sex)

    no_id = tmp_path / "no_id.csv"
    titanic.head(5).drop(columns=["PassengerId"]).to_csv(no_id, index=False)
    with pytest.raises(ValueError, match="PassengerId"):
        predict(run_dir, no_id)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict(tmp_path / "no_run", no_sex)
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises((FileNotFoundError, ValueError), match="no checkpoints|no committed"):
        predict(empty_run, no_sex)
