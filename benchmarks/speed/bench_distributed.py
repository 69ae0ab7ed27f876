"""Data parallelism on one machine: throughput, all-reduce cost, ZeRO-1 optimizer memory.

    python benchmarks/speed/bench_distributed.py [--pairs 3] [--steps 30] [--skip-memory] [--only-lanes]

tokens/s of tinystories_nano, 1 process (2 BLAS threads, batch 16) against `mlx.launch -n 2`
(1 thread and batch 8 per rank) in interleaved pairs; one step's gradient all-reduce alone;
transformer_small's optimizer state and peak per rank with and without shard_optimizer;
`--only-lanes`: streamed text on 2 ranks, the whole stream against data.shard_by_rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, write_record  # noqa: E402

BIN = Path(sys.executable).parent
CACHE = Path(tempfile.gettempdir()) / "mlxlab-bench-dist-cache"
LM = ["experiment=tinystories_nano", "data.splits.max_examples=2000",
      "data.splits.val_examples=20", "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
      "trainer.eval_every_steps=null", "checkpoint.save_every_minutes=null",
      "tracking=none", "trainer.schedule.warmup_steps=2"]
SMALL = ["model=transformer_small", "data=streaming", "data.packing.seq_len=64",
         "model.max_seq_len=64", "data.splits.max_examples=500", "data.splits.val_examples=8",
         "data.tokenizer.max_vocab=8192",
         "callbacks.early_stopping.patience=0", "callbacks.progress.enabled=false",
         "trainer.eval_every_steps=null", "checkpoint.save_every_minutes=null",
         "tracking=none", "trainer.batch_size=2", "optimized_metric=val/loss",
         "optimized_mode=min",
         "trainer.distributed.timeout_s=900"]  # a first (compiling) step can take minutes here


def worker(overrides: list[str], probe_step: int) -> None:
    """One training run (a rank when launched); prints this rank's figures as JSON."""
    import mlxlab  # noqa: F401  (fast BLAS before mlx.core)
    from benchmarks.callbacks import HOOKS, OVERRIDE, RECORD
    from mlxlab.config import compose_config
    from mlxlab.runtime import device, distributed
    from mlxlab.train import train

    root = Path(os.environ["BENCH_ROOT"])
    cfg = compose_config(root, [*overrides, OVERRIDE])  # every rank: the same <root>/outputs/run
    peak: list[float] = []

    def on_step(step: int) -> None:
        if step == 3:
            device.reset_peak_memory()  # compiles done: steady-state steps from here
        if step == probe_step:
            peak.append(device.peak_memory_mb())

    HOOKS["on_step"] = on_step
    train(cfg)
    times, context = RECORD["times"], RECORD["context"]
    ms = [1e3 * (times[k] - times[k - 1]) for k in range(4, len(times))]
    world = distributed.world("auto")
    print("RESULT " + json.dumps({
        "rank": world.rank, "size": world.size, "ms": statistics.median(ms),
        "optimizer_mb": context.optimizer_state_mb, "peak_mb": peak[0] if peak else None,
    }), flush=True)


def allreduce_worker(reps: int) -> None:
    """Time World.all_sum_tree over a tree shaped like tinystories_nano's gradients."""
    import mlxlab  # noqa: F401, I001  (fast BLAS before mlx.core)
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlxlab.models.transformer import Transformer
    from mlxlab.runtime import distributed

    world = distributed.world("auto", 120)
    model = Transformer(vocab_size=512, dim=256, num_layers=4, num_heads=4, max_seq_len=128)
    grads = tree_map(lambda p: mx.ones_like(p), model.trainable_parameters())
    mx.eval(grads)
    nbytes = sum(v.nbytes for _, v in tree_flatten(grads))
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        out = world.all_sum_tree(grads)
        mx.eval(out)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times[2:]) * 1e3
    print("RESULT " + json.dumps({"rank": world.rank, "ms": ms, "mb": nbytes / 2**20}), flush=True)


