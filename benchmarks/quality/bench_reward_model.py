"""Does a reward model trained by mlxlab on a real model learn a preference it must read the
instruction for? (objective=reward on SmolLM2-135M-Instruct)

The preference set, built here from a rule held out from training (the runs see only pairs):
the prompt asks for a word in capital or in lowercase letters ("Write the word 'river' in
capital letters."); the chosen reply is the word as asked, the rejected one the word in the other
case. Half the prompts ask for each case, so a reward that prefers one case (or reads only the
reply) scores exactly 0.5: chance. Training and held-out pairs share no word.

1. `mlxlab-train experiment=reward_chat model.pretrained=<SmolLM2 GGUF>`: LoRA rank 8 and the
   scalar head on the 4-bit base, --steps steps of --batch pairs;
2. the finished run as a reward (`mlxlab.runs.learned_reward.LearnedReward`, what GRPO calls)
   on every held-out pair: the pairwise accuracy with its 95 % Wilson interval against chance,
   and the accuracy on each case of prompt apart. The run evaluates once, at its end (20 of the
   held-out pairs), so no checkpoint is chosen by the held-out pairs;
3. (item 4c, unless --skip-policies) the policy itself, at equal steps: DPO on the pairs
   (`experiment=dpo_chat`, --batch pairs a step) and KTO on the same pairs' replies rated
   good/bad (`experiment=kto_chat`, 2 x --batch rows a step: the same replies a step), LoRA on
   the 4-bit base at --policy-lr; the base model and each run scored by `mlxlab eval` on the
   held-out prompts as a generation task (greedy, the chat template, 8 new tokens), the rule's
   answer the word in the case asked: exact match and contains. One seed.
4. (item 4b, unless --skip-grpo) GRPO with LoRA on the 4-bit base, on the training words'
   prompts (chats, the reply the word in the case asked as the `answer` column), two arms, each
   an `mlxlab-train --multirun replicates=--replicates` sweep (seeds 42, 43, 44): rewarded by
   the reward run of stage 1 (`LearnedReward`), or by the rule itself
   (`mlxlab.objectives.rewards.exact_answer`: the reply, stripped, is the word in the case
   asked). Each run evaluates once, at its end (`eval.tasks`: the held-out prompts scored as
   `mlxlab eval` scores them), so nothing is chosen on the held-out prompts; the base is scored
   by `mlxlab eval` into the same store (no training). Then `mlxlab runs compare`: learned
   against rule seed by seed (the held-out exact match's paired difference over seeds, and per
   prompt), and the base against each arm's seeds.

    python benchmarks/quality/bench_reward_model.py [--work DIR] [--steps 60] [--batch 8]
        [--skip-policies] [--skip-grpo] [--grpo-steps 15] [--grpo-batch 4] [--generations 4]
        [--replicates 3] [--reward-run DIR]
    python benchmarks/quality/bench_reward_model.py --smoke    # a tiny random llama, 2 steps

Writes --work/results.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
from benchmarks.harness import add_smoke, cpu_model  # noqa: E402
from benchmarks.harness import mlxlab_cli as mlxlab  # noqa: E402
from benchmarks.harness import run_logged as run  # noqa: E402
from benchmarks.harness import train_cli as train  # noqa: E402

WORDS = [
    "apple", "river", "garden", "window", "candle", "forest", "silver", "pocket", "ladder",
    "mirror", "rabbit", "bottle", "planet", "carpet", "castle", "dragon", "engine", "feather",
    "guitar", "hammer", "island", "jacket", "kettle", "lemon", "magnet", "needle", "orange",
    "pencil", "pillow", "puzzle", "rocket", "saddle", "shadow", "spider", "sponge", "statue",
    "ticket", "tunnel", "turtle", "velvet", "wallet", "whistle", "winter", "yellow", "anchor",
    "basket", "bridge", "button", "camera", "cherry", "circle", "cotton", "desert", "doctor",
    "eagle", "finger", "flower", "friend", "frozen", "garlic", "glove", "honey", "insect",
    "jungle", "kitten", "ladle", "marble", "meadow", "monkey", "museum", "noodle", "ocean",
    "paddle", "parrot", "pepper", "pirate", "pumpkin", "rainbow", "ribbon", "salmon", "school",
    "signal", "silk", "singer", "sister", "spoon", "summer", "sunset", "tiger", "tomato", "tower",
    "travel", "valley", "violin", "walnut", "water", "wheel", "wizard", "wonder",
]
CASES = {"capital": str.upper, "lowercase": str.lower}


def pairs(words: list[str], rng: random.Random) -> list[dict]:
    """Both cases of each word: the chosen reply in the case asked, the rejected in the other."""
    rows = []
    for word in words:
        for case, other in (("capital", "lowercase"), ("lowercase", "capital")):
            rows.append({"prompt": f"Write the word '{word}' in {case} letters.",
                         "chosen": CASES[case](word), "rejected": CASES[other](word),
                         "case": case})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_task(run_or_model: str, task: Path, env: dict, log: Path) -> dict:
    """`mlxlab eval` of the held-out prompts as a generation task (into the work folder's
    store): exact match, contains and the evaluation's run id."""
    text, wall = run(mlxlab("eval", run_or_model, str(task), "--tasks", "--max-new-tokens", "8",
                            "--uri", store(env), "--experiment", "reward_model_eval", "--json"),
                     env, log)
    report, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    metrics = report["tasks"][task.stem]["metrics"]
    return {"exact_match": metrics["exact_match"]["value"], "contains": metrics["contains"]["value"],
            "run_id": report.get("run_id"), "eval_wall_s": wall}


