"""LoRA fine-tuning speed and memory, mlxlab beside mlx_lm.lora, on long rows and on chats.

    python benchmarks/speed/bench_lora.py [--rows long,chat] [--tools mlxlab,mlx-lm,mlx-lm-openblas]
                                    [--steps 12] [--rounds 2] [--work DIR] [--seq 512]
                                    [--grad-checkpoint]

One random Llama (`scripts/tiny_hf_model.py`'s no-torch writer: hidden 512, 8 layers, 4 query /
2 key-value heads, ~22.6M parameters, a ChatML template; weights N(0, --init-std): 0.2, the
default, makes attention so peaked that the backward makes denormal floats, 0.02 does not), LoRA rank 8 (scale 2: mlxlab's alpha
16) on q/k/v/o of every layer, batch 4, Adam(W) at lr 2e-4, no weight decay, sequences of 512
positions (mlxlab data.max_length=512; mlx-lm --max-seq-length 513, which cuts rows to 513 tokens
and trains on 512 positions). Two data sets, the same jsonl for both tools:
- long: `{"text": ...}` rows of >= 600 tokens (TinyStories sentences), every position trained;
- chat: `{"messages": [system, user, assistant]}` rows of < 512 tokens in the ChatML template,
  the loss on the assistant turn only (one assistant turn a chat, so mlxlab's mask — every
  assistant turn with its end-of-turn token — and mlx-lm's --mask-prompt — everything after the
  last prompt — train the same tokens up to the newline after <|im_end|>).
Each tool runs as its own process through its own training code: mlxlab's `mlxlab.train`
(tracking=csv, a step logged every step) and mlx-lm's `mlx_lm.lora.run` (its CLI's function,
with a callback recording its per-step report). `mlx-lm` is mlx-lm as installed (MLX's bundled
reference BLAS on Linux); `mlx-lm-openblas` first lets mlxlab's runtime/blas.py point MLX at the
same OpenBLAS mlxlab uses (and nothing else of mlxlab). tokens/s: trained tokens (each tool's own
count: mlxlab's loss_mask, mlx-lm's length mask) over the time of the steps after the first
`--skip` (compiling) ones, mlxlab's time being its whole loop (data, callbacks, logging) and
mlx-lm's its step alone; peak: MLX's peak memory (mx.get_peak_memory), which both tools report.
Rounds alternate the order of the tools; the table gives the median over rounds. `--seq` sets the
positions a row (long rows are written longer to match); `--grad-checkpoint` runs both tools
recomputing each decoder block in the backward (mlxlab `trainer.grad_checkpoint=true`, mlx-lm
`--grad-checkpoint`); `--model` fine-tunes a Hugging Face folder instead of the random Llama.
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
sys.path.insert(0, str(REPO / "scripts"))
from benchmarks.harness import add_smoke, cpu_model, in_round, run_with_peak_rss, write_record  # noqa: E402

SEQ, BATCH, RANK, ALPHA, LR = 512, 4, 8, 16.0, 2e-4
MODEL = dict(hidden=512, layers=8, heads=4, kv_heads=2, chat="chatml")
TOOLS = ("mlxlab", "mlx-lm", "mlx-lm-openblas")
MLX_LM_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]

# Runs mlx-lm's own LoRA training (mlx_lm.lora.run, what its CLI calls) and writes each per-step
# report as a json line. argv: args.json report.jsonl
# openblas(0|1) [fast_quantized(0|1): mlxlab's CPU quantized product on the loaded model]
MLX_LM_WORKER = """
import json, sys, types
if sys.argv[3] == "1":
    from mlxlab.runtime.blas import setup_blas  # MLX's BLAS calls only; nothing else of mlxlab
    print("blas:", setup_blas(), flush=True)
import mlx.core as mx
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Record(TrainingCallback):
    def on_train_loss_report(self, info):
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps(info) + "\\n")

