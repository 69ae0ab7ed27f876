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

A reward model's run (objective=reward) scores a jsonl: prompt/completion rows (each row's
reward, and their mean), or preference pairs (the pairwise accuracy with its 95 % interval and
the mean margin):

    mlxlab eval outputs/reward_chat/<time> rated.jsonl --json

Evaluation tasks on any language model (docs/guide/evaluation.md):

    mlxlab eval models/tiny-llama mc.jsonl qa.jsonl          # a Hugging Face / mlx-lm folder
    mlxlab eval outputs/finetune_completions/<time> mc.jsonl  # a finished run (--checkpoint last)
    mlxlab eval exported/ft mc.jsonl --json                   # a folder `mlxlab export` wrote

A task is a jsonl of prompt/choices/answer (multiple choice: acc, acc_norm as lm-eval-harness),
prompt/answer (generation: exact_match, contains) or text rows (perplexity). Each task's metrics
print with 95 % intervals over its examples; the run is logged to the MLflow store (--uri) with
eval/<task>/<metric> and the per-example scores as artifacts, which `mlxlab runs compare A B`
pairs example by example. A run and one text file keep the report above; --tasks scores a text
jsonl as a perplexity task instead.

lm-evaluation-harness's own tasks, groups and task YAMLs (lm-eval installed), on any of the
models above, a run's LoRA adapters unfused (docs/guide/evaluation.md):

    mlxlab eval outputs/ft/<time> --tasks arc_easy,gsm8k,my_task.yaml --num-fewshot 5 --limit 200
    mlxlab eval HuggingFaceTB/SmolLM2-135M-Instruct --tasks ifeval --apply-chat-template

MTEB's retrieval tasks (the mteb extra) on a text embedder, a sentence-transformers folder or an
embedder run, scored by mteb itself; a task's data must be in the local Hugging Face cache
(docs/guide/embeddings.md):

    mlxlab eval outputs/embed_retrieval/<time> --tasks mteb:SciFact,mteb:NFCorpus

Transcription tasks (audio/text rows) on a Whisper folder or a speech run: each utterance
transcribed (greedy, or --beam-size N), its word and character error rate after Whisper's
normalization (--normalizer, --language), the task's corpus WER and CER (docs/guide/speech.md):

    mlxlab eval models/whisper-tiny held_out.jsonl --language en
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlxlab.cli.common import add_run_arguments, guarded, parser_for
from mlxlab.evaluation.lm_eval.arguments import add_harness_arguments


def main(argv: list[str]) -> int:
    parser = parser_for("eval", __doc__)
    add_run_arguments(parser, any_model=True)
    parser.add_argument("data", nargs="*", help="labelled CSV (classifier) or text file "
                        "(language model); or task jsonl files")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--confusion", metavar="PNG", help="classifier: write the confusion "
                        "matrix as a PNG")
    parser.add_argument("--label-names", metavar="A,B,...", help="names for the labels in the "
                        "table and PNG, in the order of the training label values")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows (tasks: sequences) scored at once (default 64; tasks 16)")
    tasks = parser.add_argument_group("evaluation tasks")
    tasks.add_argument("--tasks", nargs="?", const="", default=None, metavar="A,B,...",
                       help="lm-eval-harness tasks, groups or task YAML files (arc_easy,gsm8k,"
                       "my_task.yaml) and jsonl task files, or MTEB retrieval tasks on an "
                       "embedder (mteb:SciFact), comma-separated; alone, scores the "
                       "files as tasks even for a run and one text jsonl (a perplexity task)")
    tasks.add_argument("--max-new-tokens", type=int, default=32,
                       help="generation tasks: greedy decoding's token limit")
    tasks.add_argument("--stop", action="append", metavar="TEXT",
                       help="generation tasks: end the answer at TEXT (repeatable; default a "
                       "newline; --stop '' for end-of-text only)")
    tasks.add_argument("--chat", choices=["auto", "template", "plain"], default="auto",
                       help="prompts through the model's chat template: auto (if it has one), "
                       "template (it must), plain (never)")
    tasks.add_argument("--language", default=None, metavar="CODE",
                       help="transcription tasks: the audio's language (default en)")
    tasks.add_argument("--beam-size", type=int, default=1,
                       help="transcription tasks: 1 decodes greedily, N with a beam search of N")
    tasks.add_argument("--normalizer", choices=["auto", "english", "basic", "none"],
                       default="auto", help="transcription tasks: text normalization before "
                       "the word error rate: auto (Whisper's English normalizer for English, "
                       "its basic one otherwise), english, basic or none")
    tasks.add_argument("--out", metavar="DIR", help="also keep the per-example scores here")
    tasks.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or the "
                       "project's mlruns store)")
    tasks.add_argument("--experiment", default="eval", help="MLflow experiment (default: eval)")
    tasks.add_argument("--no-track", action="store_true", help="log nothing to MLflow")
    add_harness_arguments(parser)
    args = parser.parse_args(argv)
    if not args.data and not args.tasks:
        parser.error("give a data file, task files, or --tasks NAMES")
    yamls = [d for d in args.data if d.lower().endswith((".yaml", ".yml"))]
    if yamls:  # an lm-eval task file is named by --tasks, not read as the run's data
        parser.error(f"{yamls[0]} is an lm-eval task YAML: pass it as --tasks {','.join(yamls)}")
    if is_task_call(args):
        return guarded("eval", lambda: eval_tasks(args))
    if len(args.data) > 1:
        parser.error("one data file for a run's loss/accuracy report; task files are .jsonl "
                     "rows of prompt/choices/answer, prompt/answer or text")
    args.data = args.data[0]
    if is_reward_call(args):
        return guarded("eval", lambda: eval_reward(args))
    args.batch_size = args.batch_size or 64

    def body() -> int:
        from mlxlab.evaluation.file_metrics import evaluate
        from mlxlab.runs.inference import load_run

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


