"""Predict a test CSV with a trained classifier run and write a Kaggle-style submission.

    python scripts/predict.py outputs/train/<time> test.csv [--out submission.csv]

The path is a run directory (its best checkpoint is used, else the newest) or one checkpoint
directory. The rows are serialized to text exactly as in training: the data module is rebuilt
from the run's resolved config (checkpoint state.json) with the run's tokenizer.json. The test
CSV needs the feature columns (the template's) and the id column, not the label column. The
output has the id column and the label column with the original label values
(PassengerId,Survived for Titanic). The training CSV is not needed: the checkpoint's state.json
holds the label values and columns the run learnt from it (checkpoints written before mlxlab
saved them fall back to re-reading the training CSV).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from mlxlab.config import instantiate
from mlxlab.data.tabular import TabularText, read_csv
from mlxlab.runs import load_run_model, require_run_tokenizer


def load_classifier(run: str | Path):
    """The run's model (eval mode) and its data module, set up with the run's tokenizer."""
    run = Path(run).expanduser()
    if not run.exists():
        raise FileNotFoundError(
            f"{run} does not exist: pass a run directory (outputs/<task>/<time>) or a checkpoint"
        )
    model, state = load_run_model(run)
    data_cfg = OmegaConf.create(state["config"]["data"])
    if "label_column" not in data_cfg:
        raise ValueError(
            f"{run} is not a tabular classification run (its data config has no label_column): "
            "predict a run of data=titanic or another CSV classification config"
        )
    tokenizer_path = require_run_tokenizer(state["checkpoint_path"], "classification")
    data_cfg.tokenizer = {**data_cfg.get("tokenizer", {}), "path": str(tokenizer_path)}
    if "encoding" in state:  # label values and columns saved by the run
        settings = OmegaConf.to_container(data_cfg, resolve=True)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        data = TabularText.from_encoding_state(settings, tokenizer, state["encoding"])
    else:  # a checkpoint from before mlxlab saved them: learn them from the training CSV again
        data = instantiate(data_cfg)
        if not Path(data.path).is_file():
            raise FileNotFoundError(
                f"the run's training CSV {data.path} is gone and {state['checkpoint_path']} "
                "predates saved label values: restore the file at that path"
            )
        data.setup(None)
    expected = state.get("tokenizer_hash")
    if expected and data.tokenizer_hash != expected:
        raise ValueError(
            f"{tokenizer_path} is not the tokenizer {state['checkpoint_path']} was trained with "
            "(hash differs): use the tokenizer.json of that run"
        )
    return model, data


def predict_frame(model, data, df: pd.DataFrame, batch_size: int = 64) -> pd.DataFrame:
    """Submission frame (id column, label column) for the rows of `df`, in row order."""
    needed = list(data.columns) + ([data.id_column] if data.id_column else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"the test CSV lacks column(s) {missing} the run was trained on; it has "
            f"{list(df.columns)} (give a CSV with the training columns; the label may be absent)"
        )
    frame = df[needed]  # only the training columns, in training order, so the text matches
    predictions = []
    for batch in data.encode_frame(frame, batch_size=batch_size):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        predictions.append(np.array(logits).argmax(axis=-1))
    return data.submission(frame, np.concatenate(predictions))


def predict(
    run: str | Path, test_csv: str | Path, out: str | Path | None = None, batch_size: int = 64
) -> pd.DataFrame:
    """Predict every row of `test_csv` with the run's model; write the submission to `out`."""
    if not Path(test_csv).is_file():
        raise FileNotFoundError(f"test CSV not found: {test_csv} (give the CSV to predict)")
    df = read_csv(test_csv)
    model, data = load_classifier(run)
    submission = predict_frame(model, data, df, batch_size)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        submission.to_csv(out, index=False)
    return submission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (outputs/<task>/<time>) or checkpoint directory")
    parser.add_argument("test_csv", help="CSV with the training feature columns and the id column")
    parser.add_argument("--out", default="submission.csv", help="where to write the submission")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        submission = predict(args.run, args.test_csv, args.out, args.batch_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    counts = submission.iloc[:, -1].value_counts().sort_index().to_dict()
    print(f"wrote {len(submission)} predictions to {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