args = dict(lora.CONFIG_DEFAULTS)
args.update(json.load(open(sys.argv[1])))
args = types.SimpleNamespace(**args)
# lora.run's body, with our callback (run builds its own from --report-to)
lora.np.random.seed(args.seed)
model, tokenizer = lora.load(args.model)
if sys.argv[4:] == ["1"]:
    from mlxlab.models.quantized_cpu import use_fast_cpu_quantized
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

    def take(words: int) -> str:
        nonlocal cursor
        picked, count = [], 0
        while count < words:
            s = sents[cursor % len(sents)]
            cursor += 1
            picked.append(s)
            count += len(s.split())
        return " ".join(picked)

    for kind in ("long", "chat"):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("valid", n_val)):
            with open(folder / f"{name}.jsonl", "w") as f:
                for _ in range(n):
                    if kind == "long":
                        row = {"text": take(max(520, seq + 8))}
                    else:  # ~90 prompt + ~100 reply words: under 512 tokens in the template
                        # (~2 tokens a word with the 512-token BPE): nothing is cut
                        row = {
                            "messages": [
                                {"role": "system", "content": "Continue the story."},
                                {"role": "user", "content": take(90)},
                                {"role": "assistant", "content": take(100)},
                            ]
                        }
                    f.write(json.dumps(row) + "\n")
        out[kind] = folder
    return out


def prepare(work: Path, std: float = 0.2, seq: int = SEQ) -> tuple[Path, dict[str, Path]]:
    """The model folder (weights N(0, std)) and the data sets, written once under `work`."""
    from tiny_hf_model import save_tiny_llama_without_torch

    model = work / ("llama" if std == 0.2 else f"llama-std{std:g}")
    if not (model / "config.json").exists():
        save_tiny_llama_without_torch(model, intermediate=None, std=std, **MODEL)
    return model, write_data(work / ("data" if seq <= 512 else f"data-{seq}"), seq=seq)


