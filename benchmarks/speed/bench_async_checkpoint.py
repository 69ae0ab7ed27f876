"""Step stall of a checkpoint save, synchronous vs the background writer, for transformer_small.

    python benchmarks/speed/bench_async_checkpoint.py [--steps 24] [--every 6] [--rounds 2]

Builds the real `model=transformer_small` preset (vocab 32000) with AdamW, trains it with one
compiled step on random tokens, and saves through the trainer's own CheckpointWriter every
`--every` steps (real CheckpointManager: temp dir, sha256, fsync, marker, rename, rotation).
Modes run interleaved, `--rounds` times each: `none` (no saves), `sync` (async_write=false, what
every save cost before) and `async`. Reports the training thread's time inside save() (the stall)
and the whole loop's wall time (the background writer competes for the same cores).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from mlxlab.checkpoint import CheckpointManager
from mlxlab.training.async_writer import CheckpointWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402
from benchmarks.speed.bench_checkpoint import build  # noqa: E402  (the same model and AdamW)


def run(mode: str, args, root: Path) -> tuple[list[float], float]:
    import mlx.core as mx
    import mlx.nn as nn

    model, opt = build(args.vocab, args.preset)
    tokens = mx.random.randint(0, args.vocab, (args.batch, args.seq + 1))
    state = [model.state, opt.state, mx.random.state]

    def loss_fn(m, x):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        loss, grads = loss_and_grad(model, x)
        opt.update(model, grads)
        return loss

    directory = root / mode
    writer = CheckpointWriter(CheckpointManager(directory, keep_last_n=2),
                              asynchronous=mode == "async")
    step(tokens)  # compile outside the timing
    mx.eval(state)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        loss = step(tokens)
        mx.eval(loss, state)
        if mode != "none" and i % args.every == 0:
            writer.save(model, opt, {"step": i})
    writer.wait()
    total = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return writer.stalls, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-checkpoint loop")
    add_smoke(parser)
    args = parser.parse_args()
    args.preset = "transformer_small"
    if args.smoke:  # the nano preset, 2 steps, a save every step, one round
        args.preset, args.vocab, args.steps, args.every, args.rounds = "transformer_nano", 256, 2, 1, 1
    modes = ("sync", "async") if args.no_baseline else ("none", "sync", "async")
    root = Path(tempfile.mkdtemp(prefix="bench_async_ckpt_"))
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    totals: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    try:
        for r in range(args.rounds):
            for mode in modes:
                s, total = run(mode, args, root)
                if mode in stalls:
                    stalls[mode] += s
                totals[mode].append(total)
                print(f"round {r + 1} {mode}: loop {total:.2f} s, stalls (ms) "
                      f"{[round(x * 1e3) for x in s]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    saves = args.steps // args.every
    print(f"\n{args.preset} (vocab {args.vocab}), batch {args.batch}x{args.seq}, "
          f"{args.steps} steps, a save every {args.every} ({saves} saves), {args.rounds} rounds\n")
    print("| mode | step stall per save, median (ms) | max (ms) | loop wall time, median (s) |")
    print("|---|---:|---:|---:|")
    if totals["none"]:
        print(f"| no checkpoints | - | - | {statistics.median(totals['none']):.2f} |")
    for mode in ("sync", "async"):
        print(f"| {mode} | {statistics.median(stalls[mode]) * 1e3:.0f} | "
              f"{max(stalls[mode]) * 1e3:.0f} | {statistics.median(totals[mode]):.2f} |")


if __name__ == "__main__":
    main()
