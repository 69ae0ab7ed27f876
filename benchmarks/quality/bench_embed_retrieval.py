"""Does an embedder fine-tuned on mlxlab's loop beat its base per query, and match sentence-transformers'
trainer on the same rows (the jargon task, all-MiniLM-L6-v2, MNRL and MatryoshkaLoss), how fast and in
how much memory? Each training run is its own process, the two sides alternating (ABBA) and counted
alike: examples/s = rows x epochs / its wall seconds (start-up, evaluation and saving included),
and over its training loop alone (sentence-transformers' train_runtime; mlxlab's from its
`training:` line to the last step's logged loss, the compiles included).

    python benchmarks/quality/bench_embed_retrieval.py [--model DIR] [--seeds 3] [--out DIR] [--smoke]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]  # benchmarks.*, the task, models
import benchmarks.harness as h  # noqa: E402
from make_jargon_retrieval import write_task  # noqa: E402

DIMS, EPOCHS, BATCH, LR = (64, 128, 256, 384), 1, 32, 5e-5  # the cuts; experiment=embed_retrieval's settings


def train(a, *extra: str, twin: int | None = None) -> dict:
    """One training process, mlxlab's (`extra`: overrides) or the twin's (`twin`: its seed): its folder,
    nDCG@10 (mlxlab's paired with the base's per query), examples/s, wall s, peak MB, the load after."""
    cmd = h.train_cli(*a.common, *extra) if twin is None else [
        sys.executable, __file__, "--model", a.model, "--out", str(a.out), "--twin", str(twin)]
    proc, peak = h.run_with_peak_rss(cmd, env=a.env, cwd=a.out)
    out = proc.stdout + proc.stderr
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[1:6])} failed:\n{out[-3000:]}")
    figures = {"examples_per_s": a.rows * EPOCHS / proc.wall_s, "wall_s": proc.wall_s, "peak_mb": peak, "load": h.load()}
    if twin is not None:
        found = json.loads(h.line_value(out, "twin:"))
        return {**figures, **found, "train_examples_per_s": a.rows * EPOCHS / found["train_s"]}
    from mlflow import MlflowClient

    from mlxlab.evaluation.paired import pair_runs, verdict
    from mlxlab.evaluation.run_scores import folder_scores

    folder = Path(h.line_value(out, "run dir:"))
    if "trainer.max_steps=0" not in extra:  # the training loop: its start to the last loss logged
        losses = MlflowClient(a.uri).get_metric_history(h.line_value(out, "mlflow run:").split()[0], "train/loss")
        start = next(line[1:24] for line in out.splitlines() if "][mlxlab.training][INFO] - training:" in line)
        figures["train_s"] = max(m.timestamp for m in losses) / 1000 - time.mktime(
            time.strptime(start[:19], "%Y-%m-%d %H:%M:%S")) - int(start[20:]) / 1000
        figures["train_examples_per_s"] = a.rows * EPOCHS / figures["train_s"]
    paired = pair_runs(folder_scores(a.base_dir or folder, "last"), folder_scores(folder, "last"))
    (p,) = [p for p in paired if p.metric == "ndcg_at_10"]
    return {**figures, "run_dir": str(folder), "folder": str(folder / "sentence_transformer"),
            "ndcg_at_10": p.b, "paired_ndcg": {**vars(p), "verdict": verdict(p)}}


def twin(a) -> None:
    """SentenceTransformerTrainer on the same rows, loss and settings, scored by its own evaluator."""
    import sentence_transformers as st
    import torch
    from datasets import Dataset
    from sentence_transformers import losses
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    torch.set_num_threads(2)
    model, folder = st.SentenceTransformer(a.model, device="cpu"), a.out / f"st_{a.twin}"
    settings = st.SentenceTransformerTrainingArguments(
        output_dir=str(folder), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_steps=2, lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, seed=a.twin,
        report_to=[], save_strategy="no", logging_steps=10, use_cpu=True)
    trained = st.SentenceTransformerTrainer(model=model, args=settings, train_dataset=Dataset.from_list(h.read_jsonl(
        a.out / "task" / "fit.jsonl")), loss=losses.MultipleNegativesRankingLoss(model)).train()
    from mlxlab.data.beir import read_beir  # after the training: MLX is never loaded beside it

    found = read_beir(a.out / "task" / "jargon")
    scores = InformationRetrievalEvaluator(dict(zip(found.query_ids, found.queries)), dict(zip(
        found.corpus_ids, found.corpus)), found.relevant, write_csv=False)(model)
    model.save(str(folder / "final"))
    print("twin:", json.dumps({"ndcg_at_10": scores["cosine_ndcg@10"], "folder": str(folder / "final"),
                               "train_s": trained.metrics["train_runtime"]}))


def row(name: str, r: dict, beir: Path) -> list[str]:
    """A table row; r["ndcg_at_dims"]: nDCG@10 with the model's vectors cut to each of DIMS."""
    from mlxlab.data.beir import read_beir
    from mlxlab.models.embedders.sentence_folder import TextEmbedder
    from mlxlab.objectives.embedding.retrieval import score_retrieval

    found, model = read_beir(beir), TextEmbedder(Path(r["folder"]))
    q, docs = model.encode(found.queries), model.encode(found.corpus)
    r["ndcg_at_dims"] = {d: score_retrieval("t", q[:, :d], found.query_ids, docs[:, :d], found.corpus_ids,
                                            found.relevant).metrics["ndcg_at_10"] for d in DIMS if d <= q.shape[1]}
    paired = r["paired_ndcg"]["verdict"] if r.get("paired_ndcg") else ""
    return [name, f"{r['ndcg_at_10']:.4f}", paired, *[f"{r['ndcg_at_dims'].get(d, np.nan):.4f}" for d in DIMS],
            f"{r['examples_per_s']:.1f}", f"{r['train_examples_per_s']:.1f}" if "train_s" in r else "",
            f"{r['peak_mb']:.0f}", f"{r['load']:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kind, default in (("--model", str, None), ("--seeds", int, 3), ("--out", Path, None),
                                ("--twin", int, None)):
        parser.add_argument(flag, type=kind, default=default)
    h.add_smoke(parser)
    a = parser.parse_args()
    if a.twin is not None:
        return twin(a)
    if a.model is None:  # all-MiniLM-L6-v2 as the tests read it
        from real_models import MINILM, packaged_folder

        a.model = str(packaged_folder(MINILM))
    a.out = (a.out or (h.smoke_dir("embed_retrieval") if a.smoke else Path("bench_embed_retrieval"))).resolve()
    task = write_task(a.out / "task", *((64, 20) if a.smoke else (800, 200)), seed=0)  # 10 % of it: validation
    lines = (task / "train.jsonl").read_text().splitlines(keepends=True)
    a.rows, (a.env, a.uri), a.base_dir = len(lines) - len(lines) // 10, h.cli_root(a.out), None
    (task / "fit.jsonl").write_text("".join(lines[:a.rows]))
    (task / "val.jsonl").write_text("".join(lines[a.rows:]))
    a.common = ["experiment=embed_retrieval", f"model.pretrained={a.model}", f"data.train_file={task}/fit.jsonl",
                f"data.val_file={task}/val.jsonl", f"data.eval_dir={task}/jargon", f"tracking.uri={a.uri}",
                "callbacks.progress.enabled=false", "callbacks.early_stopping.patience=0",
                "trainer.eval_every_steps=null"]  # evaluated once, after the epoch
    base = train(a, "trainer.max_steps=0", "task_name=embed_base")
    runs, twins, a.base_dir = [], [], base["run_dir"]
    for seed in range(1 if a.smoke else a.seeds):
        for side in h.in_round(["mlxlab", "twin"], seed):  # ABBA: a slow spell hits both sides
            (runs if side == "mlxlab" else twins).append(train(a, f"seed={seed}", twin=seed if side == "twin" else None))
    matryoshka = train(a, "seed=0", "objective=matryoshka", "task_name=embed_matryoshka")
    named = [("base", {**base, "folder": a.model, "paired_ndcg": None}), *[
        (f"{side} MNRL, seed {seed}", r) for seed, pair in enumerate(zip(runs, twins))
        for side, r in zip(("mlxlab", "sentence-transformers"), pair)], ("mlxlab Matryoshka", matryoshka)]
    table = {"head": ["model", "nDCG@10 (held out)", "vs the base, query by query", *[f"at {d} dims" for d in DIMS],
                      "examples/s", "in its training loop", "peak MB", "load after"], "rows": [row(n, r, task / "jargon") for n, r in named]}
    mean = {side: float(np.mean([r["ndcg_at_10"] for r in rs])) for side, rs in (("mlxlab", runs), ("st", twins))}
    speed, train_speed = (float(np.median([r[k] / t[k] for r, t in zip(runs, twins)]))
                          for k in ("examples_per_s", "train_examples_per_s"))
    h.print_table(table)
    h.write_record("embed_retrieval", {  # mlxlab's examples/s over the twin's (wall, loop), median of the seeds
        "base": base, "mlxlab": runs, "sentence_transformers": twins, "matryoshka": matryoshka, "table": table,
        "mean_ndcg_at_10": mean, "speed_ratio": speed, "train_speed_ratio": train_speed, "rows": a.rows, "epochs": EPOCHS, "batch": BATCH, "lr": LR},
        question="quality", smoke=a.smoke)


if __name__ == "__main__":
    main()
