"""Do mlxlab's multiple-choice scores equal lm-eval-harness's on the same weights?

A tiny random Llama (scripts/tiny_hf_model.py) and a 100-question task from the TinyStories
sample (a sentence's ending among three others'), scored by mlxlab and by lm-eval 0.4's `hf` model
on the same folder as a local task yaml. Exits 1 unless acc and acc_norm agree on every example.

    python benchmarks/parity/bench_eval_tasks.py [--out /tmp/bench_eval_tasks] [--questions 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, smoke_dir, write_record  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))


def build_task(path: Path, questions: int, seed: int = 0) -> Path:
    """`questions` multiple-choice rows from TinyStories sentences of 8+ words."""
    from mlxlab.config import asset_path

    text = Path(asset_path("tinystories/sample.txt")).read_text()
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(".")
                 if len(s.split()) >= 8]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(sentences), size=questions * 4, replace=False)
    rows = []
    for q in range(questions):
        group = [sentences[i].split() for i in picked[q * 4:(q + 1) * 4]]
        cut = [int(rng.integers(3, len(words) - 2)) for words in group]
        prompt = " ".join(group[0][:cut[0]])
        endings = [" ".join(words[c:]) for words, c in zip(group, cut)]
        order = rng.permutation(4)
        rows.append({"id": f"s{q}", "prompt": prompt, "choices": [endings[i] for i in order],
                     "answer": int(np.argmax(order == 0))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASK_YAML = """task: mlxlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def lm_eval_scores(model_dir: Path, task_file: Path, yaml_dir: Path, extra: str = ""
                   ) -> tuple[dict, dict]:
    """lm-eval-harness's metrics and per-example (acc, acc_norm, log-likelihoods) by doc id."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    yaml_dir.mkdir(parents=True, exist_ok=True)
    (yaml_dir / "mlxlab_mc.yaml").write_text(TASK_YAML.format(data=task_file))
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32,add_bos_token=True{extra}",
        tasks=["mlxlab_mc"], task_manager=TaskManager(include_path=str(yaml_dir)),
        batch_size=8, device="cpu", log_samples=True)
    metrics = out["results"]["mlxlab_mc"]
    samples = {s["doc_id"]: {"acc": s["acc"], "acc_norm": s["acc_norm"],
                             "loglikelihoods": [float(r[0][0]) for r in s["resps"]]}
               for s in out["samples"]["mlxlab_mc"]}
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/bench_eval_tasks")
    parser.add_argument("--questions", type=int, default=100)
    add_smoke(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # 4 questions, both sides
        args.out, args.questions = str(smoke_dir("eval_tasks")), 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from mlxlab.evaluation.scoring import score_task
    from mlxlab.evaluation.tasks import read_task
    from mlxlab.runs.task_eval import load_eval_model
    from tiny_hf_model import save_tiny_model

    model_dir = save_tiny_model("llama", out / "tiny-llama")
    task_file = build_task(out / "mc100.jsonl", args.questions)
    source = load_eval_model(model_dir)
    ours = score_task(source.model, source.tokenizer, read_task(task_file))
    report: dict = {"questions": len(ours.rows), "mlxlab": ours.metrics}
    same = True
    # lm-eval's default, and without its logits cache (which hands a request the logits of
    # another whose ids it shares, see docs/benchmarks.md "Evaluation tasks")
    for label, extra in (("lm_eval", ""), ("lm_eval_no_logits_cache", ",logits_cache=False")):
        theirs, samples = lm_eval_scores(model_dir, task_file, out / "tasks", extra)
        differ = {k: [r["id"] for i, r in enumerate(ours.rows) if r[k] != samples[i][k]]
                  for k in ("acc", "acc_norm")}
        gaps = [abs(a - b) for i, r in enumerate(ours.rows)
                for a, b in zip(r["loglikelihoods"], samples[i]["loglikelihoods"])]
        report[label] = {**theirs, "examples_differing": differ,
                         "loglikelihoods_over_1e-3": sum(g > 1e-3 for g in gaps),
                         "max_loglikelihood_diff": max(gaps)}
        same = same and not differ["acc"] and not differ["acc_norm"]
    print(json.dumps(report, indent=2))
    write_record("eval-tasks", report, question="parity", smoke=args.smoke,
                 reference="lm-eval-harness's hf model, the same folder",
                 ratio=None if args.smoke else float(same),
                 summary="acc and acc_norm equal on every example (1: yes, 0: no)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
