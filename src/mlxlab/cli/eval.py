"""Metrics of a finished run on new data: a labelled CSV (classifier) or a text file (LM).

    mlxlab eval outputs/train/<time> labelled.csv --confusion confusion.png
    mlxlab eval outputs/train/<time> labelled.csv --confusion cm.png --label-names died,survived
    mlxlab eval outputs/tinystories_nano/<time> held_out.txt --json
    mlxlab eval RUN DATA --checkpoint last

Classifier: the CSV needs the training columns and the label column; prints loss, accuracy, F1
(binary: of the second label; macro otherwise) and ROC-AUC, as training's val/ metrics, and the
confusion matrix. Language model: the file (txt paragraphs, or jsonl/parquet with the run's text
column) is packed into the run's windows as training's validation is; prints the token-weighted
loss, perplexity and next-token accuracy. --json prints one JSON object instead of the table.
"""

from __future__ import annotations

import json

from mlxlab.cli.common import add_run_arguments, guarded, parser_for


def main(argv: list[str]) -> int:
    parser = parser_for("eval", __doc__)
    add_run_arguments(parser)
    parser.add_argument("data", help="labelled CSV (classifier) or text file (language model)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--confusion", metavar="PNG", help="classifier: write the confusion "
                        "matrix as a PNG")
    parser.add_argument("--label-names", metavar="A,B,...", help="names for the labels in the "
                        "table and PNG, in the order of the training label values")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    def body() -> int:
        from mlxlab.inference import evaluate, load_run

        run = load_run(args.run, args.checkpoint)
        if run.task != "classification" and (args.confusion or args.label_names):
            raise ValueError("--confusion and --label-names are for classifier runs")
        report = evaluate(run, args.data, args.batch_size)
        if args.label_names:
            names = [n.strip() for n in args.label_names.split(",")]
            if len(names) != len(report["labels"]):
                raise ValueError(f"--label-names gives {len(names)} names for the run's "
                                 f"{len(report['labels'])} labels {report['labels']}")
            report["labels"] = names
        if args.confusion:
            from mlxlab.tracking.plots import confusion_matrix_png

            report["confusion_png"] = str(confusion_matrix_png(
                report["confusion"], args.confusion, report["labels"],
                title=f"confusion matrix ({report['rows']} rows)"))
        print(json.dumps(report) if args.json else table(report))
        return 0

    return guarded("eval", body)


def table(report: dict) -> str:
    """The metrics as an aligned two-column table, then the confusion matrix (classifiers)."""
    keys = ["rows", "loss", "accuracy", "f1", "roc_auc"] if report["task"] == "classification" \
        else ["tokens", "loss", "perplexity", "accuracy"]
    lines = [f"checkpoint  {report['checkpoint']}"]
    for key in keys:
        value = report[key]
        lines.append(f"{key:<10}  {value:.4f}" if isinstance(value, float) else f"{key:<10}  {value}")
    if report["task"] == "classification":
        names = [str(n) for n in report["labels"]]
        corner = "true \\ pred"
        width = max(len(n) for n in [*names, corner])
        cell = max(width, *(len(str(c)) for row in report["confusion"] for c in row))
        lines += ["", "confusion (rows: true, columns: predicted)",
                  f"{corner:<{width}}  " + "  ".join(f"{n:>{cell}}" for n in names)]
        lines += [f"{n:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in row)
                  for n, row in zip(names, report["confusion"])]
        if "confusion_png" in report:
            lines.append(f"wrote {report['confusion_png']}")
    return "\n".join(lines)
