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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_options, cli_root, smoke_dir, write_jsonl, write_results
from benchmarks.harness import mlxlab_cli as mlxlab
from benchmarks.harness import run_logged as run
from benchmarks.harness import train_cli as train
from benchmarks.quality.bench_gkd_learning import (
    ASSETS,
    export,
    fresh_copies,
    held_out_score,
    scratch_model,
    sft,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, out=("/tmp/bench_grpo", "--smoke: a fresh folder"), sft_steps=200, steps=60,
                replicates=3)
    a = parser.parse_args()
    if a.smoke:  # every stage, a few steps each, two GRPO seeds; the base's range not checked
        a.out, a.sft_steps, a.steps, a.replicates = str(smoke_dir("grpo_learning")), 4, 2, 2
    out = Path(a.out)
    env, uri = cli_root(out)
    heldout = ASSETS / "heldout.jsonl"
    rows = write_jsonl(out / "sft_train.jsonl", fresh_copies(2000, formatted=0.5))
    times: dict[str, float] = {}

    # 1. the base: a short SFT from scratch, one token per character (258 = 256 bytes + 2)
    sft_dir, times["sft"] = sft("grpo_copy_sft", rows, scratch_model(64, 2), a.sft_steps, env, out,
                                "+data.tokenizer.vocab_size=258")
    base = out / "base_model"
    times["export"] = export(sft_dir, base, env, out)

    # 2. the base scored on the held-out prompts: the base run of the comparison
    base_acc, base_run, times["base_eval"] = held_out_score(sft_dir, env, out, "grpo_copy_base", uri)
    print(f"base: held-out exact match {base_acc:.3f} (run {base_run})", flush=True)
    if not a.smoke and not 0.10 <= base_acc <= 0.70:
        sys.exit(f"the base scores {base_acc:.3f}: not between 10 % and 70 %; change --sft-steps")

    # 3. GRPO, three seeds
    _, times["grpo_sweep"] = run(train(
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
