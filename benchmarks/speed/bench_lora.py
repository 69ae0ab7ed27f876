"""LoRA fine-tuning speed and memory, mlxlab beside mlx_lm.lora, on long rows and on chats; also
the runners of both tools that bench_sizes.py and real_model_finetune.py use.

    python benchmarks/speed/bench_lora.py --rows chat --tools mlxlab,mlx-lm-openblas  (--help)

A random Llama (hidden 512, 8 layers, 4 / 2 heads, ChatML; weights N(0, --init-std)), LoRA rank
8 (alpha 16) on q/k/v/o, batch 4, Adam at 2e-4, 512 positions a row. `long`: rows of >= 600
tokens, every position trained; `chat`: system, user, assistant, the loss on the reply (mlxlab's
mask and mlx-lm's --mask-prompt train the same tokens). Each tool in its own process through its
own training code (`mlx-lm-openblas`: MLX pointed at mlxlab's OpenBLAS, nothing else of mlxlab);
tokens/s: each tool's own count over the steps after --skip; peak: MLX's peak memory. Rounds
alternate the tools' order; the table gives medians.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import benchmarks.harness as h  # noqa: E402

SEQ, BATCH, RANK, ALPHA, LR = 512, 4, 8, 16.0, 2e-4
MODEL = dict(hidden=512, layers=8, heads=4, kv_heads=2, chat="chatml")
TOOLS = ("mlxlab", "mlx-lm", "mlx-lm-openblas")
MLX_LM_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]

# Runs mlx-lm's own training (mlx_lm.lora.run, what its CLI calls: LoRA, or full fine-tuning
# under mlx.launch for bench_sizes.py --sharded) and writes each per-step report as a json line
# (`{rank}` in its path: the rank's own file). argv: args.json report.jsonl
# openblas(0|1) [fast_quantized(0|1): mlxlab's CPU quantized product on the loaded model]
MLX_LM_WORKER = """
import json, os, sys, types
if sys.argv[3] == "1":
    from mlxlab.runtime.compute.blas import setup_blas  # MLX's BLAS calls only; nothing else of mlxlab
    print("blas:", setup_blas(), flush=True)
import mlx.core as mx
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        with open(sys.argv[2].replace("{rank}", os.environ.get("MLX_RANK", "0")), "a") as f:
            f.write(json.dumps(info) + "\\n")

args = dict(lora.CONFIG_DEFAULTS)
args.update(json.load(open(sys.argv[1])))
args = types.SimpleNamespace(**args)
# lora.run's body, with our callback (run builds its own from --report-to)
lora.np.random.seed(args.seed)
model, tokenizer = lora.load(args.model)
if sys.argv[4:] == ["1"]:
    from mlxlab.models.quantized.quantized_cpu import use_fast_cpu_quantized
    print("switched:", use_fast_cpu_quantized(model), flush=True)
train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
lora.train_model(args, model, train_set, valid_set, Record())
"""


def sentences() -> list[str]:
    from mlxlab.config import asset_path

    text = Path(asset_path("tinystories/sample.txt")).read_text()
    return [s.strip() + "." for s in text.replace("\n", " ").split(".") if len(s.split()) > 3]


def write_data(root: Path, n_train: int = 160, n_val: int = 8, seq: int = SEQ) -> dict[str, Path]:
    """long/ and chat/ folders of train.jsonl + valid.jsonl (mlx-lm's names, read by both); long
    rows of more than `seq` tokens."""
    sents, out = sentences(), {}
    cursor = 0

    def take(words: int) -> str:  # the next sentences, at least `words` words
        nonlocal cursor
        picked = []
        while sum(len(s.split()) for s in picked) < words:
            picked.append(sents[cursor % len(sents)])
            cursor += 1
        return " ".join(picked)

    for kind in ("long", "chat"):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("valid", n_val)):
            with open(folder / f"{name}.jsonl", "w") as f:
                for _ in range(n):
                    # chat: ~90 prompt + ~100 reply words, under 512 tokens in the template
                    # (~2 tokens a word with the 512-token BPE): nothing is cut
                    row = {"text": take(max(520, seq + 8))} if kind == "long" else {"messages": [
                        {"role": "system", "content": "Continue the story."},
                        {"role": "user", "content": take(90)},
                        {"role": "assistant", "content": take(100)}]}
                    f.write(json.dumps(row) + "\n")
        out[kind] = folder
    return out


def prepare(work: Path, std: float = 0.2, seq: int = SEQ) -> tuple[Path, dict[str, Path]]:
    """The model folder (weights N(0, std)) and the data sets, written once under `work`."""
    model = h.tiny_llama(work / ("llama" if std == 0.2 else f"llama-std{std:g}"), intermediate=None,
                         std=std, **MODEL)
    return model, write_data(work / ("data" if seq <= 512 else f"data-{seq}"), seq=seq)


def lora_overrides(model: Path, data: Path, steps: int, *, batch: int = BATCH, lr: float = LR,
                   targets: str = "query,key,value,out") -> list[str]:
    """mlxlab's overrides for LoRA rank 8 (alpha 16) on `model` with the jsonl files in `data`."""
    return [f"model.pretrained={model}", f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'valid.jsonl'}", f"model.lora.rank={RANK}",
            f"model.lora.alpha={ALPHA}", f"model.lora.targets=[{targets}]",
            f"trainer.batch_size={batch}", f"trainer.max_steps={steps}",
            f"optimizer.learning_rate={lr}", "trainer.schedule.warmup_steps=0"]


