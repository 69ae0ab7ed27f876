"""DPO speed and memory beside mlx-lm-lora's: the same model, pairs, batch, LoRA, sequence
length, steps and beta, each tool run as its CLI in its own process, variants interleaved round
by round: `mlxlab` (experiment=dpo_chat, reference = the adapters off), `cached`
(objective.reference=cached), `lora_openblas` (mlx-lm-lora given mlxlab's OpenBLAS; as
installed, on MLX's bundled BLAS, mlxlab did 5.9x its pairs/s: the record of 2026-11-25). A
random 17.1 M Llama with a ChatML template; every side of every pair renders to the same length
(checked in both tools' renderings), so every batch costs the same. Pairs/s over each tool's
steady log windows, max RSS and CPU (/usr/bin/time -v), MLX's peak memory.

    python benchmarks/speed/bench_preference.py [--rounds 2] [--steps 16] [--work /tmp/bench_preference]

--grpo: mlxlab's objective=grpo against mlx-lm-lora 5.10's train_grpo on the same model, prompts,
group, lengths, LoRA (rank 8 on q/k/v/o) and steps, each side in its own process on the same MLX
and OpenBLAS, alternating --rounds times: completions/s, completion tokens/s (counted by the
shared reward function) and MLX's peak; timed: the training call alone.

    python benchmarks/speed/bench_preference.py --grpo --model <folder> --prompts <prompts.jsonl>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
import benchmarks.harness as h  # noqa: E402

LORA_VENV = Path(os.environ.get("MLXLORA_VENV", "/work/venvs/mlxlora"))
MODEL = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}
BATCH, RANK, SCALE, BETA, LR, MAX_LENGTH = 4, 8, 10.0, 0.1, 5e-5, 128
PROMPT_WORDS, REPLY_WORDS = 24, 12
# mlx-lm-lora 5.10.2's train_dpo starts with mx.set_wired_limit(mx.device_info()[
# "max_recommended_working_set_size"]), a key only Metal's device_info has: on a Linux CPU its DPO
# stops there with a KeyError. The shim gives device_info that key (0: set_wired_limit(0) is a
# no-op on the CPU) and runs its CLI unchanged.
SHIM = (
    "import sys, mlx.core as mx; info = mx.device_info; mx.device_info = lambda *a, **k: "
    "{'max_recommended_working_set_size': 0, **info(*a, **k)}; "
    "sys.argv[0] = 'mlx_lm_lora.train'; from mlx_lm_lora.train import main; main()"
)
VARIANTS = ("mlxlab", "cached", "lora_openblas")
COUNT = {"completions": 0, "tokens": 0}
TOKENIZER = None


def counted_exact(prompts, completions, answer, **_):
    """The exact answer, counting what it scores (both sides' rewards are this function)."""
    COUNT["completions"] += len(completions)
    COUNT["tokens"] += sum(len(TOKENIZER(c)) + 1 for c in completions)  # + the stop
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def grpo_mlxlab(a) -> float:
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
        "objective.rewards=[{_target_: benchmarks.speed.bench_preference.counted_exact}]",
        f"optimizer.learning_rate={a.lr}", "model.lora.rank=8", "model.lora.alpha=16",
        "model.lora.targets=[query,key,value,out]"])
    started = time.perf_counter()
    train(cfg)
    return time.perf_counter() - started


def grpo_lora(a) -> float:
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

    sys.path.insert(0, str(h.REPO))
    from benchmarks.speed import bench_preference as me  # the rewards' _target_, not __main__

    seconds = (me.grpo_mlxlab if a.side == "mlxlab" else me.grpo_lora)(a)
    COUNT = me.COUNT
    print("RESULT " + json.dumps({
        "side": a.side, "seconds": seconds, "completions": COUNT["completions"],
        "tokens": COUNT["tokens"], "completions_per_s": COUNT["completions"] / seconds,
        "tokens_per_s": COUNT["tokens"] / seconds, "peak_mb": mx.get_peak_memory() / 2**20}))


