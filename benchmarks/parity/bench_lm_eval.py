"""Does lm-eval-harness score an mlxlab model as it scores the same weights through its own `hf`
model, and how fast is it beside `hf` and `mlx_lm.evaluate`?

SmolLM2-135M-Instruct (its Q4_1 GGUF as MLX 4-bit layers; transformers' float32 load for `hf`)
on local multiple-choice, generate_until and loglikelihood_rolling tasks from TinyStories. Exits 1
unless every log-likelihood is within --rtol and every multiple-choice and perplexity score
agrees (differing greedy generations are counted). `--scorer`: mlxlab's own multiple-choice
scorer beside `hf` on a tiny random Llama (exit 1 unless acc and acc_norm agree everywhere).

    python benchmarks/parity/bench_lm_eval.py [--out DIR] [--questions 100] [--skip-mlx-lm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h  # noqa: E402

TASKS = ("tiny_mc", "tiny_gen", "tiny_ppl")

# The tasks' YAML: what all three share (their name and data filled in), then each one's own
COMMON = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
"""
YAML = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: answer
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n", "."], do_sample: false, max_gen_toks: 16}
filter_list:
  - name: first-word
    filter:
      - {function: regex, regex_pattern: "(\\\\w+)", group_select: 0}
      - {function: take_first}
metric_list: [{metric: exact_match, ignore_case: true}]
""",
    "tiny_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
}

def sentences() -> list[str]:
    """The shipped TinyStories sample's sentences of 8 words or more (no full stop)."""
    from mlxlab.config import asset_path

    text = Path(asset_path("tinystories/sample.txt")).read_text()
    return [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) >= 8]


def choice_row(group: list[list[str]], rng) -> dict:
    """A multiple-choice row of four sentences' words: the first's opening words, its ending
    among the others' (each cut at a random word)."""
    cut = [int(rng.integers(3, len(words) - 2)) for words in group]
    order = rng.permutation(4)
    endings = [" ".join(words[c:]) + "." for words, c in zip(group, cut)]
    return {"prompt": " ".join(group[0][:cut[0]]), "choices": [endings[i] for i in order],
            "answer": int(np.argmax(order == 0))}


def write_tasks(folder: Path, questions: int, seed: int = 0) -> list[str]:
    """The three task YAMLs and their jsonl data in `folder`; their paths."""
    from mlxlab.config import asset_path

    folder.mkdir(parents=True, exist_ok=True)
    text = Path(asset_path("tinystories/sample.txt")).read_text()
    pool = sentences()
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=questions * 5, replace=False)
    mc, gen = [], []
    for q in range(questions):
        mc.append(choice_row([pool[i].split() for i in picked[q * 4:(q + 1) * 4]], rng))
        words = pool[picked[questions * 4 + q]].split()
        at = int(rng.integers(3, len(words) - 1))
        gen.append({"prompt": " ".join(words[:at]), "answer": words[at].strip(",!?\"'")})
    paragraphs = [p.strip() for p in text.split("\n\n") if 200 < len(p.strip()) < 1200]
    ppl = [{"text": p} for p in paragraphs[:max(2, questions // 5)]]
    paths = []
    for name, rows in (("tiny_mc", mc), ("tiny_gen", gen), ("tiny_ppl", ppl)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(COMMON.format(name=name, data=data) + YAML[name])
        paths.append(str(folder / f"{name}.yaml"))
    return paths


def evaluate(lm, tasks: list[str]) -> tuple[dict, float]:
    """lm-eval's results and samples of `lm` on `tasks`, and the seconds it took."""
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0)
    return out, time.perf_counter() - start


def per_example(out: dict) -> dict[str, dict[int, dict]]:
    """{task: {doc id: {log-likelihoods, scores, generation}}} from lm-eval's samples."""
    found: dict[str, dict[int, dict]] = {}
    for task, samples in out["samples"].items():
        for s in samples:
            row = found.setdefault(task, {}).setdefault(s["doc_id"], {})
            if task == "tiny_gen":
                row["generation"] = s["resps"][0][0]
            else:
                row["lls"] = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0])
                              for r in s["resps"]]
            row.update({m: float(s[m]) for m in s["metrics"]
                        if isinstance(s[m], (int, float))})
    return found


def compare(ours: dict, theirs: dict, rtol: float) -> tuple[dict, bool]:
    a, b = per_example(ours), per_example(theirs)
    report, same = {}, True
    for task in TASKS:
        pairs = [(x, y) for i in b[task] if "lls" in b[task][i]
                 for x, y in zip(a[task][i]["lls"], b[task][i]["lls"])]
        gaps = [abs(x - y) / max(abs(y), 1e-12) for x, y in pairs]
        scores = [m for m in ("acc", "acc_norm", "exact_match") if m in b[task][0]]
        differ = {m: [i for i in b[task] if a[task][i][m] != b[task][i][m]] for m in scores}
        entry = {"examples": len(b[task]), "scores_differing": differ}
        if gaps:
            entry["loglikelihoods"] = len(gaps)
            entry["max_relative_loglikelihood_gap"] = max(gaps)
            entry["max_absolute_loglikelihood_gap"] = max(abs(x - y) for x, y in pairs)
            entry["loglikelihoods_over_rtol"] = sum(g > rtol for g in gaps)
            same = same and max(gaps) <= rtol
        if task == "tiny_gen":
            entry["generations_differing"] = [
                {"doc": i, "mlxlab": a[task][i]["generation"], "hf": b[task][i]["generation"]}
                for i in b[task] if a[task][i]["generation"] != b[task][i]["generation"]]
        else:
            same = same and not any(differ.values())
        report[task] = entry
    return report, same