def run_mlxlab(out: Path, overrides: list[str], env: dict | None = None,
               step_times: bool = False) -> dict:
    """`mlxlab.train OVERRIDES` with tracking=csv and every step logged, in `out`: each step's
    tokens/s, MLX peak and loss (`step_times`: and its wall seconds, the whole loop's, from
    benchmarks.callbacks.StepTimes); the process's peak RSS, the first step's seconds (its
    compile), the compiles, the wall time, the last validation loss, a checkpoint's size."""
    shutil.rmtree(out, ignore_errors=True)  # its metrics.csv appends
    out.parent.mkdir(parents=True, exist_ok=True)
    times = out.with_name(out.name + ".times")
    times.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mlxlab.train", *overrides, "trainer.log_every_steps=1",
           "tracking=csv", "callbacks.progress.enabled=false", "callbacks.memory.every=1",
           f"hydra.run.dir={out}"]
    if step_times:
        cmd.append(f"+callbacks.step_times={{_target_:benchmarks.callbacks.StepTimes,path:{times}}}")
    path = os.pathsep.join([str(REPO / "src"), str(REPO)])  # benchmarks.callbacks
    proc, rss = h.run_with_peak_rss(cmd, what="mlxlab", log=out.with_name(out.name + ".log"), cwd=REPO,
                                    env={**(env or os.environ), "PYTHONPATH": path})
    rows = csv_metrics(out)
    tags = json.loads((out / "tracking" / "tags.json").read_text())
    clock = [float(x) for x in times.read_text().split()] if step_times else []
    return {"steps": [{"step": s, "tokens_per_sec": m["train/tokens_per_sec"],
                       "peak_mb": m.get("memory/peak_mb", float("nan")), "loss": m["train/loss"],
                       **({"seconds": clock[s] - clock[s - 1]} if clock else {})}
                      for s, m in sorted(rows.items()) if "train/tokens_per_sec" in m],
            "rss_mb": rss, "first_step_s": float(tags.get("mlxlab.compile_s", "nan")),
            "compiles": int(tags.get("mlxlab.compiles", "0")), "wall_s": proc.wall_s,
            "val_loss": next((m["val/loss"] for _, m in sorted(rows.items(), reverse=True)
                              if "val/loss" in m), None),
            "checkpoint_mb": sum(f.stat().st_size for f in (out / "checkpoints" / "best").glob("*")
                                 if f.is_file()) / 2**20}


def csv_metrics(out: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of a tracking=csv run in `out` (or of its metrics.csv alone, as a
    run is kept under benchmarks/results)."""
    path = out / "tracking" / "metrics.csv"
    rows: dict[int, dict] = {}
    with open(path if path.is_file() else out / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {})[r["name"]] = float(r["value"])
    return rows

def run_mlx_lm(model: Path, data: Path, steps: int, out: Path, *, openblas: bool,
               fast_quantized: bool = False, seq: int = SEQ, batch: int = BATCH, lr: float = LR,
               mask_prompt: bool = True, env: dict | None = None, **extra) -> dict:
    """mlx_lm.lora's own training (its CLI's `run`, a callback keeping each step's report) in
    its own process: the same keys as run_mlxlab's. `openblas`: MLX on mlxlab's OpenBLAS;
    `fast_quantized`: its loaded model on mlxlab's CPU quantized product."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = {"model": str(model), "train": True, "data": str(data), "iters": steps,
            "batch_size": batch, "num_layers": -1, "max_seq_length": seq + 1,
            "learning_rate": lr, "steps_per_report": 1, "steps_per_eval": 10 * steps,
            "val_batches": 1, "save_every": 10 * steps, "adapter_path": str(out / "adapters"),
            "mask_prompt": mask_prompt, **extra,
            "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": ALPHA / RANK, "keys": MLX_LM_KEYS}}
    (out / "args.json").write_text(json.dumps(args))
    report = out / "report.jsonl"
    proc, rss = h.run_with_peak_rss(
        [sys.executable, "-c", MLX_LM_WORKER, str(out / "args.json"), str(report),
         "1" if openblas else "0", "1" if fast_quantized else "0"],
        what="mlx-lm", cwd=out, env=env or {**os.environ, "PYTHONPATH": str(REPO / "src")})
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return {"steps": [{"step": r["iteration"], "tokens_per_sec": r["tokens_per_second"],
                       "peak_mb": r["peak_memory"] * 1e9 / 2**20, "loss": r["train_loss"]}
                      for r in rows],
            "rss_mb": rss, "first_step_s": 1 / rows[0]["iterations_per_second"], "compiles": None,
            "wall_s": proc.wall_s, "adapters": str(out / "adapters")}


