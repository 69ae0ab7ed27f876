"""Does GRPO make a model better than its base, proven over seeds?

The copy task (experiment=grpo_copy: "4719=" -> "[4719]", exact-answer reward; assets/copy_format/).
The base: a tiny decoder SFT'd so it writes the format for some prompts only (held-out accuracy
between 10 % and 70 %, checked), exported; then `mlxlab-train -m experiment=grpo_copy
replicates=3` with LoRA, and `mlxlab runs compare` of each seed against the base, with a paired
bootstrap interval of GRPO - base over the 200 held-out prompts.

    python benchmarks/quality/bench_grpo_learning.py [--out /tmp/bench_grpo] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, line_value, smoke_dir, write_results
from benchmarks.harness import mlxlab_cli as mlxlab
from benchmarks.harness import run_logged as run
from benchmarks.harness import train_cli as train

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "src" / "mlxlab" / "assets" / "copy_format"


def sft_rows(n: int, taken: set[str], seed: int = 1) -> list[dict]:
    """`n` copies of fresh four-digit strings (none of the GRPO or held-out prompts), half of
    them written in the answer format."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        s = "".join(rng.choice("0123456789") for _ in range(4))
        if s in taken:
            continue
        taken.add(s)
        rows.append({"prompt": f"{s}=", "completion": f"[{s}]" if rng.random() < 0.5 else s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bench_grpo")  # --smoke: a fresh folder
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--replicates", type=int, default=3)
    add_smoke(parser)
    a = parser.parse_args()
    if a.smoke:  # every stage, a few steps each, two GRPO seeds; the base's range not checked
        a.out, a.sft_steps, a.steps, a.replicates = str(smoke_dir("grpo_learning")), 4, 2, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLXLAB_ROOT": str(out), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{out}/mlruns/mlflow.db"
    heldout = ASSETS / "heldout.jsonl"
    taken = {json.loads(x)["prompt"][:-1] for f in ("train", "heldout")
             for x in (ASSETS / f"{f}.jsonl").read_text().splitlines()}
    sft = out / "sft_train.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(2000, taken)))
    times: dict[str, float] = {}

    # 1. the base: a short SFT from scratch, one token per character (258 = 256 bytes + 2)
    sft_out, times["sft"] = run(train(
        "task_name=grpo_copy_sft", "model=transformer", "model.dim=64", "model.num_layers=2",
        "model.num_heads=4", "model.max_seq_len=32", "data=completions",
        f"data.train_file={sft}", "data.val_fraction=0.05", "+data.tokenizer.vocab_size=258",
        "data.max_length=16", "trainer.batch_size=32", "trainer.max_epochs=null",
        f"trainer.max_steps={a.sft_steps}", f"trainer.eval_every_steps={a.sft_steps}",
        "optimizer.learning_rate=3e-3", "callbacks.progress.enabled=false",
        "optimized_metric=val/loss", "optimized_mode=min", "seed=0"), env, out / "sft.log")
    sft_dir = Path(line_value(sft_out, "run dir:"))
    base = out / "base_model"
    _, times["export"] = run(mlxlab("export", str(sft_dir), "--format", "hf", "--out", str(base),
                                    "--overwrite"), env, out / "export.log")

    # 2. the base scored on the held-out prompts: the base run of the comparison
    eval_out, times["base_eval"] = run(mlxlab(
        "eval", str(sft_dir), str(heldout), "--tasks", "--max-new-tokens", "8", "--uri", uri,
        "--experiment", "grpo_copy_base", "--json"), env, out / "base_eval.log")
    report, _ = json.JSONDecoder().raw_decode(eval_out[eval_out.index("{"):])
    base_acc = report["tasks"]["heldout"]["metrics"]["exact_match"]["value"]
    base_run = report.get("run_id")
    print(f"base: held-out exact match {base_acc:.3f} (run {base_run})", flush=True)
    if not a.smoke and not 0.10 <= base_acc <= 0.70:
        sys.exit(f"the base scores {base_acc:.3f}: not between 10 % and 70 %; change --sft-steps")

    # 3. GRPO, three seeds
    grpo_out, times["grpo_sweep"] = run(train(
        "--multirun", "experiment=grpo_copy", f"model.pretrained={base}",
        f"replicates={a.replicates}", f"trainer.max_steps={a.steps}",
        f"eval.tasks=[{heldout}]", "eval.max_new_tokens=8", "callbacks.progress.enabled=false",
        "hydra/launcher=basic"), env, out / "grpo.log")

    # 4. the comparisons
    compare, times["compare"] = run(mlxlab("runs", "compare", base_run, "latest", "--uri", uri,
                                           "--json"), env, out / "compare.log")
    write_results(out, {"base_exact_match": base_acc, "base_run": base_run}, compare, compare,
                  times, record="grpo-learning", smoke=a.smoke)


if __name__ == "__main__":
    main()
