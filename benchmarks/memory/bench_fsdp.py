"""mlxlab's ZeRO-1 (runtime/distributed.py OptimizerShards) against MLX's own `nn.fully_shard`
(FSDP-style: parameters, gradients and optimizer state sharded along axis 0) on 2 ranks.

    python benchmarks/memory/bench_fsdp.py [--steps 12] [--dim 512 --layers 6 --vocab 4096]

Runs mlxlab's decoder (models/transformer.py) for the same steps on the same batches in four
ways: one process with the global batch (the reference), and under `mlx.launch -n 2` (ring on
127.0.0.1) plain data parallelism, ZeRO-1 and `nn.fully_shard` on every block, the embedding,
the final norm and the head. Per rank: MLX peak memory over the steps after the first two,
median step time, parameter and optimizer-state MB held; the final weights against the
reference (relative difference); and a resume in the same process: the state at step S/2
(parameters, or this rank's shards of them, and optimizer state) put back after step S and the
second half run again, bitwise equal or not. One loop for all, uncompiled (nn.fully_shard's
gather is an mx.custom_function with collectives), AdamW, fp32, the CPU.
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
from benchmarks.common import add_smoke  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = ("dp", "zero1", "fsdp")


def build(args):
    import mlx.core as mx

    from mlxlab.models.transformer import Transformer

    mx.random.seed(0)
    model = Transformer(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers,
                        num_heads=8, max_seq_len=args.seq)
    mx.eval(model.parameters())
    return model


def batches(args, rows: int, rank: int, size: int):
    """The global batches of every step; this rank's contiguous rows of each."""
    import numpy as np

    rng = np.random.default_rng(1)
    out = []
    for _ in range(args.steps):
        ids = rng.integers(0, args.vocab, size=(rows * size, args.seq + 1), dtype=np.int32)
        lo, hi = rows * rank, rows * (rank + 1)
        out.append(ids[lo:hi])
    return out


def worker(args) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    import mlxlab  # noqa: F401  (fast BLAS before mlx.core)
    from mlxlab.objectives import losses
    from mlxlab.runtime import distributed

    mode = args.worker
    world = distributed.world("auto")
    rank, size = world.rank, world.size
    model = build(args)
    if mode == "fsdp":
        model.layers = [nn.fully_shard(layer) for layer in model.layers]
        model.embed_tokens = nn.fully_shard(model.embed_tokens)
        model.norm = nn.fully_shard(model.norm)
        if "lm_head" in model:
            model.lm_head = nn.fully_shard(model.lm_head)
    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    shards = None
    if mode == "zero1":
        shards = distributed.OptimizerShards(world, model.trainable_parameters())
        shards.adopt(optimizer, None, model.trainable_parameters())
    else:
        optimizer.init(model.trainable_parameters())
    loss_fn = losses.task_loss("lm")
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    steps = batches(args, args.batch, rank, size)

    def step(ids):
        x = mx.array(ids)
        batch = {"input_ids": x[:, :-1], "labels": x[:, 1:],
                 "loss_mask": mx.ones(x[:, 1:].shape, mx.float32)}
        (loss, _), grads = loss_and_grad(model, batch)
        if mode == "dp":
            grads = tree_map(lambda g: g / size, world.all_sum_tree(grads))
            optimizer.update(model, grads)
        elif mode == "zero1":
            grads = tree_map(lambda g: g / size, world.all_sum_tree(grads))
            shards.update(model, optimizer, grads)
        else:  # fully_shard: the gradients arrive reduce-scattered (mean over ranks), sharded
            optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)
        return loss

    def snapshot():
        copy = lambda t: tree_map(lambda a: mx.array(np.array(a)) if isinstance(a, mx.array) else a, t)  # noqa: E731
        return copy(model.parameters()), copy(optimizer.state)

    half, times, peak = args.steps // 2, [], 0.0
    saved = None
    for k, ids in enumerate(steps):
        if k == 2:
            mx.reset_peak_memory()
        if k == half:
            saved = snapshot()
        started = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - started)
    peak = mx.get_peak_memory() / 2**20
    first = dict(tree_flatten(model.parameters()))
    model.update(saved[0])
    optimizer.state = saved[1]
    for ids in steps[half:]:
        step(ids)
    again = dict(tree_flatten(model.parameters()))
    resume_bitwise = all(np.array_equal(np.array(first[k]), np.array(again[k])) for k in first)
    # the full weights: fully_shard's shards gathered (rank order along axis 0)
    full = {}
    for key, value in first.items():
        if mode == "fsdp":
            value = mx.distributed.all_gather(value, group=world.group)
        full[key.replace(".module", "")] = np.array(value)
    reference = dict(np.load(args.reference))
    gap = max(float(np.linalg.norm(full[k].astype(np.float64) - reference[k]) /
                    max(np.linalg.norm(reference[k].astype(np.float64)), 1e-30)) for k in reference)
    nbytes = lambda t: sum(v.nbytes for _, v in tree_flatten(t) if isinstance(v, mx.array)) / 2**20  # noqa: E731
    print("RESULT " + json.dumps({
        "mode": mode, "rank": rank, "ms": 1e3 * statistics.median(times[2:]), "peak_mb": peak,
        "param_mb": nbytes(model.parameters()), "optimizer_mb": nbytes(optimizer.state),
        "gap_vs_one_process": gap, "resume_bitwise": resume_bitwise}), flush=True)


