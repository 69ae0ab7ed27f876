"""Time one compiled AdamW step of the nano decoder (bench.py's `nano`: batch 16 x 128, vocabulary
3,776) with mlxlab's fused CPU kernels on or off, at 1 thread; run it under `perf` to see where
the CPU time goes (issue 12, docs/benchmarks.md):

    perf record -F 499 -o perf-on.data python benchmarks/profile_step.py on
    perf report -i perf-on.data --sort dso --stdio
"""

from __future__ import annotations

import argparse
import time

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

# isort: on
from mlxlab import kernels
from mlxlab.models.transformer import Transformer
from mlxlab.runtime.blas import set_blas_threads
from mlxlab.training.losses import task_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["on", "off"], help="fused kernels")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS and kernel threads")
    args = parser.parse_args()
    set_blas_threads(args.threads)
    kernels.set_mode(args.mode)
    if args.mode == "on":
        kernels._load().set_num_threads(args.threads)
    ids = mx.random.randint(0, 3776, (16, 129))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((16, 128))}
    model = Transformer(vocab_size=3776, dim=256, num_layers=4, num_heads=4, max_seq_len=128)
    opt = optim.AdamW(learning_rate=1e-3)
    loss_and_grad = nn.value_and_grad(model, task_loss("lm"))
    state = [model.state, opt.state]

    def step():
        (loss, _), grads = loss_and_grad(model, batch)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    for _ in range(2):  # compile + warm-up
        mx.eval(step(), state)
    start = time.perf_counter()
    for _ in range(args.steps):
        mx.eval(step(), state)
    print(f"kernels {args.mode}: {(time.perf_counter() - start) / args.steps:.3f} s/step")


if __name__ == "__main__":
    main()