def store(env: dict) -> str:
    """The MLflow store of the work folder (MLXLAB_ROOT): every run and evaluation of the script."""
    return f"sqlite:///{env['MLXLAB_ROOT']}/mlruns/mlflow.db"


def chat_prompts(rows: list[dict]) -> list[dict]:
    """GRPO's prompt rows: the instruction as a user turn (the chat template renders it, as the
    held-out evaluation does), the rule's reply as the `answer` column."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["chosen"]}
            for r in rows]


def grpo(args, model: str, data: Path, train_rows: list[dict], task: Path, reward_run: Path,
         env: dict, work: Path) -> dict:
    """Stage 4: GRPO against the learned reward and against the rule, --replicates seeds each,
    and the comparisons (`mlxlab runs compare`)."""
    write_jsonl(data / "grpo_train.jsonl", chat_prompts(train_rows))
    # the runs' own evaluation (their val/reward): training prompts, never the held-out ones
    write_jsonl(data / "grpo_val.jsonl", chat_prompts(train_rows[: args.grpo_batch]))
    uri = store(env)
    base = held_out_task(model, task, env, work / "eval_base.log")
    learned = ("objective.rewards=[{_target_: mlxlab.runs.learned_reward.LearnedReward, "
               f"run: '{reward_run}', batch_size: {args.generations * args.grpo_batch}}}]")
    arms = {"learned": [learned, "task_name=grpo_case_learned"],
            "rule": ["objective.rewards=[{_target_: mlxlab.objectives.rewards.exact_answer}]",
                     "task_name=grpo_case_rule"]}
    out: dict = {"base": base, "steps": args.grpo_steps, "prompts_per_step": args.grpo_batch,
                 "generations": args.generations, "lr": args.grpo_lr,
                 "replicates": args.replicates}
    for name, extra in arms.items():
        text, wall = run(train(
            "--multirun", "experiment=grpo_arithmetic", *extra, f"model.pretrained={model}",
            f"data.train_file={data / 'grpo_train.jsonl'}",
            f"data.val_file={data / 'grpo_val.jsonl'}", f"replicates={args.replicates}",
            f"trainer.max_steps={args.grpo_steps}", f"trainer.eval_every_steps={args.grpo_steps}",
            f"trainer.batch_size={args.grpo_batch}", f"objective.num_generations={args.generations}",
            "objective.max_completion_length=8", f"optimizer.learning_rate={args.grpo_lr}",
            f"eval.tasks=[{task}]", "eval.max_new_tokens=8", "callbacks.progress.enabled=false",
            "hydra/launcher=basic"), env, work / f"grpo_{name}.log")
        parent = re.search(r"MLflow sweep parent run ([0-9a-f]{32})", text)
        if parent is None:
            sys.exit(f"no sweep parent run in {work / f'grpo_{name}.log'}")
        out[name] = {"sweep": parent.group(1), "train_wall_s": wall}
    metric = f"eval/{task.stem}/exact_match"
    compares = {"learned_vs_rule": [out["rule"]["sweep"], out["learned"]["sweep"]],
                "base_vs_learned": [base["run_id"], out["learned"]["sweep"]],
                "base_vs_rule": [base["run_id"], out["rule"]["sweep"]]}
    for name, refs in compares.items():
        extra = ["--metric", metric, "--mode", "max"] if name == "learned_vs_rule" else []
        for fmt in ([], ["--json"]):
            text, _ = run(mlxlab("runs", "compare", *refs, *extra, "--uri", uri, "--no-record",
                                 *fmt), env, work / f"compare_{name}{'_json' if fmt else ''}.log")
            if fmt:
                out[name] = json.loads(text[text.index("{"):])
            else:
                print(text, flush=True)
    return out


def policies(args, model: str, data: Path, train_rows: list[dict], held_rows: list[dict],
             env: dict, work: Path) -> dict:
    """Stage 3: the base model, DPO on the pairs and KTO on their replies rated, each scored on
    the held-out prompts by the rule."""
    unpaired = [row for r in train_rows for row in (
        {"prompt": r["prompt"], "completion": r["chosen"], "label": True},
        {"prompt": r["prompt"], "completion": r["rejected"], "label": False})]
    write_jsonl(data / "train_unpaired.jsonl", unpaired)
    val = [r for r in held_rows[:8]]
    write_jsonl(data / "val_unpaired.jsonl", [row for r in val for row in (
        {"prompt": r["prompt"], "completion": r["chosen"], "label": True},
        {"prompt": r["prompt"], "completion": r["rejected"], "label": False})])
    task = work / "heldout.jsonl"
    out = {"base": held_out_task(str(model), task, env, work / "eval_base.log")}
    common = [f"model.pretrained={model}", f"trainer.max_steps={args.steps}",
              f"trainer.eval_every_steps={args.steps}", "trainer.schedule.warmup_steps=0",
              f"optimizer.learning_rate={args.policy_lr}", "callbacks.progress.enabled=false",
              f"seed={args.seed}"]
    arms = {"dpo": ["experiment=dpo_chat", f"data.train_file={data / 'train.jsonl'}",
                    f"data.val_file={data / 'val.jsonl'}", f"trainer.batch_size={args.batch}"],
            "kto": ["experiment=kto_chat", f"data.train_file={data / 'train_unpaired.jsonl'}",
                    f"data.val_file={data / 'val_unpaired.jsonl'}",
                    f"trainer.batch_size={2 * args.batch}"]}
    for name, extra in arms.items():
        run_dir = work / f"{name}_run"
        _, wall = run(train(*extra, *common, f"hydra.run.dir={run_dir}"), env,
                      work / f"train_{name}.log")
        out[name] = {**held_out_task(str(run_dir), task, env, work / f"eval_{name}.log"),
                     "train_wall_s": wall}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_smoke(p)
    p.add_argument("--work", default=None, help="folder for data, the run and results.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout-words", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy-lr", type=float, default=5e-4)
    p.add_argument("--skip-policies", action="store_true", help="no DPO / KTO stage (4c)")
    p.add_argument("--skip-grpo", action="store_true", help="no GRPO stage (4b)")
    p.add_argument("--reward-run", default=None,
                   help="a finished reward run of this script (same --seed: the same words) to "
                        "use instead of training stage 1 again")
    p.add_argument("--grpo-steps", type=int, default=15)
    p.add_argument("--grpo-batch", type=int, default=4, help="prompts per GRPO step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--grpo-lr", type=float, default=5e-4)
    p.add_argument("--replicates", type=int, default=3, help="GRPO seeds per arm (42, 43, ...)")
    args = p.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_reward_model_")).resolve()
    rng = random.Random(args.seed)
    words = sorted(set(WORDS))
    rng.shuffle(words)
    held, train_words = words[: args.heldout_words], words[args.heldout_words:]
    if args.smoke:
        from real_model_finetune import smoke_model

        model = smoke_model(work)
        held, train_words, args.steps, args.batch = held[:4], train_words[:8], 2, 2
        args.heldout_words, args.grpo_steps, args.grpo_batch, args.generations = 4, 2, 2, 2
        args.replicates = 2
    else:
        from real_models import packaged_model

        model = packaged_model()
    train_rows, held_rows = pairs(train_words, rng), pairs(held, rng)
    val_rows = held_rows[: max(4, len(held_rows) // 4)]  # the run's own evaluations
    data = work / "data"
    keys = ("prompt", "chosen", "rejected")
    write_jsonl(data / "train.jsonl", [{k: r[k] for k in keys} for r in train_rows])
    write_jsonl(data / "val.jsonl", [{k: r[k] for k in keys} for r in val_rows])
    env = {**os.environ, "MLXLAB_ROOT": str(work)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run_dir = Path(args.reward_run).resolve() if args.reward_run else work / "reward_run"
    wall = None
    if not args.reward_run:
        _, wall = run(train(
            "experiment=reward_chat", f"model.pretrained={model}",
            f"data.train_file={data / 'train.jsonl'}", f"data.val_file={data / 'val.jsonl'}",
            f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch}",
            f"trainer.eval_every_steps={args.steps}", f"optimizer.learning_rate={args.lr}",
            "trainer.schedule.warmup_steps=0", "callbacks.progress.enabled=false",
            f"seed={args.seed}", f"hydra.run.dir={run_dir}"), env, work / "train.log")

    from mlxlab.runs.learned_reward import LearnedReward
    from mlxlab.stats import proportion_interval

    reward = LearnedReward(str(run_dir))
    prompts = [r["prompt"] for r in held_rows]
    chosen = reward(prompts, [r["chosen"] for r in held_rows])
    rejected = reward(prompts, [r["rejected"] for r in held_rows])
    right = [c > r for c, r in zip(chosen, rejected)]
    low, high = proportion_interval(sum(right), len(right))
    by_case = {case: sum(ok for ok, r in zip(right, held_rows) if r["case"] == case)
               / sum(r["case"] == case for r in held_rows) for case in CASES}
    results = {"model": "tiny random llama (smoke)" if args.smoke else
               "SmolLM2-135M-Instruct Q4_1 GGUF", "cpu": cpu_model(), "steps": args.steps,
               "batch": args.batch, "lr": args.lr, "train_pairs": len(train_rows),
               "heldout_pairs": len(right), "heldout_accuracy": sum(right) / len(right),
               "interval_95": [low, high], "chance": 0.5, "accuracy_by_case": by_case,
               "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(right),
               "train_wall_s": wall}
    write_jsonl(work / "heldout.jsonl", [
        {"id": str(i), "prompt": r["prompt"], "answer": r["chosen"]}
        for i, r in enumerate(sorted(held_rows, key=lambda r: r["prompt"]))])
    if not args.skip_policies:
        results["policies"] = policies(args, str(model), data, train_rows, held_rows, env, work)
    if not args.skip_grpo:
        results["grpo"] = grpo(args, str(model), data, train_rows, work / "heldout.jsonl",
                               run_dir, env, work)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
