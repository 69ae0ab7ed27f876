"""Does fine-tuning an embedder on mlxlab's loop beat its base, and match sentence-transformers' own
trainer on the same rows?

    python benchmarks/quality/bench_embed_retrieval.py [--model DIR] [--seeds 3] [--epochs 1]
        [--batch 32] [--lr 5e-5] [--out DIR] [--smoke]

The task is scripts/make_jargon_retrieval.py's (made-up field notes in a made-up jargon, questions
in plain words): 720 training pairs, 80 validation pairs, 200 held-out notes and questions (a
BEIR folder). all-MiniLM-L6-v2 (tests/real_models.py's copy by default) is scored untrained
(`trainer.max_steps=0`: the base run), fine-tuned with MultipleNegativesRankingLoss
(experiment=embed_retrieval) on each seed and compared with the base query by query
(`mlxlab runs compare BASE RUN --last --json`); sentence-transformers' SentenceTransformerTrainer
trains the same rows with the same loss, batch, epochs, learning rate, schedule, weight decay and
clipping, scored by its InformationRetrievalEvaluator. Both sides are scored after their last step
(no selection on the held-out set). MatryoshkaLoss (64/128/256/384) is trained once, and every
model's nDCG@10 is read again at each cut of its vectors. Each side's training run is a process of
its own: examples a second (rows x epochs / the run's wall seconds, start-up included) and peak
resident memory are printed for the lead to take on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository: benchmarks.*
from benchmarks.harness import (  # noqa: E402
    add_smoke,
    cli_root,
    line_value,
    mlxlab_cli,
    print_table,
    run_with_peak_rss,
    smoke_dir,
    train_cli,
    write_record,
)

DIMS = (64, 128, 256, 384)


def task_module():
    spec = importlib.util.spec_from_file_location("jargon", REPO / "scripts" / "make_jargon_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_split(out: Path, train: int, test: int) -> tuple[Path, Path, Path]:
    """(training pairs, validation pairs, BEIR folder): the generated rows, the last 10 % apart."""
    task = task_module().write_task(out / "task", train, test, seed=0)
    rows = (task / "train.jsonl").read_text().splitlines(keepends=True)
    cut = len(rows) - len(rows) // 10
    (task / "fit.jsonl").write_text("".join(rows[:cut]))
    (task / "val.jsonl").write_text("".join(rows[cut:]))
    return task / "fit.jsonl", task / "val.jsonl", task / "jargon"


def ndcg_at_dims(folder: Path, beir: Path) -> dict[int, float]:
    """nDCG@10 of a sentence-transformers folder with its vectors cut to each of DIMS."""
    from mlxlab.data.beir import read_beir
    from mlxlab.models.sentence_folder import TextEmbedder
    from mlxlab.objectives.embedding.retrieval import score_retrieval

    found, model = read_beir(beir), TextEmbedder(folder)
    queries, docs = model.encode(found.queries), model.encode(found.corpus)
    return {d: score_retrieval("t", queries[:, :d], found.query_ids, docs[:, :d], found.corpus_ids,
                               found.relevant).metrics["ndcg_at_10"] for d in DIMS if d <= queries.shape[1]}


def mlxlab_run(args, env: dict, common: list[str], *extra: str) -> dict:
    """One `mlxlab train` process: its run folder, MLflow run id, last nDCG@10, speed, memory."""
    proc, peak = run_with_peak_rss(train_cli(*common, *extra), env=env, cwd=env["MLXLAB_ROOT"])
    if proc.returncode:
        sys.exit(f"mlxlab train {' '.join(extra)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    out = proc.stdout + proc.stderr
    run_dir = Path(line_value(out, "run dir:"))
    last = json.loads((run_dir / "eval_tasks" / "last" / "summary.json").read_text())
    return {"run_dir": str(run_dir), "run_id": line_value(out, "mlflow run:").split()[0],
            "ndcg_at_10": last["tasks"]["jargon"]["metrics"]["ndcg_at_10"],
            "examples_per_s": args.rows * args.epochs / proc.wall_s, "peak_mb": peak,
            "wall_s": proc.wall_s}


def twin(args) -> None:
    """sentence-transformers' trainer on the same rows (run as `--twin SEED`): prints a JSON line."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from mlxlab.data.beir import read_beir

    torch.set_num_threads(2)
    rows = [json.loads(line) for line in Path(args.fit).read_text().splitlines()]
    model = SentenceTransformer(args.model, device="cpu")
    settings = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.out) / f"st_{args.twin}"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, warmup_steps=2,
        lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, seed=args.twin,
        report_to=[], save_strategy="no", logging_steps=10, use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=settings, train_dataset=Dataset.from_list(rows),
                                         loss=losses.MultipleNegativesRankingLoss(model))
    trainer.train()
    found = read_beir(args.beir)
    evaluator = InformationRetrievalEvaluator(dict(zip(found.query_ids, found.queries)),
                                              dict(zip(found.corpus_ids, found.corpus)),
                                              found.relevant, write_csv=False)
    folder = Path(args.out) / f"st_{args.twin}" / "final"
    model.save(str(folder))
    print(json.dumps({"ndcg_at_10": evaluator(model)["cosine_ndcg@10"], "folder": str(folder)}))