def reference(args, out: Path) -> None:
    """One process, the global batch (2 x batch rows), same steps: the weights to compare to."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    import mlxlab  # noqa: F401
    from mlxlab.objectives import losses

    model = build(args)
    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, losses.task_loss("lm"))
    for ids in batches(args, 2 * args.batch, 0, 1):
        x = mx.array(ids)
        batch = {"input_ids": x[:, :-1], "labels": x[:, 1:],
                 "loss_mask": mx.ones(x[:, 1:].shape, mx.float32)}
        _, grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    np.savez(out, **{k: np.array(v) for k, v in tree_flatten(model.parameters())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--make-reference", help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # a 1-layer decoder, 2 steps, every mode on its 2 ranks
        args.steps, args.dim, args.layers, args.vocab, args.seq, args.batch = 2, 64, 1, 128, 16, 2
    if args.make_reference:
        reference(args, Path(args.make_reference))
        return
    if args.worker:
        worker(args)
        return
    sizes = [f"--steps={args.steps}", f"--dim={args.dim}", f"--layers={args.layers}",
             f"--vocab={args.vocab}", f"--seq={args.seq}", f"--batch={args.batch}"]
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference.npz"
        subprocess.run([sys.executable, __file__, *sizes, "--make-reference", str(ref)],
                       check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
        launcher = Path(sys.executable).parent / "mlx.launch"
        print(f"{args.layers} layers, dim {args.dim}, vocab {args.vocab}, seq {args.seq}, "
              f"{args.batch} rows per rank, {args.steps} steps, 2 ranks (ring, 1 BLAS thread each)")
        print("| mode | rank | ms/step (median) | MLX peak MB | params MB | optimizer MB | "
              "weights vs 1 process (rel.) | resume bitwise |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for mode in args.modes.split(","):
            out = subprocess.run(
                [str(launcher), "-n", "2", "--", sys.executable, __file__, *sizes, "--worker", mode,
                 "--reference", str(ref)],
                capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
            rows = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines()
                    if "RESULT " in line]
            if len(rows) != 2:  # e.g. MLX 0.32.4's ring backend: "[ring] sum_scatter not supported."
                errors = [line for line in (out.stdout + out.stderr).splitlines()
                          if "Error" in line] or ["no result"]
                print(f"| {mode} | - | failed: `{errors[-1].strip()}` | | | | | |")
                continue
            for r in sorted(rows, key=lambda r: r["rank"]):
                print(f"| {mode} | {r['rank']} | {r['ms']:.0f} | {r['peak_mb']:.0f} | "
                      f"{r['param_mb']:.1f} | {r['optimizer_mb']:.1f} | "
                      f"{r['gap_vs_one_process']:.1e} | {r['resume_bitwise']} |")


if __name__ == "__main__":
    main()