def run_mlxlab(model: Path, data: Path, kind: str, steps: int, out: Path, seq: int | None = None,
               grad_checkpoint: bool = False, targets: str = "query,key,value,out",
               batch: int = BATCH) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)  # its metrics.csv appends
    exp = "finetune_chat" if kind == "chat" else "finetune_completions"
    cmd = [
        sys.executable,
        "-m",
        "mlxlab.train",
        f"experiment={exp}",
        f"model.pretrained={model}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.val_file={data / 'valid.jsonl'}",
        f"data.max_length={seq or SEQ}",
        f"trainer.grad_checkpoint={str(grad_checkpoint).lower()}",
        f"model.lora.rank={RANK}",
        f"model.lora.alpha={ALPHA}",
        f"model.lora.targets=[{targets}]",
        f"trainer.batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every_steps={10 * steps}",
        "trainer.log_every_steps=1",
        f"optimizer.learning_rate={LR}",
        "tracking=csv",
        "callbacks.progress.enabled=false",
        "callbacks.memory.every=1",
        "trainer.schedule.warmup_steps=0",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc, rss = run_with_peak_rss(cmd, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"mlxlab failed:\n{proc.stderr[-3000:]}")
    rows = csv_metrics(out)
    return [
        {
            "step": s,
            "tokens_per_sec": m["train/tokens_per_sec"],
            "peak_mb": m.get("memory/peak_mb", float("nan")),
            "loss": m["train/loss"],
            "rss_mb": rss,
        }
        for s, m in sorted(rows.items())
        if "train/tokens_per_sec" in m
    ]


def csv_metrics(out: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of a tracking=csv run in `out`."""
    rows: dict[int, dict] = {}
    with open(out / "tracking" / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {})[r["name"]] = float(r["value"])
    return rows


def run_mlx_lm(
    model: Path, data: Path, kind: str, steps: int, out: Path, openblas: bool,
    fast_quantized: bool = False, seq: int | None = None, grad_checkpoint: bool = False,
    keys: list[str] = MLX_LM_KEYS, batch: int = BATCH,
) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = {
        "model": str(model),
        "train": True,
        "data": str(data),
        "iters": steps,
        "batch_size": batch,
        "num_layers": -1,
        "max_seq_length": (seq or SEQ) + 1,
        "grad_checkpoint": grad_checkpoint,
        "learning_rate": LR,
        "steps_per_report": 1,
        "steps_per_eval": 10 * steps,
        "val_batches": 1,
        "save_every": 10 * steps,
        "adapter_path": str(out / "adapters"),
        "mask_prompt": kind == "chat",
        "lora_parameters": {
            "rank": RANK,
            "dropout": 0.0,
            "scale": ALPHA / RANK,
            "keys": keys,
        },
    }
    (out / "args.json").write_text(json.dumps(args))
    report = out / "report.jsonl"
    report.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc, rss = run_with_peak_rss(
        [
            sys.executable,
            "-c",
            MLX_LM_WORKER,
            str(out / "args.json"),
            str(report),
            "1" if openblas else "0",
            "1" if fast_quantized else "0",
        ],
        cwd=out,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"mlx-lm failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return [
        {
            "step": r["iteration"],
            "tokens_per_sec": r["tokens_per_second"],
            "peak_mb": r["peak_memory"] * 1e9 / 2**20,
            "loss": r["train_loss"],
            "seconds": 1 / r["iterations_per_second"],
            "rss_mb": rss,
        }
        for r in rows
    ]


def summarize(steps: list[dict], skip: int) -> dict:
    """Rate over the timed steps (each step's tokens / its rate is its time; equal tokens per step
    on long rows, so this is the median of the per-step rates there), and the last peak."""
    timed = [s for s in steps if s["step"] > skip]
    return {
        "tokens_per_sec": statistics.median(s["tokens_per_sec"] for s in timed),
        "peak_mb": max(s["peak_mb"] for s in steps),
        "loss_first": steps[0]["loss"],
        "steps": len(steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="long,chat")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (compiling)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default=None)
    p.add_argument(
        "--init-std",
        type=float,
        default=0.2,
        help="the random weights' std: 0.2 (peaked attention, denormals in the backward) or "
        "0.02 (a trained model's scale)",
    )
    p.add_argument("--seq", type=int, default=SEQ, help="positions a row")
    p.add_argument("--model", default=None,
                   help="a Hugging Face folder (float weights) to fine-tune instead of the random Llama")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="both tools recompute each decoder block in the backward")
    add_smoke(p)
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
    for rnd in range(args.rounds):
        for kind in args.rows.split(","):
            for tool in in_round(tools, rnd):
                out = work / "runs" / f"{kind}-{tool}-{rnd}"
                if tool == "mlxlab":
                    steps = run_mlxlab(model, data[kind], kind, args.steps, out, args.seq,
                                       args.grad_checkpoint)
                else:
                    steps = run_mlx_lm(
                        model, data[kind], kind, args.steps, out, openblas=tool.endswith("openblas"),
                        seq=args.seq, grad_checkpoint=args.grad_checkpoint,
                    )
                s = summarize(steps, args.skip)
                results.setdefault((kind, tool), []).append(s)
                print(json.dumps({"round": rnd, "rows": kind, "tool": tool, **s}), flush=True)
    print(
        f"\n{cpu_model()}, {os.cpu_count()} cores; "
        f"{args.model or f'random Llama, weights N(0, {args.init_std:g})'}; {args.seq} "
        f"positions a row; gradient checkpointing {'on' if args.grad_checkpoint else 'off'}; "
        f"{args.steps} steps, the first {args.skip} left out; median of {args.rounds} rounds\n"
    )
    print_table(results, args.rows.split(","), tools, "rows")
    group = args.rows.split(",")[0]
    other = next((t for t in tools if t.startswith("mlx-lm")), None)
    ratio = None
    if (group, "mlxlab") in results and (group, other) in results:
        ratio = round(statistics.median(r["tokens_per_sec"] for r in results[(group, "mlxlab")])
                      / statistics.median(r["tokens_per_sec"] for r in results[(group, other)]), 2)
    write_record(f"lora-{group}s-vs-mlx-lm", {
        "args": vars(args), "runs": {f"{g}/{t}": runs for (g, t), runs in results.items()}},
        question="speed-mlx", reference=ratio and f"mlx_lm.lora ({other})", ratio=ratio,
        summary=ratio and f"LoRA trained tokens/s, {group} rows (higher is better)",
        smoke=args.smoke)


def print_table(results: dict[tuple[str, str], list[dict]], groups: list[str], tools: list[str],
                label: str) -> None:
    """The markdown table of median tokens/s and peak per (group, tool), with mlxlab's ratios
    to each other tool in its group."""
    print(f"| {label} | tool | tokens/s | peak MB | mlxlab's tokens/s ratio | mlxlab's peak ratio |")
    print("|---|---|---|---|---|---|")
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
            print(f"| {group} | {tool} | {rate:.{0 if rate >= 100 else 1}f} | {peak:.0f} | {ratio} "
                  f"| {peak_ratio} |")


if __name__ == "__main__":
    main()