class CountingTokenizer:
    """A tokenizer that notes what it encodes and the CPU time that takes (all else passes
    through). CPU time of the calling thread (tokenizers runs single-threaded here): on a shared
    box wall time mostly measures waiting for a core."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts, self.seconds = tokenizer, [], 0.0

    def encode_batch(self, texts, **kwargs):
        start = time.thread_time()
        out = self.tokenizer.encode_batch(texts, **kwargs)
        self.seconds += time.thread_time() - start
        self.texts += texts
        return out

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def lanes_worker(mode: str, data_file: str, vocab: str, record: bool) -> None:
    """One epoch of streamed text on this rank, as the trainer reads it: `lanes` (this rank's
    lane, data.shard_by_rank) or `whole` (the global batch of 2 x 16 windows, this rank's rows)."""
    import mlxlab  # noqa: F401, I001  (fast BLAS before mlx.core)
    from mlxlab.data.batching import Batching
    from mlxlab.data.streaming import StreamingText
    from mlxlab.runtime import distributed

    world = distributed.world("auto", 600)
    tokenizer = {"vocab_size": int(vocab), "min_vocab": 0} if vocab != "auto" else {}
    data = StreamingText(source={"data_files": data_file}, splits={"val_examples": 0},
                         packing={"seq_len": 64}, shuffle_buffer=100, tokenizer=tokenizer,
                         tokenizer_sample=500, shard_by_rank=mode == "lanes")
    data.setup()
    data.tokenizer = counting = CountingTokenizer(data.tokenizer)
    lanes = data.use_world(world)
    batching = Batching(batch_size=16 if lanes else 16 * world.size)
    start = time.perf_counter()
    batches = tokens = 0
    for batch in data.train_batches(batching, 0):
        rows = batch if lanes else world.shard_rows(batch)
        tokens += int(rows["loss_mask"].sum().item())
        batches += 1
    seconds = time.perf_counter() - start
    votes = []  # what the lanes' end-of-epoch vote (one per batch) costs on its own
    for _ in range(20):
        vote = time.perf_counter()
        world.sum_numbers([1.0])
        votes.append(time.perf_counter() - vote)
    print("RESULT " + json.dumps({
        "rank": world.rank, "mode": mode, "seconds": seconds, "vote_ms": 1e3 * statistics.median(votes),
        "tokenize_s": counting.seconds, "docs": len(counting.texts), "batches": batches,
        "tokens": tokens, "texts": counting.texts if record else None}), flush=True)


def launch(ranks: int, threads: int, args: list[str]) -> list[dict]:
    root = tempfile.mkdtemp(prefix="mlxlab-bench-dist-")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "BENCH_ROOT": root,
           "MLXLAB_ROOT": root}
    if args[0] == "--worker":  # tokenizers trained once, not per launch
        args = ["--worker", f"paths.cache_dir={CACHE}", *args[1:]]
    cmd = [sys.executable, __file__, *args]
    if ranks > 1:
        port = str(random.randint(20000, 60000))
        cmd = [str(BIN / "mlx.launch"), "-n", str(ranks), "-p", port, "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if len(results) != ranks:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only-lanes", action="store_true")
    parser.add_argument("--lanes-worker", nargs=3, metavar=("MODE", "FILE", "VOCAB"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # one pair of 2 steps and the all-reduce (transformer_small's memory left out)
        args.pairs, args.steps, args.skip_memory = 1, 2, True
    if args.allreduce:
        return allreduce_worker(args.allreduce)
    if args.lanes_worker:
        return lanes_worker(*args.lanes_worker, args.record)
    if args.only_lanes:
        return record({"lanes": lanes(args.pairs)}, args.smoke)
    if args.worker is not None:
        return worker(args.worker, args.probe)

    if args.only_memory:
        return record({"memory": memory()}, args.smoke)
    tokens_per_step = 16 * 128
    steps = f"trainer.max_steps={args.steps + 3}"
    print("| pair | 1 process x 2 threads, batch 16: tokens/s | 2 ranks x 1 thread, batch 8 each: "
          "tokens/s | 2 ranks / 1 process |")
    print("|---:|---:|---:|---:|")
    one, two = [], []
    for k in range(1, args.pairs + 1):
        a = launch(1, 2, ["--worker", *LM, steps, "trainer.batch_size=16"])[0]["ms"]
        b = max(r["ms"] for r in launch(2, 1, ["--worker", *LM, steps, "trainer.batch_size=8"]))
        one.append(tokens_per_step / a * 1e3)
        two.append(tokens_per_step / b * 1e3)
        print(f"| {k} | {one[-1]:.0f} | {two[-1]:.0f} | {two[-1] / one[-1]:.2f} |", flush=True)
    print(f"| median | {statistics.median(one):.0f} | {statistics.median(two):.0f} | "
          f"{statistics.median(two) / statistics.median(one):.2f} |")
    dp_step_ms = tokens_per_step / statistics.median(two) * 1e3

    reduce = launch(2, 1, ["--allreduce", "20"])
    ms = max(r["ms"] for r in reduce)
    print(f"\nall-reduce of one step's gradients ({reduce[0]['mb']:.1f} MB fp32, 2 ranks, ring over "
          f"127.0.0.1): {ms:.1f} ms median = {100 * ms / dp_step_ms:.0f}% of the 2-rank step "
          f"({dp_step_ms:.0f} ms); {reduce[0]['mb'] / ms * 1e3 / 1024:.2f} GB/s of gradients")

    figures = {"tokens_per_s": {"one_process": one, "two_ranks": two}, "allreduce": reduce}
    if not args.skip_memory:
        figures["memory"] = memory()
    record(figures, args.smoke)


def record(figures: dict, smoke: bool) -> None:
    write_record("data-parallel", figures, question="memory", smoke=smoke)


def memory() -> list[dict]:
    print("\n| transformer_small, 2 ranks | optimizer state per rank (MB) | MLX peak memory in "
          "training steps, per rank (MB) | ms/step |")
    print("|---|---|---|---:|")
    found = []
    for shard in ("false", "true"):
        res = launch(2, 1, ["--worker", *SMALL, "trainer.max_steps=6",
                            f"trainer.distributed.shard_optimizer={shard}", "--probe", "6"])
        opt = " / ".join(f"{r['optimizer_mb']:.1f}" for r in res)
        peak = " / ".join(f"{r['peak_mb']:.0f}" for r in res)
        print(f"| shard_optimizer={shard} | {opt} | {peak} | {max(r['ms'] for r in res):.0f} |",
              flush=True)
        found.append({"shard_optimizer": shard, "ranks": res})
    return found


def lanes(pairs: int) -> list[dict]:
    from mlxlab.config import asset_path

    sample = asset_path("tinystories/sample.txt")
    print("| pair | mode | documents tokenized per rank | tokenizing CPU s per rank | epoch s "
          "(slowest rank) | batches per rank | one vote (ms) |")
    print("|---:|---|---|---|---:|---:|---:|")
    found = []
    for k in range(1, pairs + 1):
        for mode in ("whole", "lanes"):
            res = launch(2, 1, ["--lanes-worker", mode, sample, "auto"])
            tokenize = " / ".join(f"{r['tokenize_s']:.2f}" for r in res)
            print(f"| {k} | {mode} | {' / '.join(str(r['docs']) for r in res)} | {tokenize} | "
                  f"{max(r['seconds'] for r in res):.2f} | {res[0]['batches']} | "
                  f"{max(r['vote_ms'] for r in res):.1f} |", flush=True)
            found.append({"pair": k, "mode": mode, "ranks": res})
    return found


if __name__ == "__main__":
    main()
