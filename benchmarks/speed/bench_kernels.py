"""How much do mlxlab's fused CPU kernels save, against MLX's own ops and PyTorch eager, on this CPU?

Cross-entropy, SwiGLU and causal attention forward + backward at the nano preset's shapes, and a
whole compiled nano training step with the kernels on and off, each timed round-robin in one
process (the order rotates every round, so a busy machine slows all alike); a ratio is the median
of per-round ratios. PyTorch's rows need the `bench` extra.

    python benchmarks/speed/bench_kernels.py [--repeats 20] [--threads 2] [--compile] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# isort: off
import mlxlab  # first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx
import mlx.nn as nn

# isort: on
import numpy as np

from mlxlab.runtime.blas import blas_threads, set_blas_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, write_record  # noqa: E402

REPEATS = 20
COMPILE = False  # --compile: the per-op MLX functions under mx.compile
ROWS: list[dict] = []  # every row printed, for the run's record


def row(name: str, timing: tuple[float, float], note: str = "") -> None:
    ROWS.append({"case": name, "best_ms": timing[0], "median_ms": timing[1], "note": note})
    print(f"{name:<60} {timing[0]:>9.2f} {timing[1]:>9.2f}  {note}")


def fused_section() -> None:
    """Each op forward+backward three ways, timed round-robin in one process (the order rotates
    every round) so a busy machine slows all alike; ratios are medians of per-round ratios."""
    from mlxlab import kernels

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    print(f"mlxlab.kernels: {kernels.status()}, kernel threads {kernels.threads()}")
    n, vocab, hidden = 16 * 128, 4096, 704  # nano: batch 16 x 128 tokens, SwiGLU width 704
    logits = mx.random.normal((n, vocab))
    targets = mx.random.randint(0, vocab, (n,)).astype(mx.int32)
    weights = mx.ones((n,)) / n
    gate, up, cot = (mx.random.normal((n, hidden)) for _ in range(3))
    mx.eval(logits, targets, weights, gate, up, cot)

    def ce_grad(fn):
        grad = mx.value_and_grad(lambda x: (fn(x, targets) * weights).sum())
        grad = mx.compile(grad) if COMPILE else grad
        return lambda: mx.eval(grad(logits))

    def swiglu_grad(fn):
        grad = mx.value_and_grad(lambda g, u: (fn(g, u) * cot).sum(), argnums=(0, 1))
        grad = mx.compile(grad) if COMPILE else grad
        return lambda: mx.eval(grad(gate, up))

    cases = {
        f"cross-entropy fwd+bwd ({n}x{vocab})": {
            "fused": ce_grad(kernels.cross_entropy), "mlx": ce_grad(kernels.mlx_cross_entropy),
        },
        f"SwiGLU fwd+bwd ({n}x{hidden})": {
            "fused": swiglu_grad(kernels.swiglu), "mlx": swiglu_grad(lambda g, u: nn.silu(g) * u),
        },
    }
    q, k, v = (mx.random.normal((16, 4, 128, 64)) for _ in range(3))  # nano's heads
    causal = mx.where(mx.tril(mx.ones((128, 128))) > 0, 0.0, -mx.inf)
    mx.eval(q, k, v, causal)

    def attn_grad(fn):
        grad = mx.value_and_grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))
        grad = mx.compile(grad) if COMPILE else grad
        return lambda: mx.eval(grad(q, k, v))

    cases["causal attention fwd+bwd (16x4x128x64)"] = {
        "fused": attn_grad(lambda q, k, v: kernels.attention(q, k, v, 0.125, causal)),
        "mlx": attn_grad(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=causal)
        ),
    }
    if torch is not None:
        tq, tk, tv = (torch.tensor(np.array(a)) for a in (q, k, v))

        def torch_attn():
            a, b, c = (t.detach().requires_grad_() for t in (tq, tk, tv))
            F.scaled_dot_product_attention(a, b, c, is_causal=True).sum().backward()

        cases["causal attention fwd+bwd (16x4x128x64)"]["torch"] = torch_attn
        tl, tt = torch.tensor(np.array(logits)), torch.tensor(np.array(targets)).long()
        tg, tu, tc = (torch.tensor(np.array(a)) for a in (gate, up, cot))

        def torch_ce():
            x = tl.detach().requires_grad_()
            F.cross_entropy(x, tt).backward()

        def torch_swiglu():
            g, u = tg.detach().requires_grad_(), tu.detach().requires_grad_()
            (F.silu(g) * u * tc).sum().backward()

        first, second, _ = cases.values()
        first["torch"], second["torch"] = torch_ce, torch_swiglu
    cases["nano training step (16x128 tokens, vocab 3776)"] = nano_steps(kernels)
    for case, fns in cases.items():
        names = list(fns)
        times = {name: [] for name in names}
        for fn in fns.values():
            fn(), fn()  # warm-up
        for r in range(REPEATS):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
        for name in names:
            note = ""
            if name != "fused":
                ratio = statistics.median(a / b for a, b in zip(times[name], times["fused"]))
                note = f"{ratio:.2f}x the fused kernel's time (median of per-round ratios)"
            row(f"{case} {name}", (min(times[name]), statistics.median(times[name])), note)


def nano_steps(kernels) -> dict:
    """One compiled AdamW step of the nano decoder (bench.py's `nano`) with the kernels on and
    one with them off: the mode is read when mx.compile traces, so each step is traced under its
    own mode and then both run interleaved."""
    import mlx.optimizers as optim

    from mlxlab.models.transformer import Transformer
    from mlxlab.objectives.losses import task_loss

    ids = mx.random.randint(0, 3776, (16, 129))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((16, 128))}
    steps = {}
    for name, mode in (("fused", "on"), ("mlx", "off")):
        mx.random.seed(0)
        model = Transformer(vocab_size=3776, dim=256, num_layers=4, num_heads=4, max_seq_len=128)
        opt = optim.AdamW(learning_rate=1e-3)
        loss_and_grad = nn.value_and_grad(model, task_loss("lm"))
        state = [model.state, opt.state]

        def step(model=model, opt=opt, loss_and_grad=loss_and_grad):
            (loss, _), grads = loss_and_grad(model, batch)
            opt.update(model, grads)
            return loss

        compiled = mx.compile(step, inputs=state, outputs=state)
        kernels.set_mode(mode)
        mx.eval(compiled(), state)  # traced (and compiled) under this mode
        steps[name] = lambda compiled=compiled, state=state: mx.eval(compiled(), state)
    kernels.set_mode("auto")
    return steps


def main() -> None:
    global REPEATS, COMPILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=None, help="OpenBLAS and kernel threads")
    parser.add_argument("--compile", action="store_true",
                        help="mx.compile the per-op MLX functions (PyTorch stays eager)")
    add_smoke(parser)
    args = parser.parse_args()
    REPEATS, COMPILE = (1 if args.smoke else args.repeats), args.compile
    if args.threads:
        from mlxlab import kernels

        set_blas_threads(args.threads)
        kernels.set_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    print(f"mlx {mx.__version__}, BLAS: {mlxlab.blas.detail or mlxlab.blas.status}, "
          f"BLAS threads {blas_threads()}")
    print(f"{'case':<60} {'best ms':>9} {'median':>9}")
    fused_section()
    write_record("kernels", {"rows": ROWS, "repeats": REPEATS, "compile": COMPILE},
                 question="speed-pytorch", smoke=args.smoke)


if __name__ == "__main__":
    main()