def is_task_call(args) -> bool:
    """Task files (the new use) rather than one data file for a run's report (the old one):
    --tasks, several files, a model folder that is no run, or a jsonl of prompt rows."""
    from pathlib import Path

    from mlxlab.errors import MissingFileError
    from mlxlab.runs.model_source import RUN, open_model_source

    if args.tasks is not None or len(args.data) > 1:
        return True
    try:
        if open_model_source(args.run).kind != RUN:
            return True
    except MissingFileError:  # the run's loading names it
        pass
    path = Path(args.data[0]).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:  # a bad byte: read_task names it
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    from mlxlab.evaluation.tasks import TRANSCRIPTION, kind_of

    return isinstance(row, dict) and ("prompt" in row and ("choices" in row or "answer" in row)
                                      and "completion" not in row
                                      or kind_of(row) == TRANSCRIPTION)


def is_reward_call(args) -> bool:
    """A reward model's run (objective=reward): it scores rows rather than reporting a loss."""
    from mlxlab.runs.learned_reward import is_reward_run

    return is_reward_run(args.run)


def eval_reward(args) -> int:
    """`mlxlab eval REWARD_RUN rows.jsonl`: the rows' rewards, or pairs' accuracy and margin."""
    from mlxlab.runs.learned_reward import score_file

    if args.confusion or args.label_names:
        raise ValueError("--confusion and --label-names are for classifier runs, not rewards")
    report = score_file(args.run, args.data, args.batch_size or 16)
    if args.json:
        print(json.dumps(report))
    elif "pairs" in report:
        low, high = report["accuracy_95"]
        print(f"pairs     {report['pairs']}\naccuracy  {report['accuracy']:.4f}  "
              f"[{low:.4f}, {high:.4f}]\nmargin    {report['margin']:.4f}")
    else:
        print("\n".join(f"{s:.4f}" for s in report["scores"])
              + f"\nmean      {report['mean_reward']:.4f} over {report['rows']} rows")
    return 0


def eval_tasks(args) -> int:
    """`mlxlab eval MODEL TASK...`: score, print, log (evaluation/eval_run.py)."""
    import tempfile
    from pathlib import Path

    from mlxlab.evaluation.eval_run import evaluate_tasks, log_eval_run
    from mlxlab.evaluation.lm_eval.command_line import (
        harness_options,
        score_harness_entries,
        split_entries,
    )
    from mlxlab.evaluation.mteb.command_line import mteb_entries
    from mlxlab.evaluation.settings import TaskSettings
    from mlxlab.evaluation.tasks import read_tasks
    from mlxlab.runs.named_model import load_eval_model, refuse_reward_model

    if args.confusion or args.label_names:
        raise ValueError("--confusion and --label-names are for classifier runs, not tasks")
    refuse_reward_model(args.run)  # before the store is touched
    stop = ("\n",) if args.stop is None else tuple(s for s in args.stop if s)
    entries = [*args.data, *(t.strip() for t in (args.tasks or "").split(",") if t.strip())]
    if mteb_entries(entries):
        return eval_mteb(args, entries)
    files, harness = split_entries(entries)
    settings = TaskSettings(tasks=tuple(files), batch_size=args.batch_size or 16,
                            max_new_tokens=args.max_new_tokens, stop=stop, chat=args.chat,
                            language=args.language, beam_size=args.beam_size,
                            normalizer=args.normalizer)
    tasks = read_tasks(files) if files else []
    options = harness_options(args, harness)
    speech = speech_source(args, tasks, harness)
    tracker = eval_tracker(args)
    source = speech() if speech else load_eval_model(args.run, args.checkpoint, args.chat)
    with tempfile.TemporaryDirectory(prefix="mlxlab-eval-") as tmp:
        folder = Path(args.out).expanduser() if args.out else Path(tmp) / "eval_tasks"
        scores, groups = score_harness_entries(source, harness, options, settings.batch_size)
        scores = evaluate_tasks(source, tasks, settings, folder, scores)
        run_id = log_eval_run(tracker, source, tasks, settings, scores, folder,
                              harness, options, groups) if tracker is not None else None
    print_report(args, source, scores, run_id, groups)
    return 0


