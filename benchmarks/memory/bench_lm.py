"""tinystories_nano on the shipped TinyStories sample: loss curve, speed, memory, data throughput.

    python benchmarks/memory/bench_lm.py [--tokens 614400] [--out DIR] [--root DIR] [--no-doubled-train]
                               [override ...]

1. Training: `mlxlab-train experiment=tinystories_nano` (the real CLI, tracked in an MLflow store
   under --root) for a fixed token budget (trainer.max_steps = tokens / (batch_size * seq_len));
   the validation loss / perplexity curve comes from the run's checkpoint history, training
   tokens/s (median of the logged windows) and MLX peak memory from its MLflow metrics, peak RSS
   from the OS (wait4) for the training process.
2. The same run on the corpus doubled (a copy of the sample written twice into one file,
   data.source.data_files=<it>): peak memory must not grow (the stream holds no corpus-sized state).
3. The data module alone (tokenizer + packing, StreamingText.train_batches in its background
   thread), one full epoch of the 1x and the 2x corpus, each in its own process: tokens/s, as a
   ratio to the training tokens/s measured in step 1 (target >= 10x, so data never stalls the
   step), and peak RSS (must not grow either).

Timings are ratios within one invocation; absolute numbers need a quiet machine. The table is
printed and written to <out>/bench_lm.md, the curve to <out>/bench_lm_curve.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402

RSS_TOLERANCE_MB = 32  # peak-memory noise allowed between the 1x and 2x runs (allocator, threads)


def compose(root: Path, overrides: list[str]):
    """The benchmark's composed config (to read batch_size, seq_len and data settings)."""
    from mlxlab.config import compose_config

    return compose_config(root, overrides)


