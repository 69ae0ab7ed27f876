"""Does multi-turn GRPO with a tool work, proven over seeds? The task (experiment=agent_tools):
"What is the code of kalomi?", a code no model can know but the tool `lookup_code` returns;
reward: the exact code; 300 names to train on, 100 held out (assets/lookup_codes/).

Parts (--parts): `tiny` (a random Qwen2 taught the call format by a short SFT, then GRPO with the
tool beside GRPO without it over --seeds seeds at the same budget, held-out accuracy paired by
seed (`mlxlab runs compare`) and each seed against the SFT start (McNemar's exact test); the
environment knows the question, so the model must learn to call and copy), `real`
(SmolLM2-135M-Instruct SFT'd on mlxlab's tagged call format, GRPO with LoRA from one of its
snapshots and an optional format reward, held-out accuracy
before and after, McNemar), `speed` (rollouts/s of multi-turn beside single-turn GRPO, alternating
rounds). Each stage's log and <out>/results.json; `--reuse-sft` keeps an earlier SFT model.

    python benchmarks/quality/bench_agent_tools.py [--out /tmp/bench_agent] [--seeds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h
from benchmarks.harness import mlxlab_cli as mlxlab
from benchmarks.harness import read_jsonl as jsonl
from benchmarks.harness import run_logged as run
from benchmarks.harness import train_cli as train

ASSETS = h.REPO / "src" / "mlxlab" / "assets" / "lookup_codes"
TOOL = "mlxlab.objectives.rl.lookup_tools.lookup_code"
DESK = "mlxlab.objectives.rl.lookup_tools.QuestionLookup"
COMPACT = h.REPO / "tests" / "chat_templates" / "hermes_compact.jinja"


def tiny_base(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random Qwen2 (ChatML tokens, the compact Hermes tool template) at a trained model's
    initial scale (N(0, 0.02) matrices)."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.rmtree(folder, ignore_errors=True)
    h.tiny_hf_model().save_tiny_model(
        "qwen2", folder, seed=seed, chat="qwen2.5", max_position_embeddings=512,
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2)
    (folder / "chat_template.jinja").write_text(COMPACT.read_text())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # save_tiny_model's N(0, 0.2) is for logits that differ, not learning
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def schema() -> dict:
    from mlxlab.objectives.rl.tools import build_tools

    return build_tools([{"_target_": TOOL}])[0].schema


def hermes_chats(rows: list[dict]) -> list[tuple[list, list]]:
    """The tiny model's trajectories (the template's own tool turns): a call without arguments
    (QuestionLookup reads the question), the code back, the code as the reply."""
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "lookup_code", "arguments": {}}}]}
    return [(r["messages"], [*r["messages"], call,
                             {"role": "tool", "name": "lookup_code", "content": r["answer"]},
                             {"role": "assistant", "content": r["answer"]}]) for r in rows]


def tagged_chats(rows: list[dict]) -> list[tuple[list, list]]:
    """SmolLM2's trajectories in mlxlab's tagged format, built by the format GRPO renders with
    (the tools in the system message, the call between its tags, the answer as a user turn):
    the call names the question's name, the code comes back, the reply is the code."""
    from mlxlab.objectives.rl.lookup_tools import lookup_code
    from mlxlab.objectives.rl.tool_format import ToolFormat
    from mlxlab.objectives.rl.tools import ToolAnswer

    fmt, tool = ToolFormat("tagged"), schema()
    chats = []
    for r in rows:
        name = re.search(r"code of (\w+)\?", r["messages"][-1]["content"]).group(1)
        prompt, _ = fmt.prompt_messages(r["messages"], [tool])
        start, end = fmt.call_tags
        call = json.dumps({"name": "lookup_code", "arguments": {"name": name}})
        answer = fmt.answer_messages([ToolAnswer("lookup_code", lookup_code(name))])
        chats.append((prompt, [*prompt, {"role": "assistant", "content": f"{start}{call}{end}"},
                               *answer, {"role": "assistant", "content": r["answer"]}]))
    return chats