def smoke_inputs(folder: Path) -> tuple[str, str]:
    """A tiny random Llama (scripts/tiny_hf_model.py, no torch) and 8 of the copy task's prompts."""
    model = h.tiny_llama(folder / "model")
    rows = (h.REPO / "src/mlxlab/assets/copy_format/train.jsonl").read_text().splitlines()[:8]
    (folder / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    return str(model), str(folder / "prompts.jsonl")


def one_token_words(tokenizer) -> list[str]:
    """Words that are one token both at the start of a turn and after a space."""
    words = []
    for token in tokenizer.get_vocab():
        word = token.lstrip("Ġ")
        if (word.isalpha() and word.islower() and len(word) > 2
                and len(tokenizer.encode(word, add_special_tokens=False)) == 1
                and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1):
            words.append(word)
    return sorted(set(words))


def write_pairs(folder: Path, out: Path, n_train: int = 256, n_val: int = 8) -> int:
    """train.jsonl / held_out.jsonl of same-length pairs; returns L, the tokens of every side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    words = one_token_words(tok)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    lengths = set()
    for name, n in (("train", n_train), ("held_out", n_val)):
        rows = []
        for _ in range(n):
            prompt, chosen, rejected = (" ".join(rng.choice(words, k))
                                        for k in (PROMPT_WORDS, REPLY_WORDS, REPLY_WORDS))
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            for reply in (chosen, rejected):
                chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
                lengths.add(len(tok.apply_chat_template(chat, tokenize=True, return_dict=False)))
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if len(lengths) != 1:
        raise SystemExit(f"pairs render to different lengths {sorted(lengths)}")
    return lengths.pop()


def check_mlxlab_lengths(folder: Path, data: Path, length: int) -> None:
    """mlxlab's data=preference renders every side to the same `length` tokens."""
    from mlxlab.data.preference import PreferencePairs

    pairs = PreferencePairs(str(data / "train.jsonl"), val_file=str(data / "held_out.jsonl"),
                            tokenizer={"path": str(folder / "tokenizer.json")})
    pairs.setup(None)
    seen = {len(ids) for side in pairs.train.ids.values() for ids in side}
    if seen != {length}:
        raise SystemExit(f"mlxlab renders sides of {sorted(seen)} tokens, transformers {length}")


def timed_run(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd`, its output in `log`: its peak RSS (MiB), CPU and wall seconds, output."""
    done, rss = h.run_with_peak_rss(cmd, what=" ".join(cmd[:3]), log=log, env=env, cwd=h.REPO)
    return {"rss_mb": rss, "cpu_s": done.cpu_s, "wall_s": done.wall_s, "log": done.stdout + done.stderr}


def run_mlx_lm_lora(work: Path, folder: Path, data: Path, steps: int, every: int, tag: str) -> dict:
    config = work / "mlx_lm_lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
                                  "fuse": False}))
    args = ["--model", str(folder), "--train", "--train-mode", "dpo", "--data", str(data),
            "--batch-size", str(BATCH), "--iters", str(steps), "--steps-per-report", str(every),
            "--save-every", "1000000", "--max-seq-length", str(MAX_LENGTH), "--beta", str(BETA),
            "--learning-rate", str(LR), "--num-layers", "-1", "--seed", "0", "--optimizer", "adam",
            "--adapter-path", str(work / f"adapters-{tag}"), "-c", str(config)]
    # mlxlab's own binding (runtime/compute/blas.py) of the OpenBLAS it ships, then mlx-lm-lora
    from mlxlab.runtime.compute.blas import _bundled_openblas

    env = {**os.environ, "MLXLAB_BLAS": str(_bundled_openblas()), "PYTHONPATH": str(h.REPO / "src")}
    setup = "import mlxlab; assert mlxlab.blas.fast, mlxlab.blas; "
    cmd = [str(LORA_VENV / "bin" / "python"), "-c", setup + SHIM, *args]
    out = timed_run(cmd, env, work / f"{tag}.log")
    reports = re.findall(r"Iter (\d+): loss [^\n]*?it/s ([\d.]+), tok/s ([\d.]+), "
                         r"peak_mem ([\d.]+)GB", out.pop("log"))
    if len(reports) < 2:
        raise SystemExit(f"{tag}: fewer than 2 report lines in {work / f'{tag}.log'}")
    return {**out, "pairs_per_s": [float(r[1]) * BATCH for r in reports[1:]],
            "mlx_peak_mb": float(reports[-1][3]) * 1e9 / 2**20}


def run_mlxlab(work: Path, folder: Path, data: Path, steps: int, every: int, cached: bool,
               tag: str) -> dict:
    root = work / f"mlxlab-{tag}"
    args = [f"model.pretrained={folder}", f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'held_out.jsonl'}", f"trainer.batch_size={BATCH}",
            f"trainer.max_steps={steps}", f"trainer.log_every_steps={every}",
            "trainer.eval_every_steps=1000000", f"model.lora.rank={RANK}",
            f"model.lora.alpha={SCALE * RANK:g}", "model.lora.targets=[query,key,value,out,gate,up,down]",
            f"data.max_length={MAX_LENGTH}", f"objective.beta={BETA}", f"optimizer.learning_rate={LR}",
            "trainer.schedule.warmup_steps=0", "callbacks.progress.enabled=false",
            f"callbacks.memory.every={every}", "checkpoint.save_every_minutes=null",
            f"hydra.run.dir={root}/run"]
    if cached:
        args += ["objective.reference=cached", f"data.cache_dir={work / 'cache'}"]
    env = dict(os.environ, MLXLAB_ROOT=str(root), PYTHONPATH=str(h.REPO / "src"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = timed_run([sys.executable, "-m", "mlxlab.train", "experiment=dpo_chat", *args], env,
                    work / f"{tag}.log")
    out.pop("log")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    run_id = next(r for e in client.search_experiments()
                  for r in client.search_runs([e.experiment_id])).info.run_id
    return {**out, "pairs_per_s": h.metric_history(client, run_id, "train/samples_per_sec")[1:],
            "mlx_peak_mb": max(h.metric_history(client, run_id, "memory/peak_mb"))}


def grpo_main(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--grpo: both sides alternating --rounds times, each in its own process."""
    passed = [x for x in sys.argv[1:] if x != "--grpo"]
    if a.smoke:  # a tiny random Llama, 8 copy prompts, one step of 2 prompts x G 2, one round
        a.model, a.prompts = smoke_inputs(h.smoke_dir("grpo_speed"))
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
            argv = [sys.executable, __file__, "--grpo", "--side", side, *passed]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=h.REPO,
                                  env={**os.environ, "PYTHONPATH": f"{h.REPO / 'src'}:{h.REPO}"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{side} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            results.append(json.loads(line[0][7:]))
            print(results[-1], flush=True)
    per_round = [ours["completions_per_s"] / theirs["completions_per_s"]
                 for ours, theirs in zip(results[::2], results[1::2])]
    ratio = statistics.median(per_round)
    h.write_record("grpo-vs-mlx-lm-lora", {"runs": results, "ratio_per_round": per_round},
                   question="speed-mlx", reference="mlx-lm-lora's train_grpo, same model and settings",
                   ratio=round(ratio, 2), summary="GRPO completions/s, median round (higher is better)",
                   smoke=a.smoke)
    h.print_table({"head": ["side", "completions/s", "completion tokens/s", "peak MB", "seconds"],
                   "rows": [[r["side"], f"{r['completions_per_s']:.1f}", f"{r['tokens_per_s']:.1f}",
                             f"{r['peak_mb']:.0f}", f"{r['seconds']:.1f}"] for r in results]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    h.add_options(parser, work=Path("/tmp/bench_preference"), rounds=2,
                  steps=(None, "default 16 (--grpo: 20)", int), every=4, variants=",".join(VARIANTS),
                  grpo=(False, "GRPO instead: objective=grpo beside mlx-lm-lora's train_grpo "
                        "(--model, --prompts required)"),
                  model=None, prompts=None, batch=8, group=8, max_tokens=8, lr=2e-3)
    parser.add_argument("--side", choices=["mlxlab", "mlx-lm-lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grpo:
        args.steps = args.steps or 20
        return grpo_main(parser, args)
    args.steps = args.steps or 16
    if args.smoke:  # every variant, one round of 4 steps logged every 2 (the first line is left
        # out of the speed), its own model and pairs; mlx-lm-lora's where its venv is there
        args.work, args.rounds, args.steps, args.every = h.smoke_dir("preference"), 1, 4, 2
        if not (LORA_VENV / "bin" / "python").exists():
            print(f"{LORA_VENV}: no mlx-lm-lora venv, its variant skipped", flush=True)
            args.variants = "mlxlab,cached"
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    work = args.work
    folder = work / "model"
    if not (folder / "config.json").is_file():
        h.tiny_hf_model().save_tiny_model("llama", folder, chat="chatml", **MODEL)
    data = work / "data"
    length = write_pairs(folder, data)
    check_mlxlab_lengths(folder, data, length)
    import mlx.core as mx

    params = sum(v.size for v in mx.load(str(folder / "model.safetensors")).values())
    print(f"model {params / 1e6:.1f} M parameters; every side {length} tokens", flush=True)

    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            tag, load = f"{v}-r{r}", os.getloadavg()[0]
            if v in ("mlxlab", "cached"):
                res = run_mlxlab(work, folder, data, args.steps, args.every, v == "cached", tag)
            else:
                res = run_mlx_lm_lora(work, folder, data, args.steps, args.every, tag)
            results[v].append(res | {"load_before": load})
            print(f"{tag}: pairs/s {[round(x, 2) for x in res['pairs_per_s']]}, "
                  f"RSS {res['rss_mb']:.0f} MiB, MLX peak {res['mlx_peak_mb']:.0f} MiB, "
                  f"CPU {res['cpu_s']:.1f} s, load {load:.1f}", flush=True)
    (work / "results.json").write_text(json.dumps(
        {"params": params, "side_tokens": length, "results": results}, indent=1))

    rates = {v: [statistics.median(x["pairs_per_s"]) for x in runs] for v, runs in results.items()}
    ratio = (statistics.median(a / b for a, b in zip(rates["mlxlab"], rates["lora_openblas"]))
             if {"mlxlab", "lora_openblas"} <= set(rates) else None)
    h.write_record("dpo-vs-mlx-lm-lora", {"params": params, "side_tokens": length, "results": results},
                   question="speed-mlx", reference=ratio and "mlx-lm-lora's DPO (lora_openblas)",
                   ratio=ratio and round(ratio, 2), summary=ratio and "DPO pairs/s (higher is better)",
                   smoke=args.smoke,
                   raw=str(work / "results.json"))
    rows = []
    for v, runs in results.items():
        per_round = [statistics.median(x["pairs_per_s"]) for x in runs]
        med = statistics.median(per_round)
        rows.append([v, f"{med:.2f} ({', '.join(f'{x:.2f}' for x in per_round)})",
                     f"{med * 2 * length:.0f}", f"{statistics.median(x['rss_mb'] for x in runs):.0f}",
                     f"{statistics.median(x['mlx_peak_mb'] for x in runs):.0f}"])
    h.print_table({"head": ["variant", "pairs/s (median, per round)", "tokens/s", "max RSS MiB",
                            "MLX peak MiB"], "rows": rows})

if __name__ == "__main__":
    main()
