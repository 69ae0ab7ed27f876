"""Time alternative formulations of the hot ops of a small transformer training step on this CPU.

Not a test: prints a table (best and median ms over repeats) so we pick the fastest formulation.

    python benchmarks/speed/bench_kernels.py [--repeats 10] [--threads N] [--torch] [--only ce,attn,...]

Sections: gemm, ce (loss), attn, norm, act, step (mx.compile and bf16 vs fp32), fused (mlxlab's
fused CPU kernels vs the pure-MLX ops vs PyTorch, interleaved in one process: issue 12). With
--torch and PyTorch installed (the `bench` extra), the same ops in PyTorch CPU eager for comparison.

    python benchmarks/speed/bench_kernels.py --only fused --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import importlib.util
import math
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

REPEATS = 10
COMPILE = False  # --compile: the fused section's per-op rows under mx.compile
ROWS: list[dict] = []  # every row printed, for the run's record


def bench(fn, *args, repeats: int | None = None) -> tuple[float, float]:
    """(best, median) ms of fn(*args) including evaluation, after two warm-up calls."""
    repeats = repeats or REPEATS
    for _ in range(2):
        mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


def row(section: str, name: str, timing: tuple[float, float], note: str = "") -> None:
    ROWS.append({"part": section, "formulation": name, "best_ms": timing[0],
                 "median_ms": timing[1], "note": note})
    print(f"{section:<6} {name:<44} {timing[0]:>9.2f} {timing[1]:>9.2f}  {note}")


def fwd_bwd(loss_of_inputs, argnums):
    """A function returning the loss and its gradients w.r.t. the given inputs."""
    return mx.value_and_grad(loss_of_inputs, argnums=argnums)


def variants(section: str, fns: dict, args: tuple, argnums) -> None:
    """Each fn: forward; then forward+backward; then both compiled."""
    for name, fn in fns.items():
        grad_fn = fwd_bwd(fn, argnums)
        row(section, f"{name} fwd", bench(fn, *args))
        row(section, f"{name} fwd+bwd", bench(grad_fn, *args))
        row(section, f"{name} fwd+bwd compiled", bench(mx.compile(grad_fn), *args))


# ---- GEMM -----------------------------------------------------------------------------------


def gemm_section() -> None:
    for m, k, n in [(1024, 1024, 1024), (1024, 256, 1024), (1024, 256, 4096)]:
        gflop = 2 * m * k * n / 1e9
        a32, b32 = mx.random.normal((m, k)), mx.random.normal((k, n))
        t = bench(lambda a, b: a @ b, a32, b32)
        row("gemm", f"mlx fp32 {m}x{k}x{n}", t, f"{gflop / t[0] * 1e3:.0f} GFLOP/s")
        a16, b16 = a32.astype(mx.bfloat16), b32.astype(mx.bfloat16)
        t = bench(lambda a, b: a @ b, a16, b16, repeats=2)
        row("gemm", f"mlx bf16 {m}x{k}x{n}", t, f"{gflop / t[0] * 1e3:.0f} GFLOP/s")
        an, bn = np.array(a32), np.array(b32)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            an @ bn
            times.append((time.perf_counter() - start) * 1e3)
        t = (min(times), statistics.median(times))
        row("gemm", f"numpy fp32 {m}x{k}x{n}", t, f"{gflop / t[0] * 1e3:.0f} GFLOP/s")


# ---- cross-entropy over (8, 128, 4096) logits ---------------------------------------------------


def ce_nn(logits, targets):
    return nn.losses.cross_entropy(logits, targets, reduction="mean")


def ce_logsumexp_gather(logits, targets):
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return (mx.logsumexp(logits, axis=-1) - picked).mean()


def ce_log_softmax_take(logits, targets):
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -mx.take_along_axis(logp, targets[..., None], axis=-1).mean()


def ce_max_shift_manual(logits, targets):
    # Explicit max-shift + exp/sum/log: the pieces logsumexp fuses, for comparison.
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = mx.log(mx.exp(logits - m).sum(axis=-1)) + m.squeeze(-1)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return (lse - picked).mean()


def ce_section() -> None:
    logits = mx.random.normal((8, 128, 4096))
    targets = mx.random.randint(0, 4096, (8, 128)).astype(mx.int32)
    fns = {
        "nn.losses.cross_entropy": ce_nn,
        "logsumexp - take_along_axis": ce_logsumexp_gather,
        "log_softmax + take_along_axis": ce_log_softmax_take,
        "max-shift exp/sum/log - take": ce_max_shift_manual,
    }
    ref = ce_nn(logits, targets).item()
    for name, fn in fns.items():
        assert math.isclose(fn(logits, targets).item(), ref, rel_tol=1e-5), name
    variants("ce", fns, (logits, targets), argnums=0)
    # The cost of reading 16 MB of logits at all: one reduction and one exp pass.
    row("ce", "(floor) logits.max(-1)", bench(lambda x: x.max(axis=-1), logits))
    row("ce", "(floor) mx.exp(logits)", bench(mx.exp, logits))
    row("ce", "(floor) mx.logsumexp(logits, -1)", bench(lambda x: mx.logsumexp(x, -1), logits))
    row("ce", "(floor) mx.softmax(logits, -1)", bench(lambda x: mx.softmax(x, -1), logits))


# ---- attention (B=8, H=4, T=128, D=32), causal ---------------------------------------------------


def attn_section() -> None:
    b, h, t, d = 8, 4, 128, 32
    q, k, v = (mx.random.normal((b, h, t, d)) for _ in range(3))
    scale = d**-0.5
    additive = mx.triu(mx.full((t, t), -mx.inf), k=1)
    boolean = mx.tril(mx.ones((t, t), dtype=mx.bool_))

    def sdpa_causal(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal").sum()

    def sdpa_additive(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=additive).sum()

    def sdpa_bool(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=boolean).sum()

    def manual(q, k, v):
        scores = (q * scale) @ k.swapaxes(-1, -2) + additive
        return (mx.softmax(scores, axis=-1) @ v).sum()

    def manual_precise(q, k, v):
        scores = (q * scale) @ k.swapaxes(-1, -2) + additive
        return (mx.softmax(scores, axis=-1, precise=True) @ v).sum()

    fns = {
        'sdpa mask="causal"': sdpa_causal,
        "sdpa additive mask array": sdpa_additive,
        "sdpa boolean mask array": sdpa_bool,
        "manual matmul-softmax-matmul": manual,
        "manual, softmax(precise=True)": manual_precise,
    }
    ref = sdpa_causal(q, k, v).item()
    for name, fn in fns.items():
        assert math.isclose(fn(q, k, v).item(), ref, rel_tol=1e-3, abs_tol=1e-2), name
    variants("attn", fns, (q, k, v), argnums=(0, 1, 2))


# ---- norms on (8, 128, 256) ----------------------------------------------------------------------


def norm_section() -> None:
    x = mx.random.normal((8, 128, 256))
    w, bias = mx.ones((256,)), mx.zeros((256,))
    rms, ln = nn.RMSNorm(256), nn.LayerNorm(256)

    def rms_manual(x, w):
        return (x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w).sum()

    def ln_manual(x, w):
        mu = x.mean(axis=-1, keepdims=True)
        var = mx.var(x, axis=-1, keepdims=True)
        return ((x - mu) * mx.rsqrt(var + 1e-5) * w + bias).sum()

    fns = {
        "mx.fast.rms_norm": lambda x, w: mx.fast.rms_norm(x, w, 1e-5).sum(),
        "nn.RMSNorm": lambda x, w: rms(x).sum(),
        "rms manual": rms_manual,
        "mx.fast.layer_norm": lambda x, w: mx.fast.layer_norm(x, w, bias, 1e-5).sum(),
        "nn.LayerNorm": lambda x, w: ln(x).sum(),
        "layer norm manual": ln_manual,
    }
    variants("norm", fns, (x, w), argnums=(0, 1))


# ---- activations on (8, 128, 1024) ---------------------------------------------------------------


def act_section() -> None:
    x = mx.random.normal((8, 128, 1024))
    fns = {
        "nn.gelu (erf)": lambda x: nn.gelu(x).sum(),
        "nn.gelu_approx (tanh)": lambda x: nn.gelu_approx(x).sum(),
        "nn.gelu_fast_approx (sigmoid)": lambda x: nn.gelu_fast_approx(x).sum(),
        "nn.silu": lambda x: nn.silu(x).sum(),
        "nn.relu": lambda x: nn.relu(x).sum(),
    }
    variants("act", fns, (x,), argnums=0)


# ---- a whole training step -------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(3, axis=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(0, 2, 1, 3) for z in (q, k, v))
        scale = (d // self.heads) ** -0.5
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        x = x + self.out(a.transpose(0, 2, 1, 3).reshape(b, t, d))
        return x + self.down(nn.gelu_approx(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 4096, dim: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = [Block(dim, heads) for _ in range(layers)]
        self.norm = nn.RMSNorm(dim)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.as_linear(self.norm(x))


def step_section() -> None:
    import mlx.optimizers as optim

    ids = mx.random.randint(0, 4096, (8, 129)).astype(mx.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    for dtype in (mx.float32, mx.bfloat16):
        for compiled in (False, True):
            model, opt = TinyLM(), optim.AdamW(1e-3)
            model.set_dtype(dtype)

            def loss_fn(model, x, y):
                return ce_logsumexp_gather(model(x).astype(mx.float32), y)

            loss_and_grad = nn.value_and_grad(model, loss_fn)

            def step(x, y, model=model, opt=opt, loss_and_grad=loss_and_grad):
                loss, grads = loss_and_grad(model, x, y)
                opt.update(model, grads)
                return loss

            if compiled:
                state = [model.state, opt.state]
                step = mx.compile(step, inputs=state, outputs=state)
            t = bench(
                lambda x, y, s=step, m=model, o=opt: [s(x, y), m.state, o.state],
                inputs,
                targets,
                repeats=max(3, REPEATS // 2) if dtype == mx.float32 else 2,
            )
            name = f"TinyLM d256 L4 V4096 B8 T128 {'bf16' if dtype == mx.bfloat16 else 'fp32'}"
            tokens = inputs.size / t[0] * 1e3
            row("step", f"{name}{' compiled' if compiled else ''}", t, f"{tokens:.0f} tok/s")


# ---- PyTorch CPU eager, same shapes ----------------------------------------------------------------


def torch_section() -> None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch    not installed (pip install -e '.[bench]')")
        return

    def tbench(fn, *args):
        for _ in range(2):
            fn(*args)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - start) * 1e3)
        return min(times), statistics.median(times)

    def fb(fn, *args):
        args = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
        fn(*args).backward()

    tag = f"torch {torch.__version__} threads={torch.get_num_threads()}"
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = tbench(torch.matmul, a, b)
    row("torch", "fp32 1024x1024x1024 matmul", t, f"{2.147 / t[0] * 1e3:.0f} GFLOP/s; {tag}")
    logits, targets = torch.randn(8 * 128, 4096), torch.randint(0, 4096, (8 * 128,))
    row("torch", "F.cross_entropy fwd", tbench(F.cross_entropy, logits, targets))
    row("torch", "F.cross_entropy fwd+bwd", tbench(fb, F.cross_entropy, logits, targets))
    q, k, v = (torch.randn(8, 4, 128, 32) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    row("torch", "F.sdpa is_causal fwd", tbench(sdpa, q, k, v))
    row("torch", "F.sdpa is_causal fwd+bwd", tbench(fb, sdpa, q, k, v))
    x = torch.randn(8, 128, 256)
    row("torch", "F.rms_norm fwd+bwd", tbench(fb, lambda x: F.rms_norm(x, (256,)).sum(), x))
    row("torch", "F.layer_norm fwd+bwd", tbench(fb, lambda x: F.layer_norm(x, (256,)).sum(), x))
    x = torch.randn(8, 128, 1024)
    row(
        "torch", "F.gelu tanh fwd+bwd", tbench(fb, lambda x: F.gelu(x, approximate="tanh").sum(), x)
    )


# ---- fused CPU kernels (mlxlab.kernels) vs pure MLX vs PyTorch, interleaved --------------------


def fused_section() -> None:
    """Each op forward+backward three ways, timed round-robin in one process (the order rotates
    every round) so a busy machine slows all alike; ratios are medians of per-round ratios."""
    from mlxlab import kernels

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    print(f"fused  mlxlab.kernels: {kernels.status()}, kernel threads {kernels.threads()}")
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
            row("fused", f"{case} {name}", (min(times[name]), statistics.median(times[name])), note)


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


SECTIONS = {
    "gemm": gemm_section,
    "ce": ce_section,
    "attn": attn_section,
    "norm": norm_section,
    "act": act_section,
    "step": step_section,
    "fused": fused_section,
    "torch": torch_section,
}


def main() -> None:
    global REPEATS, COMPILE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=None, help="OpenBLAS threads")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch CPU eager")
    parser.add_argument("--compile", action="store_true",
                        help="fused section: mx.compile the per-op MLX functions (PyTorch stays eager)")
    parser.add_argument("--only", default=",".join(k for k in SECTIONS if k != "torch"))
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:  # every section once, PyTorch's too when it is installed
        args.repeats, args.torch = 1, importlib.util.find_spec("torch") is not None
    REPEATS, COMPILE = args.repeats, args.compile
    if args.threads:
        set_blas_threads(args.threads)
        from mlxlab import kernels

        kernels.set_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    print(
        f"mlx {mx.__version__}, BLAS: {mlxlab.blas.detail or mlxlab.blas.status}, "
        f"BLAS threads {blas_threads()}"
    )
    print(f"{'part':<6} {'formulation':<44} {'best ms':>9} {'median':>9}")
    only = args.only.split(",") + (["torch"] if args.torch else [])
    for name in only:
        SECTIONS[name]()
    write_record("kernels", {"rows": ROWS, "repeats": REPEATS, "compile": COMPILE},
                 question="speed-pytorch", smoke=args.smoke)


if __name__ == "__main__":
    main()
