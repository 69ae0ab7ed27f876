"""DPO speed and memory beside mlx-lm-lora's: the same model, pairs, batch, LoRA, sequence
length, steps and beta, each tool run as its CLI in its own process, variants interleaved round
by round: `mlxlab` (experiment=dpo_chat, reference = the adapters off), `cached`
(objective.reference=cached), `lora_openblas` (mlx-lm-lora given mlxlab's OpenBLAS),
`lora_stock` (mlx-lm-lora as installed; ~10x slower, fewer steps). A random 17.1 M Llama with a
ChatML template; every side of every pair renders to the same length (checked in both tools'
renderings), so every batch costs the same. Pairs/s over each tool's steady log windows, max RSS
and CPU (/usr/bin/time -v), MLX's peak memory.

    python benchmarks/speed/bench_preference.py [--rounds 2] [--steps 16] [--work /tmp/bench_preference]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import (  # noqa: E402
    add_options,
    metric_history,
    print_table,
    run_with_peak_rss,
    smoke_dir,
    tiny_hf_model,
    write_record,
)

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
VARIANTS = ("mlxlab", "cached", "lora_openblas", "lora_stock")


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
    done, rss = run_with_peak_rss(cmd, what=" ".join(cmd[:3]), log=log, env=env, cwd=REPO)
    return {"rss_mb": rss, "cpu_s": done.cpu_s, "wall_s": done.wall_s, "log": done.stdout + done.stderr}


def run_mlx_lm_lora(work: Path, folder: Path, data: Path, steps: int, every: int, openblas: bool,
                    tag: str) -> dict:
    config = work / "mlx_lm_lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
                                  "fuse": False}))
    args = ["--model", str(folder), "--train", "--train-mode", "dpo", "--data", str(data),
            "--batch-size", str(BATCH), "--iters", str(steps), "--steps-per-report", str(every),
            "--save-every", "1000000", "--max-seq-length", str(MAX_LENGTH), "--beta", str(BETA),
            "--learning-rate", str(LR), "--num-layers", "-1", "--seed", "0", "--optimizer", "adam",
            "--adapter-path", str(work / f"adapters-{tag}"), "-c", str(config)]
    env, setup = dict(os.environ), ""
    if openblas:
        # mlxlab's own binding (runtime/compute/blas.py) of the OpenBLAS it ships, then mlx-lm-lora
        from mlxlab.runtime.compute.blas import _bundled_openblas

        env |= {"MLXLAB_BLAS": str(_bundled_openblas()), "PYTHONPATH": str(REPO / "src")}
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
    env = dict(os.environ, MLXLAB_ROOT=str(root), PYTHONPATH=str(REPO / "src"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = timed_run([sys.executable, "-m", "mlxlab.train", "experiment=dpo_chat", *args], env,
                    work / f"{tag}.log")
    out.pop("log")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    run_id = next(r for e in client.search_experiments()
                  for r in client.search_runs([e.experiment_id])).info.run_id
    return {**out, "pairs_per_s": metric_history(client, run_id, "train/samples_per_sec")[1:],
            "mlx_peak_mb": max(metric_history(client, run_id, "memory/peak_mb"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, work=Path("/tmp/bench_preference"), rounds=2, steps=16, every=4,
                stock_steps=4, stock_every=2, variants=",".join(VARIANTS))
    args = parser.parse_args()
    if args.smoke:  # every variant, one round of 4 steps logged every 2 (the first line is left
        # out of the speed), its own model and pairs; mlx-lm-lora's two where its venv is there
        args.work, args.rounds, args.steps, args.every = smoke_dir("preference"), 1, 4, 2
        args.stock_steps, args.stock_every = 4, 2
        if not (LORA_VENV / "bin" / "python").exists():
            print(f"{LORA_VENV}: no mlx-lm-lora venv, its variants skipped", flush=True)
            args.variants = "mlxlab,cached"
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    work = args.work
    folder = work / "model"
    if not (folder / "config.json").is_file():
        tiny_hf_model().save_tiny_model("llama", folder, chat="chatml", **MODEL)
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
                stock = v == "lora_stock"
                res = run_mlx_lm_lora(work, folder, data, args.stock_steps if stock else args.steps,
                                      args.stock_every if stock else args.every, not stock, tag)
            results[v].append(res | {"load_before": load})
            print(f"{tag}: pairs/s {[round(x, 2) for x in res['pairs_per_s']]}, "
                  f"RSS {res['rss_mb']:.0f} MiB, MLX peak {res['mlx_peak_mb']:.0f} MiB, "
                  f"CPU {res['cpu_s']:.1f} s, load {load:.1f}", flush=True)
    (work / "results.json").write_text(json.dumps(
        {"params": params, "side_tokens": length, "results": results}, indent=1))

    rates = {v: [statistics.median(x["pairs_per_s"]) for x in runs] for v, runs in results.items()}
    ref = next((v for v in ("lora_openblas", "lora_stock") if v in rates), None)
    ratio = (statistics.median(a / b for a, b in zip(rates["mlxlab"], rates[ref]))
             if ref and "mlxlab" in rates else None)
    write_record("dpo-vs-mlx-lm-lora", {"params": params, "side_tokens": length, "results": results},
                 question="speed-mlx", reference=ratio and f"mlx-lm-lora's DPO ({ref})",
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
    print_table({"head": ["variant", "pairs/s (median, per round)", "tokens/s", "max RSS MiB",
                          "MLX peak MiB"], "rows": rows})

if __name__ == "__main__":
    main()