def metrics(out: dict) -> dict:
    return {task: {k: v for k, v in r.items() if "," in k and isinstance(v, float)}
            for task, r in out["results"].items()}


def models(smoke: bool, out: Path) -> tuple[str, Path, Path]:
    """(what mlxlab loads, the hf folder, the mlx-lm folder)."""
    if smoke:
        folder = h.tiny_hf_model().save_tiny_model("llama", out / "tiny-llama")
        return str(folder), folder, folder
    sys.path.insert(0, str(h.REPO / "tests"))
    from mlxlab.models.sources import resolve
    from real_models import packaged_model

    gguf = packaged_model()
    return str(gguf), h.float_smollm2(out / "hf"), resolve(str(gguf)).folder


def scorer_rows(questions: int, seed: int = 0) -> list[dict]:
    """The scorer's multiple-choice rows: a TinyStories sentence's first words, its ending among
    three other sentences' (so choices differ in length and acc_norm differs from acc)."""
    rows, rng = sentences(), np.random.default_rng(seed)
    picked = rng.choice(len(rows), size=questions * 4, replace=False)
    return [{"id": f"s{q}", **choice_row([rows[i].split() for i in picked[q * 4:(q + 1) * 4]], rng)}
            for q in range(questions)]


def scorer_parity(out: Path, questions: int) -> tuple[dict, bool]:
    """mlxlab's own multiple-choice scorer (evaluation/scoring.py) against lm-eval's `hf` model on
    a tiny random Llama's folder, example by example: lm-eval as it runs by default and without
    its logits cache (which hands a request the logits of another whose ids it shares)."""
    from lm_eval.models.huggingface import HFLM

    from mlxlab.evaluation.scoring import score_task
    from mlxlab.evaluation.tasks import read_task
    from mlxlab.runs.named_model import load_eval_model

    folder, _, _ = models(True, out)
    task = write_tasks(out / "tasks", 1)[0]  # tiny_mc's YAML, on the scorer's rows
    h.write_jsonl(out / "tasks" / "tiny_mc.jsonl", scorer_rows(questions))
    source = load_eval_model(folder)
    ours = score_task(source.model, source.tokenizer, read_task(out / "tasks" / "tiny_mc.jsonl"))
    report: dict = {"questions": len(ours.rows), "mlxlab": ours.metrics}
    same = True
    for label, cache in (("lm_eval", True), ("lm_eval_no_logits_cache", False)):
        res, _ = evaluate(HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8,
                               add_bos_token=True, logits_cache=cache), [task])
        theirs = per_example(res)["tiny_mc"]
        differ = {k: [r["id"] for i, r in enumerate(ours.rows) if r[k] != theirs[i][k]]
                  for k in ("acc", "acc_norm")}
        gaps = [abs(a - b) for i, r in enumerate(ours.rows)
                for a, b in zip(r["loglikelihoods"], theirs[i]["lls"])]
        report[label] = {**metrics(res)["tiny_mc"], "examples_differing": differ,
                         "loglikelihoods_over_1e-3": sum(g > 1e-3 for g in gaps),
                         "max_loglikelihood_diff": max(gaps)}
        same = same and not any(differ.values())
    return report, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    h.add_options(parser, out="/tmp/bench_lm_eval", questions=100, batch_size=8, rtol=1e-4,
                  skip_mlx_lm=False, scorer=(False, "mlxlab's own multiple-choice scorer beside "
                                             "lm-eval's hf model, on a tiny random Llama"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.out, args.questions, args.skip_mlx_lm = str(h.smoke_dir("lm_eval")), 4, True
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    if args.scorer:
        report, same = scorer_parity(out / "scorer", args.questions)
        print(json.dumps(report, indent=2))
        h.write_record("eval-tasks", report, question="parity", smoke=args.smoke,
                       reference="lm-eval-harness's hf model, the same folder", ratio=float(same),
                       summary="mlxlab's acc and acc_norm equal on every example (1: yes, 0: no)")
        return 0 if same else 1
    tasks = write_tasks(out / "tasks", args.questions)
    mine, hf_folder, mlx_folder = models(args.smoke, out)

    from lm_eval.models.huggingface import HFLM

    from mlxlab.evaluation.lm_eval.registered import harness_lm
    from mlxlab.runs.named_model import load_eval_model

    ours, ours_s = evaluate(harness_lm(load_eval_model(mine), args.batch_size), tasks)
    theirs, theirs_s = evaluate(HFLM(pretrained=str(hf_folder), dtype="float32", device="cpu",
                                     batch_size=args.batch_size), tasks)
    report: dict = {"model": mine, "questions": args.questions,
                    "seconds": {"mlxlab": ours_s, "hf": theirs_s},
                    "metrics": {"mlxlab": metrics(ours), "hf": metrics(theirs)}}
    if not args.skip_mlx_lm:
        import contextlib

        from mlx_lm.evaluate import MLXLM

        with contextlib.redirect_stdout(sys.stderr):  # its batch progress prints to stdout
            mlx, mlx_s = evaluate(MLXLM(str(mlx_folder), batch_size=args.batch_size,
                                        use_chat_template=False), tasks)
        report["seconds"]["mlx_lm.evaluate"] = mlx_s
        report["metrics"]["mlx_lm.evaluate"] = metrics(mlx)
    report["parity"], same = compare(ours, theirs, args.rtol)
    report.update(rtol=args.rtol, parity_holds=same)
    print(json.dumps(report, indent=2))
    h.write_record("lm-eval-parity", report, question="parity", smoke=args.smoke,
                   reference="lm-eval-harness's hf model on the same weights",
                   ratio=float(same), summary="the same scores as lm-eval's own model, example by "
                   "example (1: yes, 0: no)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