def grpo_args(model: Path, train_file: Path, val_file: Path, a, steps: int, tools: str,
              *extra: str) -> list[str]:
    """experiment=agent_tools on `model` at the benchmark's budget; tools: 'desk' (the tool,
    QuestionLookup), 'tool' (the tool alone) or 'none' (single-turn)."""
    arms = {"desk": (f"objective.tools=[{{_target_: {TOOL}}}]",
                     f"objective.environment={{_target_: {DESK}}}"),
            "tool": (f"objective.tools=[{{_target_: {TOOL}}}]",),
            "none": ("objective.tools=[]",)}
    return ["experiment=agent_tools", f"model.pretrained={model}",
            f"data.train_file={train_file}", f"data.val_file={val_file}", *arms[tools],
            f"trainer.batch_size={a.prompts}", f"objective.num_generations={a.generations}",
            f"objective.max_completion_length={a.max_length}", f"trainer.max_steps={steps}",
            f"objective.temperature={a.temperature}",
            f"trainer.eval_every_steps={max(steps, 1)}", f"objective.log_completions={10 ** 4}",
            "model.lora.rank=8", "callbacks.progress.enabled=false", *extra]


def sweep_id(out: str) -> str:
    """The sweep's parent run: a new sweep's, or one an earlier invocation finished."""
    return re.search(r"(?:MLflow sweep parent run|mlxlab: sweep) (\w+)", out).group(1)


def run_id(out: str) -> str:
    return h.line_value(out, "mlflow run:").split()[0]


def heldout_rewards(client, run: str) -> list[float]:
    """Each held-out prompt's exact_answer (1 right, 0 not) at the run's last evaluation (its
    grpo_samples), whatever other rewards (a format reward) were summed into its reward."""
    files = sorted(f.path for f in client.list_artifacts(run, "grpo_samples"))
    rows = jsonl(Path(client.download_artifacts(run, files[-1])))
    return [r["exact_answer"] for r in rows]