def twin_run(args, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--twin", str(seed), "--model", args.model, "--fit", str(args.fit),
           "--beir", str(args.beir), "--out", str(args.out), "--epochs", str(args.epochs),
           "--batch", str(args.batch), "--lr", str(args.lr)]
    proc, peak = run_with_peak_rss(cmd)
    if proc.returncode:
        sys.exit(f"the sentence-transformers twin failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "examples_per_s": args.rows * args.epochs / proc.wall_s, "peak_mb": peak,
            "wall_s": proc.wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a sentence-transformers folder "
                        "(default: all-MiniLM-L6-v2 from tests/real_models.py)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--twin", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--beir", default=None, help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.twin is not None:
        return twin(args)
    if args.model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from real_models import MINILM, packaged_folder

        args.model = str(packaged_folder(MINILM))
    args.out = Path(args.out or (smoke_dir("embed_retrieval") if args.smoke else "bench_embed_retrieval"))
    train, test = (64, 20) if args.smoke else (800, 200)
    args.seeds, args.epochs = (1, 1) if args.smoke else (args.seeds, args.epochs)
    args.fit, val, args.beir = write_split(args.out, train, test)
    args.rows = len(args.fit.read_text().splitlines())
    env, uri = cli_root(args.out)
    common = ["experiment=embed_retrieval", f"model.pretrained={args.model}", f"data.train_file={args.fit}",
              f"data.val_file={val}", f"data.eval_dir={args.beir}", f"trainer.max_epochs={args.epochs}",
              f"trainer.batch_size={args.batch}", f"optimizer.learning_rate={args.lr}",
              f"tracking.uri={uri}", "callbacks.progress.enabled=false",
              "callbacks.early_stopping.patience=0", "trainer.eval_every_steps=null"]  # each epoch
    base = mlxlab_run(args, env, common, "trainer.max_steps=0", "task_name=embed_base")
    print(f"base: nDCG@10 {base['ndcg_at_10']:.4f}", flush=True)
    runs, twins = [], []
    for seed in range(args.seeds):
        run = mlxlab_run(args, env, common, f"seed={seed}")
        proc, _ = run_with_peak_rss(mlxlab_cli("runs", "compare", base["run_id"], run["run_id"], "--last",
                                               "--json", "--uri", uri), env=env)
        paired = json.loads(proc.stdout[proc.stdout.index("{"):])["paired"]
        run["paired_ndcg"] = next(p for p in paired if p["metric"] == "ndcg_at_10")
        runs.append(run)
        twins.append(twin_run(args, seed))
        print(f"seed {seed}: mlxlab {run['ndcg_at_10']:.4f} ({run['paired_ndcg']['verdict']}); "
              f"sentence-transformers {twins[-1]['ndcg_at_10']:.4f}", flush=True)
    matryoshka = mlxlab_run(args, env, common, "seed=0", "objective=matryoshka",
                            "task_name=embed_matryoshka")
    dims = {"base": ndcg_at_dims(Path(args.model), args.beir),
            "mnrl (mlxlab, seed 0)": ndcg_at_dims(Path(runs[0]["run_dir"]) / "sentence_transformer", args.beir),
            "mnrl (sentence-transformers, seed 0)": ndcg_at_dims(Path(twins[0]["folder"]), args.beir),
            "matryoshka (mlxlab, seed 0)": ndcg_at_dims(Path(matryoshka["run_dir"]) / "sentence_transformer",
                                                        args.beir)}
    table = {"head": ["model", "nDCG@10 (held out, 200 queries)", "B - A vs base [95 % CI]",
                      "examples/s", "peak MB"],
             "rows": [["base all-MiniLM-L6-v2", f"{base['ndcg_at_10']:.4f}", "", "", ""]]}
    for seed, (run, st) in enumerate(zip(runs, twins)):
        p = run["paired_ndcg"]
        table["rows"] += [[f"mlxlab MNRL, seed {seed}", f"{run['ndcg_at_10']:.4f}",
                           f"{p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] p={p['p']:.2g}",
                           f"{run['examples_per_s']:.1f}", f"{run['peak_mb']:.0f}"],
                          [f"sentence-transformers MNRL, seed {seed}", f"{st['ndcg_at_10']:.4f}", "",
                           f"{st['examples_per_s']:.1f}", f"{st['peak_mb']:.0f}"]]
    dims_table = {"head": ["model", *[f"nDCG@10 at {d} dims" for d in DIMS]],
                  "rows": [[name, *[f"{v[d]:.4f}" if d in v else "" for d in DIMS]] for name, v in dims.items()]}
    print_table(table)
    print_table(dims_table)
    mean = {"mlxlab": float(np.mean([r["ndcg_at_10"] for r in runs])),
            "sentence_transformers": float(np.mean([t["ndcg_at_10"] for t in twins]))}
    write_record("embed_retrieval", {"base": base, "mlxlab": runs, "sentence_transformers": twins,
                                     "matryoshka": matryoshka, "ndcg_at_dims": dims, "mean_ndcg_at_10": mean,
                                     "table": table, "dims_table": dims_table, "rows": args.rows,
                                     "epochs": args.epochs, "batch": args.batch, "lr": args.lr},
                 question="quality", smoke=args.smoke,
                 summary=f"all-MiniLM-L6-v2 + MNRL on the jargon task: nDCG@10 {base['ndcg_at_10']:.3f} -> "
                         f"{mean['mlxlab']:.3f} (mlxlab), {mean['sentence_transformers']:.3f} "
                         "(sentence-transformers' trainer), mean of the seeds")


if __name__ == "__main__":
    main()
