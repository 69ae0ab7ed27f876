"""The host's time per training step: mlxlab's loop beside mlx-lm's `train()` on a model so small
that its arithmetic is ~0 (issue 75, "a lean step").

    python benchmarks/speed/bench_step_host.py [--steps 300] [--rounds 3] [--work DIR] [--smoke]

One random Llama (scripts/tiny_hf_model.py's no-torch writer: hidden 64, 2 layers, a ChatML
template), LoRA rank 8 on q/k/v/o, batch 4, `{"text": ...}` rows cut to 32 tokens (every batch
one shape: no compiles after the first), no evaluation, a report every 100 steps. Each tool
runs as its own process through its own training code, on the same OpenBLAS (mlx-lm's worker
lets mlxlab's runtime/blas.py point MLX at it first): mlxlab's `mlxlab.train` (tracking=csv, the
progress bar and the memory callback as shipped) and mlx-lm's `mlx_lm.lora` train loop
(bench_lora's worker). ms/step: each tool's own rate over the steps after the first report
(mlxlab: its logged tokens/s over the tokens a step trains; mlx-lm: its iterations/s), the
median over the reports and then over rounds, which alternate the order of the tools. The
load average before each run is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchmarks.common import add_smoke, cpu_model, run_with_peak_rss  # noqa: E402
from benchmarks.speed.bench_lora import (  # noqa: E402
    MLX_LM_KEYS,
    MLX_LM_WORKER,
    csv_metrics,
    sentences,
)

BATCH, SEQ, RANK, REPORT = 4, 32, 8, 100


def prepare(work: Path) -> tuple[Path, Path]:
    """The tiny model folder and a data folder (train.jsonl, valid.jsonl) of long text rows."""
    from tiny_hf_model import save_tiny_llama_without_torch

    model, data = work / "tiny", work / "data"
    if not (model / "config.json").exists():
        save_tiny_llama_without_torch(model, hidden=64, layers=2, heads=4, kv_heads=2,
                                      intermediate=None, std=0.02, chat="chatml")
    data.mkdir(parents=True, exist_ok=True)
    text = " ".join(sentences())
    words = text.split()
    rows = [" ".join(words[i:i + 40]) for i in range(0, 40 * 400, 40)]
    for name, part in (("train", rows), ("valid", rows[:8])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in part))
    return model, data


def run_mlxlab(model: Path, data: Path, steps: int, out: Path) -> list[float]:
    """ms per step of each logged window after the first."""
    cmd = [sys.executable, "-m", "mlxlab.train", "experiment=finetune_completions",
           f"model.pretrained={model}", f"data.train_file={data / 'train.jsonl'}",
           f"data.val_file={data / 'valid.jsonl'}", f"data.max_length={SEQ}",
           "data.too_long=truncate", f"model.lora.rank={RANK}", "model.lora.alpha=16",
           "model.lora.targets=[query,key,value,out]", f"trainer.batch_size={BATCH}",
           f"trainer.max_steps={steps}", f"trainer.eval_every_steps={10 * steps}",
           f"trainer.log_every_steps={REPORT}", "tracking=csv", "trainer.schedule.warmup_steps=0",
           f"hydra.run.dir={out}"]
    proc, _ = run_with_peak_rss(cmd, cwd=REPO, env={**os.environ,
                                                    "PYTHONPATH": str(REPO / "src")})
    if proc.returncode:
        raise RuntimeError(f"mlxlab failed:\n{proc.stderr[-3000:]}")
    rows = csv_metrics(out)
    tokens = BATCH * SEQ  # every row is cut to SEQ + 1 tokens: SEQ trained positions each
    return [1000 * tokens / m["train/tokens_per_sec"] for s, m in sorted(rows.items())
            if "train/tokens_per_sec" in m and s > REPORT]


def run_mlx_lm(model: Path, data: Path, steps: int, out: Path) -> list[float]:
    out.mkdir(parents=True, exist_ok=True)
    args = {"model": str(model), "train": True, "data": str(data), "iters": steps,
            "batch_size": BATCH, "num_layers": -1, "max_seq_length": SEQ + 1,
            "learning_rate": 1e-4, "steps_per_report": REPORT, "steps_per_eval": 10 * steps,
            "val_batches": 1, "save_every": 10 * steps, "adapter_path": str(out / "adapters"),
            "lora_parameters": {"rank": RANK, "dropout": 0.0, "scale": 2.0, "keys": MLX_LM_KEYS}}
    (out / "args.json").write_text(json.dumps(args))
    report = out / "report.jsonl"
    report.unlink(missing_ok=True)
    proc, _ = run_with_peak_rss([sys.executable, "-c", MLX_LM_WORKER, str(out / "args.json"),
                                 str(report), "1", "0"], cwd=out,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if proc.returncode:
        raise RuntimeError(f"mlx-lm failed:\n{proc.stderr[-3000:]}")
    reports = [json.loads(line) for line in report.read_text().splitlines()]
    return [1000 / r["iterations_per_second"] for r in reports if r["iteration"] > REPORT]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 2 * REPORT + 1, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_step_host_"))
    model, data = prepare(work)
    tools = ["mlxlab", "mlx-lm"]
    results: dict[str, list[float]] = {t: [] for t in tools}
    for rnd in range(args.rounds):
        for tool in tools if rnd % 2 == 0 else tools[::-1]:
            load = os.getloadavg()[0]
            run = run_mlxlab if tool == "mlxlab" else run_mlx_lm
            ms = statistics.median(run(model, data, args.steps, work / f"{tool}-{rnd}"))
            results[tool].append(ms)
            print(json.dumps({"round": rnd, "tool": tool, "ms_per_step": round(ms, 3),
                              "load_before": load}), flush=True)
    medians = {t: statistics.median(v) for t, v in results.items()}
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; {args.steps} steps, batch {BATCH} x {SEQ}; "
          f"median of {args.rounds} rounds")
    print("| tool | ms/step | mlxlab / tool |\n|---|---:|---:|")
    for t in tools:
        print(f"| {t} | {medians[t]:.2f} | {medians['mlxlab'] / medians[t]:.2f} |")
    return medians


if __name__ == "__main__":
    main()