def summary(run: dict, skip: int) -> dict:
    """A run's median tokens/s over the steps after `skip`, its peaks, first step and losses."""
    timed = [s for s in run["steps"] if s["step"] > skip] or run["steps"]
    return {"tokens_per_sec": statistics.median(s["tokens_per_sec"] for s in timed),
            "peak_mb": max(s["peak_mb"] for s in run["steps"]), "rss_mb": run["rss_mb"],
            "first_step_s": run["first_step_s"], "compiles": run.get("compiles"),
            "wall_s": run["wall_s"], "loss_first": run["steps"][0]["loss"],
            "loss_last": run["steps"][-1]["loss"], "checkpoint_mb": run.get("checkpoint_mb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    h.add_options(p, rows="long,chat", tools=",".join(TOOLS), steps=12,
                  skip=(2, "first steps left out (compiling)"), rounds=2, work=None,
                  init_std=(0.2, "the random weights' std: 0.2 (peaked attention, denormals in the "
                            "backward) or 0.02 (a trained model's scale)"),
                  seq=(SEQ, "positions a row"), model=(None, "a Hugging Face folder (float weights) "
                                                       "to fine-tune instead of the random Llama"),
                  grad_checkpoint=(False, "both tools recompute each decoder block in the backward"))
    args = p.parse_args()
    if args.smoke:  # long rows, 2 steps, one round; mlx-lm on mlxlab's OpenBLAS (the stock BLAS
        # runs the same code ~10x slower: minutes a step here)
        args.rows, args.steps, args.skip, args.rounds = "long", 2, 0, 1
        args.tools = "mlxlab,mlx-lm-openblas"
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_lora_"))
    model, data = prepare(work, args.init_std, args.seq)
    model = Path(args.model) if args.model else model
    tools = args.tools.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    groups = args.rows.split(",")
    for rnd, kind, tool in ((r, k, t) for r in range(args.rounds) for k in groups
                            for t in h.in_round(tools, r)):
        out = work / "runs" / f"{kind}-{tool}-{rnd}"
        if tool == "mlxlab":
            run = run_mlxlab(out, [
                f"experiment={'finetune_chat' if kind == 'chat' else 'finetune_completions'}",
                *lora_overrides(model, data[kind], args.steps), f"data.max_length={args.seq}",
                f"trainer.grad_checkpoint={str(args.grad_checkpoint).lower()}",
                f"trainer.eval_every_steps={10 * args.steps}"])
        else:
            run = run_mlx_lm(model, data[kind], args.steps, out, seq=args.seq,
                             openblas=tool.endswith("openblas"), mask_prompt=kind == "chat",
                             grad_checkpoint=args.grad_checkpoint)
        s = summary(run, args.skip)
        results.setdefault((kind, tool), []).append(s)
        print(json.dumps({"round": rnd, "rows": kind, "tool": tool, **s}), flush=True)
    shown = table(results, groups, tools)
    h.print_table(shown)
    group = groups[0]
    other = next((t for t in tools if t.startswith("mlx-lm")), None)
    ratio = None
    if (group, "mlxlab") in results and (group, other) in results:
        ratio = round(statistics.median(r["tokens_per_sec"] for r in results[(group, "mlxlab")])
                      / statistics.median(r["tokens_per_sec"] for r in results[(group, other)]), 2)
    h.write_record(f"lora-{group}s-vs-mlx-lm", {
        "args": vars(args), "runs": {f"{g}/{t}": runs for (g, t), runs in results.items()},
        "table": shown},
        question="speed-mlx", reference=ratio and f"mlx_lm.lora ({other})", ratio=ratio,
        summary=ratio and f"LoRA trained tokens/s, {group} rows (higher is better)",
        smoke=args.smoke)


def table(results: dict[tuple[str, str], list[dict]], groups: list[str], tools: list[str]) -> dict:
    """Median tokens/s and peak per (rows, tool), with mlxlab's ratios to each other tool."""
    rows = []
    for group in groups:
        base = results.get((group, "mlxlab"))
        for tool in tools:
            runs = results[(group, tool)]
            rate = statistics.median(r["tokens_per_sec"] for r in runs)
            peak = statistics.median(r["peak_mb"] for r in runs)
            ratio = peak_ratio = "-"
            if base and tool != "mlxlab":
                ratio = f"{statistics.median(r['tokens_per_sec'] for r in base) / rate:.2f}x"
                peak_ratio = f"{statistics.median(r['peak_mb'] for r in base) / peak:.2f}x"
            rows.append([group, tool, f"{rate:.{0 if rate >= 100 else 1}f}", f"{peak:.0f}", ratio, peak_ratio])
    return {"head": ["rows", "tool", "tokens/s", "peak MB", "mlxlab's tokens/s ratio",
                     "mlxlab's peak ratio"], "rows": rows}

if __name__ == "__main__":
    main()
