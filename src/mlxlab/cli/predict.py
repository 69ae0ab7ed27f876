"""Predict a CSV with a finished run: a Kaggle-style submission (classifier) or completions (LM).

    mlxlab predict outputs/train/<time> test.csv --out submission.csv
    mlxlab predict outputs/train/<time> test.csv --probability --checkpoint last
    mlxlab predict outputs/tinystories_nano/<time> prompts.csv --max-new-tokens 40

Classifier: the CSV needs the training feature columns and the id column (the label may be
absent); the output has the id column and the label column with the original label values
(PassengerId,Survived for Titanic), plus `probability` with --probability. The training CSV is
not needed: the checkpoint holds the label values and columns. Language model: the CSV has a
`prompt` (or `text`) column; the output has `prompt` and its greedy `completion`.
"""

from __future__ import annotations

from pathlib import Path

from mlxlab.cli.common import add_run_arguments, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("predict", __doc__)
    add_run_arguments(parser)
    parser.add_argument("data", help="CSV to predict (the training columns; or a prompt column)")
    parser.add_argument("--out", default="submission.csv", help="where to write the predictions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probability", action="store_true",
                        help="classifier: add the predicted label's probability")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="language model")
    args = parser.parse_args(argv)

    def body() -> int:
        from mlxlab.data.tabular import read_csv
        from mlxlab.runs.inference import load_run, predict_frame
        from mlxlab.runs.named_model import refuse_reward_model

        if not Path(args.data).is_file():
            raise FileNotFoundError(f"CSV not found: {args.data} (give the CSV to predict)")
        refuse_reward_model(args.run, "mlxlab predict")
        frame = read_csv(args.data)
        run = load_run(args.run, args.checkpoint)
        out = predict_frame(run, frame, args.batch_size, args.probability, args.max_new_tokens,
                            progress=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out.to_csv(args.out, index=False)
        summary = (out.iloc[:, -1 - args.probability].value_counts().sort_index().to_dict()
                   if run.task == "classification" else "completions")
        print(f"wrote {len(out)} predictions to {args.out} ({summary}; {run.checkpoint})")
        return 0

    return guarded("predict", body)