def speech_source(args: argparse.Namespace, tasks: list, harness: list) -> Any:
    """For a Whisper folder or speech run: its loader, once its tasks are checked to be
    transcription tasks (before the store is touched); None for any other model."""
    from mlxlab.evaluation.tasks import TRANSCRIPTION
    from mlxlab.runs.speech_model import is_speech_source, load_speech_model

    speech = is_speech_source(args.run, args.checkpoint)
    wrong = [t.name for t in tasks if (t.kind == TRANSCRIPTION) != speech] + (
        harness[:1] if speech else [])
    if wrong:
        raise ValueError(f"task {wrong[0]} does not fit {args.run}: a Whisper model scores "
                         "transcription tasks (audio/text rows), a language model the others")
    return (lambda: load_speech_model(args.run, args.checkpoint)) if speech else None


def eval_tracker(args: argparse.Namespace) -> Any:
    """The MLflow tracker of an eval run (None with --no-track), its store probed now."""
    from pathlib import Path

    if args.no_track:
        return None
    from mlxlab.tracking.mlflow.tracker import MlflowTracker

    tracker = MlflowTracker(uri=args.uri, experiment_name=args.experiment,
                            run_name=f"eval-{Path(args.run).expanduser().resolve().name}",
                            async_logging=False)
    tracker.probe()  # a store that does not answer fails now, not after the scoring
    return tracker


def eval_mteb(args: argparse.Namespace, entries: list[str]) -> int:
    """`mlxlab eval EMBEDDER --tasks mteb:NAME,...`: mteb scores, printed and logged as the
    other tasks' (evaluation/mteb/command_line.py)."""
    import tempfile
    from pathlib import Path

    from mlxlab.evaluation.eval_run import log_eval_run
    from mlxlab.evaluation.mteb.command_line import load_embedder, score_mteb_entries
    from mlxlab.evaluation.mteb.tasks import check_mteb_entries
    from mlxlab.evaluation.results import write_scores
    from mlxlab.evaluation.settings import TaskSettings

    tasks = check_mteb_entries(entries)  # before the model is loaded or the store touched
    settings = TaskSettings(batch_size=args.batch_size or 32)
    tracker = eval_tracker(args)
    embedder, source = load_embedder(args.run)
    with tempfile.TemporaryDirectory(prefix="mlxlab-eval-") as tmp:
        folder = Path(args.out).expanduser() if args.out else Path(tmp) / "eval_tasks"
        scores = score_mteb_entries(embedder, entries, settings.batch_size, tasks)
        write_scores(scores, folder)
        run_id = log_eval_run(tracker, source, [], settings, scores, folder,
                              entries) if tracker is not None else None
    print_report(args, source, scores, run_id, {})
    return 0


def print_report(args: argparse.Namespace, source: Any, scores: list, run_id: str | None,
                 groups: dict[str, float]) -> None:
    """The scores as --json's object or task_table's lines."""
    from mlxlab.evaluation.results import intervals

    styles = sorted({s.prompts for s in scores})
    report = {"model": str(source.path), "kind": source.kind,
              # each task's own style is in its entry: lm-eval's are plain unless
              # --apply-chat-template, mlxlab's jsonl tasks follow --chat
              "prompts": styles[0] if len(styles) == 1 else "mixed",
              "checkpoint": str(source.checkpoint) if source.checkpoint else None,
              "run_id": run_id, "tasks": {},
              "groups": {k.removeprefix("eval/"): v for k, v in groups.items()}}
    for s in scores:
        bounds = intervals(s)
        report["tasks"][s.task] = {"kind": s.kind, "n": len(s.rows), "prompts": s.prompts,
                                   "metrics": {
            k: {"value": v, "low": bounds.get(k, (v, None, None))[1],
                "high": bounds.get(k, (v, None, None))[2]} for k, v in s.metrics.items()}}
    print(json.dumps(report) if args.json else task_table(report))


def task_table(report: dict) -> str:
    """Each task's metrics with their 95 % intervals, then where the run was logged."""
    lines = [f"model  {report['model']} ({report['kind']}"
             + (f", {report['checkpoint']})" if report["checkpoint"] else ")")]
    styles = {task["prompts"] for task in report["tasks"].values()}
    if len(styles) > 1:
        lines.append("tasks scored with different prompt styles: their scores do not compare")
    for name, task in report["tasks"].items():
        style = task["prompts"] + ("" if task["kind"] == "transcription" else " prompts")
        lines.append(f"\n{name} ({task['kind']}, {task['n']} examples, {style})")
        width = max([14, *(len(metric) + 2 for metric in task["metrics"])])
        for metric, m in task["metrics"].items():
            ci = f"  [{m['low']:.4f}, {m['high']:.4f}]" if m["low"] is not None else ""
            lines.append(f"  {metric:<{width}}{m['value']:.4f}{ci}")
    if report.get("groups"):
        lines.append("\ngroups (lm-eval's aggregates)")
        lines += [f"  {name:<30}{value:.4f}" for name, value in report["groups"].items()]
    if report["run_id"]:
        lines.append(f"\nmlflow run: {report['run_id']} (pair it with another: mlxlab runs "
                     "compare A B)")
    return "\n".join(lines)


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
