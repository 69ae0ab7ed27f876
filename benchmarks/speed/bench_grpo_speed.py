"""GRPO speed: mlxlab's objective=grpo against mlx-lm-lora 5.10's train_grpo on the same model,
prompts, group, lengths, LoRA (rank 8 on q/k/v/o) and steps, each side in its own process on the
same MLX and OpenBLAS, alternating --rounds times: completions/s, completion tokens/s (counted by
the shared reward function) and MLX's peak; timed: the training call alone.

    python benchmarks/speed/bench_grpo_speed.py --model <folder> --prompts <prompts.jsonl>
        [--steps 20] [--batch 8] [--group 8] [--max-tokens 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import REPO, add_options, print_table, smoke_dir, tiny_llama, write_record  # noqa: E402

COUNT = {"completions": 0, "tokens": 0}
TOKENIZER = None


def counted_exact(prompts, completions, answer, **_):
    """The exact answer, counting what it scores (both sides' rewards are this function)."""
    COUNT["completions"] += len(completions)
    COUNT["tokens"] += sum(len(TOKENIZER(c)) + 1 for c in completions)  # + the stop
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def run_mlxlab(a) -> float:
    global TOKENIZER
    from tokenizers import Tokenizer

    from benchmarks.speed.bench import compose
    from mlxlab.train import train

    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    TOKENIZER = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="bench_grpo_mlxlab_"))
    val = root / "val.jsonl"
    val.write_text(Path(a.prompts).read_text().splitlines()[0] + "\n")
    cfg = compose(root, [
        "experiment=grpo_copy", f"model.pretrained={a.model}", f"data.train_file={a.prompts}",
        f"data.val_file={val}", "tracking=none", "callbacks.progress.enabled=false",
        f"trainer.batch_size={a.batch}", f"trainer.max_steps={a.steps}",
        "trainer.eval_every_steps=null", f"objective.num_generations={a.group}",
        f"objective.max_completion_length={a.max_tokens}", "objective.log_completions=0",
        "objective.rewards=[{_target_: benchmarks.speed.bench_grpo_speed.counted_exact}]",
        f"optimizer.learning_rate={a.lr}", "model.lora.rank=8", "model.lora.alpha=16",
        "model.lora.targets=[query,key,value,out]"])
    started = time.perf_counter()
    train(cfg)
    return time.perf_counter() - started


def run_lora(a) -> float:
    global TOKENIZER
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.datasets import GRPODataset
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    model, tok = load(a.model)
    fast = tok._tokenizer._tokenizer if hasattr(tok, "_tokenizer") else tok
    TOKENIZER = lambda text: fast.encode(text, add_special_tokens=False).ids  # noqa: E731
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {
        "rank": 8, "scale": 2.0, "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]})
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines()]
    data = GRPODataset(rows, tok, text_completion_key="prompt")
    args = GRPOTrainingArgs(
        batch_size=a.batch, iters=a.steps, group_size=a.group, beta=0.0,
        max_completion_length=a.max_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
        steps_per_report=a.steps, steps_per_eval=10**9, steps_per_save=10**9,
        adapter_file=str(Path(tempfile.mkdtemp()) / "adapters.safetensors"), max_seq_length=64)
    started = time.perf_counter()
    train_grpo(model, None, tok, optim.AdamW(a.lr, weight_decay=0.0), data, None,
               reward_funcs=[counted_exact], args=args, end_answer_token="")
    return time.perf_counter() - started


def one(a) -> None:
    import mlx.core as mx

    sys.path.insert(0, str(REPO))
    from benchmarks.speed import bench_grpo_speed as me  # the rewards' _target_, not __main__

    seconds = (me.run_mlxlab if a.side == "mlxlab" else me.run_lora)(a)
    COUNT = me.COUNT
    print("RESULT " + json.dumps({
        "side": a.side, "seconds": seconds, "completions": COUNT["completions"],
        "tokens": COUNT["tokens"], "completions_per_s": COUNT["completions"] / seconds,
        "tokens_per_s": COUNT["tokens"] / seconds, "peak_mb": mx.get_peak_memory() / 2**20}))


def smoke_inputs(folder: Path) -> tuple[str, str]:
    """A tiny random Llama (scripts/tiny_hf_model.py, no torch) and 8 of the copy task's prompts."""
    model = tiny_llama(folder / "model")
    rows = (REPO / "src/mlxlab/assets/copy_format/train.jsonl").read_text().splitlines()[:8]
    (folder / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    return str(model), str(folder / "prompts.jsonl")


def main() -> None:
    p = argparse.ArgumentParser()
    add_options(p, model=None, prompts=None, steps=20, batch=8, group=8, max_tokens=8, lr=2e-3,
                rounds=2)
    p.add_argument("--side", choices=["mlxlab", "mlx-lm-lora"])
    a = p.parse_args()
    passed = sys.argv[1:]
    if a.smoke:  # a tiny random Llama, 8 copy prompts, one step of 2 prompts x G 2, one round
        a.model, a.prompts = smoke_inputs(smoke_dir("grpo_speed"))
        a.steps, a.batch, a.group, a.max_tokens, a.rounds = 1, 2, 2, 4, 1
        passed = [f"--{k.replace('_', '-')}={vars(a)[k]}"
                  for k in ("model", "prompts", "steps", "batch", "group", "max_tokens")]
    if not (a.model and a.prompts):
        p.error("--model and --prompts are required")
    if a.side:
        one(a)
        return
    results = []
    for _ in range(a.rounds):
        for side in ("mlxlab", "mlx-lm-lora"):
            argv = [sys.executable, __file__, "--side", side, *passed]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{side} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            results.append(json.loads(line[0][7:]))
            print(results[-1], flush=True)
    per_round = [ours["completions_per_s"] / theirs["completions_per_s"]
                 for ours, theirs in zip(results[::2], results[1::2])]
    ratio = statistics.median(per_round)
    write_record("grpo-vs-mlx-lm-lora", {"runs": results, "ratio_per_round": per_round},
                 question="speed-mlx", reference="mlx-lm-lora's train_grpo, same model and settings",
                 ratio=round(ratio, 2), summary="GRPO completions/s, median round (higher is better)",
                 smoke=a.smoke)
    print_table({"head": ["side", "completions/s", "completion tokens/s", "peak MB", "seconds"],
                 "rows": [[r["side"], f"{r['completions_per_s']:.1f}", f"{r['tokens_per_s']:.1f}",
                           f"{r['peak_mb']:.0f}", f"{r['seconds']:.1f}"] for r in results]})


if __name__ == "__main__":
    main()