def run_child(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float]:
    """Run a process to the end; (wall seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log_path}:\n{tail}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def train_run(root: Path, name: str, overrides: list[str], env: dict, experiment: str) -> dict:
    """One training run through the CLI; its curve, speed and memory."""
    from mlflow.tracking import MlflowClient

    from mlxlab.checkpoint import CheckpointState

    run_dir = root / "outputs" / name
    cmd = [sys.executable, "-m", "mlxlab.train", *overrides, f"hydra.run.dir={run_dir}"]
    seconds, rss_mb = run_child(cmd, env, root / f"{name}.log")
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    history = CheckpointState.read(steps[-1]).history
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        f"tags.`mlxlab.run_dir` = '{run_dir}'",
    )
    speeds = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_sec")]
    peaks = [m.value for m in client.get_metric_history(run.info.run_id, "memory/peak_mb")]
    return {
        "name": name,
        "run_dir": run_dir,
        "seconds": seconds,
        "rss_mb": rss_mb,
        "mlx_peak_mb": max(peaks, default=float("nan")),
        # the median skips the first window (compilation) and the windows holding an evaluation
        "tokens_per_s": statistics.median(speeds) if speeds else float("nan"),
        "val": list(zip(*(history[k] for k in ("val/loss", "val/perplexity")))),
        "train_loss": history.get("train/loss", []),
    }


def data_pass(data_files: str, tokenizer: str, overrides: list[str], root: Path) -> None:
    """Child process: one full training epoch of the data module alone; prints JSON."""
    from mlxlab.config import instantiate
    from mlxlab.data.batching import Batching
    from mlxlab.data.streaming import token_throughput

    cfg = compose(root, [*overrides, f"data.source.data_files={data_files}",
                         f"data.tokenizer.path={tokenizer}"])
    data = instantiate(cfg.data)
    data.setup(None)
    stats = token_throughput(data, Batching(batch_size=cfg.trainer.batch_size), 10**9)
    print(json.dumps(stats))


def data_run(root: Path, name: str, data_files: Path, tokenizer: Path, overrides: list[str],
             env: dict) -> dict:
    cmd = [sys.executable, __file__, "--data-pass", str(data_files), "--tokenizer", str(tokenizer),
           "--root", str(root), *overrides]
    _, rss_mb = run_child(cmd, env, root / f"{name}.log")
    stats = json.loads((root / f"{name}.log").read_text().strip().splitlines()[-1])
    return {"name": name, "rss_mb": rss_mb, **stats}


def plot(runs: list[dict], tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        steps, loss, ppl = zip(*[(s, v, p) for (s, v), (_, p) in run["val"]])
        tokens = [s * tokens_per_step / 1e6 for s in steps]
        ax_loss.plot(tokens, loss, marker="o", label=run["name"])
        ax_ppl.plot(tokens, ppl, marker="o", label=run["name"])
    for ax, what in ((ax_loss, "validation loss"), (ax_ppl, "validation perplexity")):
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    fig.suptitle("tinystories_nano on the shipped TinyStories sample")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, cfg, runs, data_runs, max_steps, tokens_per_step) -> str:
    lines = [f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}",
             f"budget: {max_steps} steps x {cfg.trainer.batch_size} x {cfg.data.packing.seq_len} = "
             f"{max_steps * tokens_per_step:,} tokens; runs in {args.root}", ""]
    lines += ["| step | tokens | " + " | ".join(f"{r['name']} val loss | {r['name']} val ppl"
                                                for r in runs) + " |",
              "|---|---|" + "---|---|" * len(runs)]
    for i, ((step, _), _) in enumerate(runs[0]["val"]):
        cells = []
        for r in runs:
            if i < len(r["val"]):
                (_, loss), (_, ppl) = r["val"][i]
                cells += [f"{loss:.3f}", f"{ppl:.1f}"]
            else:
                cells += ["", ""]
        lines.append(f"| {step} | {step * tokens_per_step:,} | " + " | ".join(cells) + " |")
    lines += ["", "| run | wall s | train tokens/s (median) | MLX peak MB | peak RSS MB | "
              "best val loss | best val ppl |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        best_loss = min(v for (_, v), _ in r["val"])
        lines.append(f"| {r['name']} | {r['seconds']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mlx_peak_mb']:.0f} | {r['rss_mb']:.0f} | {best_loss:.3f} | "
                     f"{math.exp(best_loss):.1f} |")
    train_speed = runs[0]["tokens_per_s"]
    lines += ["", "| data module alone (full epoch) | tokens | tokens/s | x training tokens/s | "
              "peak RSS MB |", "|---|---|---|---|---|"]
    for d in data_runs:
        lines.append(f"| {d['name']} | {d['tokens']:,.0f} | {d['tokens_per_s']:,.0f} | "
                     f"{d['tokens_per_s'] / train_speed:.1f}x | {d['rss_mb']:.0f} |")
    ratio = data_runs[0]["tokens_per_s"] / train_speed
    lines += ["", f"data throughput: {ratio:.1f}x training -> target >= 10x "
                  f"{'met' if ratio >= 10 else 'NOT met'}"]
    for what, pair in (("training", runs), ("data alone", data_runs)):
        if len(pair) == 2:
            one, two = pair[0]["rss_mb"], pair[1]["rss_mb"]
            flat = two <= one * 1.05 + RSS_TOLERANCE_MB
            lines.append(f"peak RSS, {what}: 1x {one:.0f} MB, 2x {two:.0f} MB -> "
                         f"{'flat' if flat else 'GROWS'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of the preset")
    parser.add_argument("--tokens", type=int, default=None,
                        help="training token budget (default: the preset's max_steps)")
    parser.add_argument("--root", type=Path, default=None,
                        help="runs, MLflow store and caches (default: a new temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="table + PNG (default: --root)")
    parser.add_argument("--no-doubled-train", action="store_true",
                        help="skip the training run on the doubled corpus (data pass still runs)")
    parser.add_argument("--data-pass", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one training step on the corpus, no doubled-corpus run
        args.tokens, args.no_doubled_train = 1, True
    preset = ["experiment=tinystories_nano", "callbacks.progress.enabled=false", *args.overrides]
    if args.data_pass:
        return data_pass(args.data_pass, args.tokenizer, preset, args.root)

    args.root = (args.root or Path(tempfile.mkdtemp(prefix="bench_lm_"))).resolve()
    args.root.mkdir(parents=True, exist_ok=True)
    out = (args.out or args.root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(args.root, preset)
    tokens_per_step = int(cfg.trainer.batch_size) * int(cfg.data.packing.seq_len)
    max_steps = math.ceil(args.tokens / tokens_per_step) if args.tokens else cfg.trainer.max_steps
    log_every = int(cfg.trainer.log_every_steps)
    train_overrides = [*preset, "tracking=mlflow", f"trainer.max_steps={max_steps}",
                       f"callbacks.memory.every={log_every}"]
    env = {**os.environ, "MLXLAB_ROOT": str(args.root), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    sample = Path(str(cfg.data.source.data_files))
    doubled = args.root / "sample_x2.txt"
    text = sample.read_text().rstrip("\n")
    doubled.write_text(text + "\n\n" + text + "\n")  # paragraphs stay whole at the seam

    print(f"training 1x ({max_steps} steps) ...", flush=True)
    runs = [train_run(args.root, "corpus_1x", train_overrides, env, cfg.task_name)]
    tokenizer = runs[0]["run_dir"] / "tokenizer.json"
    if not args.no_doubled_train:
        print("training 2x ...", flush=True)
        runs.append(train_run(args.root, "corpus_2x",
                              [*train_overrides, f"data.source.data_files={doubled}",
                               f"data.tokenizer.path={tokenizer}"], env, cfg.task_name))
    print("data module alone, 1x and 2x ...", flush=True)
    data_runs = [data_run(args.root, f"data_{n}", f, tokenizer, args.overrides, env)
                 for n, f in (("1x", sample), ("2x", doubled))]

    table = report(args, cfg, runs, data_runs, max_steps, tokens_per_step)
    plot(runs, tokens_per_step, out / "bench_lm_curve.png")
    (out / "bench_lm.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwritten: {out / 'bench_lm.md'}, {out / 'bench_lm_curve.png'}")


if __name__ == "__main__":
    main()