def rollout_speed(model_folder: Path, train_file: Path, tools: dict, a, rounds: int) -> dict:
    """Trajectories per second of one GRPO generation (prompts x generations), with the tools
    and without, alternating in this process; the load average before each."""
    import mlx.core as mx

    from mlxlab.data.batching import Batching
    from mlxlab.data.prompts import PromptRows
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
    from mlxlab.objectives.base import ObjectiveSetup
    from mlxlab.objectives.rl.grpo import GRPO
    from mlxlab.runtime.cluster import distributed

    data = PromptRows(str(train_file), val_file=str(train_file),
                      tokenizer={"path": str(model_folder / "tokenizer.json")})
    data.setup(None)
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(model_folder),
                         lora={"rank": 8, "targets": ["query", "value"]})
    batching = Batching(batch_size=a.prompts)
    sides = {}
    for side, extra in (("multi_turn", tools), ("single_turn", {})):
        grpo = GRPO([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"}],
                    num_generations=a.generations, max_completion_length=a.max_length,
                    temperature=1.0, **extra)
        grpo.setup(ObjectiveSetup(model=model, data=data, batching=batching,
                                  world=distributed.World()))
        next(iter(grpo.train_batches(data, batching, 0, model)))  # warm: compiles, caches
        sides[side] = grpo
    rows = {side: [] for side in sides}
    for r in range(rounds):
        for side, grpo in sides.items():
            before = h.load()
            started = time.perf_counter()
            next(iter(grpo.train_batches(data, batching, r + 1, model)))
            seconds = time.perf_counter() - started
            logs = grpo.logs()
            rows[side].append({"round": r, "seconds": seconds, "load_1min": before,
                               "rollouts_per_s": a.prompts * a.generations / seconds,
                               "reward": logs.get("reward"),
                               "turns": logs.get("turns/mean", 1.0),
                               "tokens_mean": logs.get("completions/mean_length")})
            print(f"speed {model_folder.name} round {r} {side}: "
                  f"{rows[side][-1]['rollouts_per_s']:.2f} rollouts/s ({seconds:.1f} s, "
                  f"load {before:.1f}, turns {rows[side][-1]['turns']:.2f})", flush=True)
    ratios = [m["rollouts_per_s"] / s["rollouts_per_s"]
              for m, s in zip(rows["multi_turn"], rows["single_turn"])]
    return {"rounds": rows, "median_rollouts_per_s": {
        side: statistics.median(x["rollouts_per_s"] for x in v) for side, v in rows.items()},
        "multi_over_single_per_round": ratios,
        "multi_over_single_median": statistics.median(ratios)}


def part_tiny(a, out: Path, env: dict, uri: str, times: dict) -> dict:
    """(a): one SFT checkpoint, then GRPO with the tool vs without over seeds."""
    tiny = h.tiny_hf_model()
    train_rows = jsonl(ASSETS / "train.jsonl")
    started = time.perf_counter()
    base = out / "tiny_sft"
    if not (a.reuse_sft and (base / "model.safetensors").is_file()):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same snapshots on any machine's core count: a warm start
        # near the copy's onset (170 steps: 0.67 of training prompts, 190: 1.0) is sensitive
        tiny_base(base, a.tiny_hidden, a.tiny_layers)
        sft_loss = tiny.teach_chats(base, hermes_chats(train_rows), [schema()],
                                    steps=a.tiny_sft_steps, batch_size=32, lr=a.tiny_sft_lr,
                                    snapshots=tuple(a.tiny_sft_snapshots))
        torch.set_num_threads(threads)
        times["tiny_sft"] = time.perf_counter() - started
    else:
        sft_loss = float("nan")  # taught by an earlier invocation (its log has the loss)
    print(f"tiny SFT: {a.tiny_sft_steps} steps, last loss {sft_loss:.4f}", flush=True)
    if a.tiny_start:  # a weaker warm start: the SFT's snapshot after that many steps
        base = out / f"tiny_sft_step{a.tiny_start}"
    heldout = ASSETS / "heldout.jsonl"
    # the SFT model alone: the run with the tool at learning rate 0, evaluated at its one step
    output, times["tiny_sft_eval"] = run(train(*grpo_args(
        base, ASSETS / "train.jsonl", heldout, a, 1, "desk", "seed=42", "task_name=agent_tiny_sft",
        "optimizer.learning_rate=0.0")), env, out / "tiny_sft_eval.log")
    lr = (f"optimizer.learning_rate={a.tiny_lr}",)
    sft_run = run_id(output)
    sweeps = {}
    for arm in ("desk", "none"):
        output, times[f"tiny_grpo_{arm}"] = run(train(
            "--multirun", *grpo_args(base, ASSETS / "train.jsonl", heldout, a, a.tiny_steps, arm,
                                     f"replicates={a.seeds}", "hydra/launcher=basic",
                                     f"task_name=agent_tiny_{arm}", *lr)),
            env, out / f"tiny_grpo_{arm}.log")
        sweeps[arm] = sweep_id(output)
    compare, times["tiny_compare"] = run(mlxlab(
        "runs", "compare", sweeps["desk"], sweeps["none"], "--uri", uri, "--metric",
        "val/reward", "--mode", "max", "--last", "--no-record", "--json"), env,
        out / "tiny_compare.log")
    from mlflow.tracking import MlflowClient

    from mlxlab.stats.paired import mcnemar_exact

    client = MlflowClient(uri)
    children = {arm: client.search_runs([client.get_run(s).info.experiment_id],
                                        f"tags.mlflow.parentRunId = '{s}'")
                for arm, s in sweeps.items()}
    per_seed = {arm: sorted((r.data.params.get("seed"), r.data.metrics.get("val/reward"))
                            for r in runs) for arm, runs in children.items()}
    # each seed's GRPO with the tool against its start, paired by held-out prompt
    start = [x == 1.0 for x in heldout_rewards(client, sft_run)]
    over_start = {}
    for r in children["desk"]:
        b, c, p = mcnemar_exact(start, [x == 1.0 for x in heldout_rewards(client, r.info.run_id)])
        over_start[r.data.params.get("seed")] = {"only_start_right": b, "only_after_right": c,
                                                 "mcnemar_exact_p": p}
    return {"sft_steps": a.tiny_sft_steps, "sft_last_loss": sft_loss, "sweeps": sweeps,
            "start": base.name,
            "heldout_accuracy_sft_alone": client.get_run(sft_run).data.metrics["val/reward"],
            "sft_run": sft_run,
            "heldout_accuracy_per_seed": per_seed, "with_tool_over_start": over_start,
            "compare": json.loads(compare[compare.index("{"):]) if "{" in compare else compare}


def part_real(a, out: Path, env: dict, uri: str, times: dict) -> dict:
    """(b): SmolLM2-135M-Instruct, SFT on the tagged call format, held-out accuracy before and
    after GRPO with the tool, paired by prompt."""
    tiny = h.tiny_hf_model()
    from mlflow.tracking import MlflowClient

    from mlxlab.stats.paired import mcnemar_exact

    train_rows = jsonl(ASSETS / "train.jsonl")
    started = time.perf_counter()
    base = out / "smollm2_sft"
    if not (a.reuse_sft and (base / "model.safetensors").is_file()):
        shutil.rmtree(base, ignore_errors=True)
        h.float_smollm2(base)
        sft_loss = tiny.teach_chats(base, tagged_chats(train_rows[: a.real_sft_rows]), None,
                                    steps=a.real_sft_steps, batch_size=a.real_sft_batch,
                                    lr=a.real_sft_lr, snapshots=tuple(a.real_sft_snapshots))
        times["real_sft"] = time.perf_counter() - started
    else:
        sft_loss = float("nan")  # taught by an earlier invocation (its log has the loss)
    print(f"SmolLM2 SFT: {a.real_sft_steps} steps, last loss {sft_loss:.4f}", flush=True)
    if a.real_start:  # GRPO from the SFT's snapshot after that many steps
        base = out / f"smollm2_sft_step{a.real_start}"
    rewards = ("objective.rewards=[{_target_: mlxlab.objectives.rl.rewards.exact_answer},"
               "{_target_: mlxlab.objectives.rl.rewards.tool_call_parsed, weight: "
               f"{a.format_reward}}}]",) if a.format_reward else ()
    heldout = h.write_jsonl(out / "real_heldout.jsonl", jsonl(ASSETS / "heldout.jsonl")[: a.real_heldout])
    runs = {}
    for name, steps, extra in (("before", 1, ("optimizer.learning_rate=0.0",)),
                               ("after", a.real_steps, (f"optimizer.learning_rate={a.real_lr}",))):
        output, times[f"real_{name}"] = run(train(*grpo_args(
            base, ASSETS / "train.jsonl", heldout, a, steps, "tool", "seed=42",
            f"task_name=agent_real_{name}", *rewards, *extra)), env, out / f"real_{name}.log")
        runs[name] = run_id(output)
    client = MlflowClient(uri)
    before, after = (heldout_rewards(client, runs[k]) for k in ("before", "after"))
    b, c, p = mcnemar_exact([x == 1.0 for x in before], [x == 1.0 for x in after])
    compare, times["real_compare"] = run(mlxlab(
        "runs", "compare", runs["before"], runs["after"], "--uri", uri, "--json"), env,
        out / "real_compare.log")
    return {"sft_steps": a.real_sft_steps, "sft_rows": a.real_sft_rows,
            "sft_last_loss": sft_loss,
            "start": base.name, "heldout_prompts": len(before), "runs": runs,
            "train_reward_per_step": h.metric_history(client, runs["after"], "train/reward"),
            "train_exact_answer_per_step": h.metric_history(
                client, runs["after"], "train/rewards/exact_answer/mean"),
            "heldout_accuracy_before": sum(before) / len(before),
            "heldout_accuracy_after": sum(after) / len(after),
            "only_before_right": b, "only_after_right": c, "mcnemar_exact_p": p,
            **{f"tool_calls_{k}": client.get_run(runs[k]).data.metrics["val/tools/call_frequency"]
               for k in ("after", "before")},
            "compare": json.loads(compare[compare.index("{"):]) if "{" in compare else compare}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# --name, type, default, help; --tiny-* and --real-* belong to those parts, the rest to all
OPTIONS = [
    ("out", str, "/tmp/bench_agent", "--smoke: a fresh folder"), ("parts", str, "tiny,real,speed", None),
    ("seeds", int, 3, None), ("prompts", int, 4, "prompts per GRPO step"),
    ("generations", int, 4, "trajectories per prompt"),
    ("max-length", int, 128, "objective.max_completion_length: every turn's tokens"),
    ("temperature", float, 1.0, "objective.temperature: GRPO's sampling (evaluations are greedy)"),
    ("tiny-hidden", int, 128, None), ("tiny-layers", int, 2, None),
    ("tiny-sft-steps", int, 1200, None), ("tiny-sft-lr", float, 3e-3, None),
    ("tiny-steps", int, 30, None), ("tiny-lr", float, 1e-4, "GRPO's learning rate"),
    ("tiny-sft-snapshots", ints, [], "SFT steps after which the model is also kept (e.g. 100,200)"),
    ("tiny-start", int, 0, "GRPO from the SFT snapshot after this many steps (0: the last)"),
    ("real-sft-rows", int, 64, None), ("real-sft-steps", int, 16, None),
    ("real-sft-batch", int, 4, None), ("real-sft-lr", float, 3e-5, None),
    ("real-steps", int, 10, None), ("real-lr", float, 1e-4, "GRPO's learning rate"),
    ("real-sft-snapshots", ints, [], "SFT steps after which the model is also kept (e.g. 8,16,24)"),
    ("real-start", int, 0, "GRPO from the SFT snapshot after this many steps (0: the last)"),
    ("format-reward", float, 0.0, "weight of tool_call_parsed beside exact_answer (0: none)"),
    ("real-heldout", int, 40, None), ("speed-rounds", int, 3, None),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    h.add_options(parser, **{name.replace("-", "_"): (default, text, kind)
                             for name, kind, default, text in OPTIONS},
                  reuse_sft=(False, "keep an SFT model an earlier invocation left in --out"))
    a = parser.parse_args()
    if a.smoke:  # every stage of the tiny part and its speed, a few steps each; figures mean nothing
        a.out, a.parts, a.seeds = str(h.smoke_dir("agent_tools")), "tiny,speed", 2
        a.tiny_hidden, a.tiny_sft_steps, a.tiny_steps, a.speed_rounds = 64, 4, 2, 1
        a.prompts, a.generations = 2, 2
    out = Path(a.out)
    env, uri = h.cli_root(out)
    parts = a.parts.split(",")
    results: dict = {"settings": vars(a)}
    times: dict[str, float] = {}

    def save() -> None:
        (out / "results.json").write_text(json.dumps({**results, "wall_s": times}, indent=2))

    if "tiny" in parts:
        results["tiny"] = part_tiny(a, out, env, uri, times)
        save()
    if "real" in parts:
        results["real"] = part_real(a, out, env, uri, times)
        save()
    if "speed" in parts:
        tool = [{"_target_": TOOL}]
        desk = {"tools": tool, "environment": {"_target_": DESK}}  # the tiny model's tool turns
        for name, folder, tools in (("tiny", "tiny_sft", desk), ("real", "smollm2_sft", {"tools": tool})):
            if (out / folder).is_dir():
                started = time.perf_counter()
                results[f"speed_{name}"] = rollout_speed(out / folder, ASSETS / "train.jsonl",
                                                         tools, a, a.speed_rounds)
                times[f"speed_{name}"] = time.perf_counter() - started
        save()
    h.write_record("agent-tools", results, question="quality", smoke=a.smoke,
                   raw=str(out / "results.json"))
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=2,
                     default=str)[-6000:])
    print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
