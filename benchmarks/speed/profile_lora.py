"""Where a long-row LoRA step's time goes (issue 49): the trainer's compiled step on
bench_lora.py's random Llama (hidden 512, 8 layers, 4/2 heads, LoRA rank 8 on q/k/v/o, batch 4 x
512 positions), beside its parts timed alone at the step's shapes, and the fp32 GEMM rate.

    python benchmarks/speed/profile_lora.py [--rounds 5] [--work DIR]

Denormals are flushed as the trainer does (trainer.flush_denormals, kernels/denormals.py); the
step and the forward + backward are also timed without the flush, each call switching it.

Parts (each compiled, forward + backward to its inputs as the step needs it, times 8 layers
where per layer): the frozen projections (x @ W^T forward, dX = dY @ W backward: no weight
gradient), the LoRA adapters (forward, dX, dA, dB), the attention core (scores, masked softmax,
values), RoPE, RMSNorm, SwiGLU, the head + cross-entropy, AdamW over the adapters. FLOPs are
counted per part (2mnk a product) and the GEMM rate is measured at the projections' shapes.
Each round times every entry once, in turn; the table gives medians of wall and CPU seconds
(the machine is shared: CPU seconds move less with the load).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: the fast BLAS
import mlx.core as mx
import mlx.nn as nn

# isort: on
from mlxlab import kernels
from mlxlab.models.layers import causal_additive_mask
from mlxlab.models.transformer import Transformer
from mlxlab.objectives import losses
from mlxlab.training.optim import build_optimizer, default_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402
from benchmarks.speed.bench_lora import BATCH, RANK, SEQ, prepare  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), cpu_s()
    fn()
    return time.perf_counter() - w, cpu_s() - c


def grad_fn(f, argnums, *args):
    """A call of f's forward and its backward to `argnums` on `args`, under a dense random
    cotangent (the gradient of a plain .sum() is a broadcast array, which MLX's products copy
    slowly: not the step's case), evaluated beforehand so that it is an input, not traced."""
    cot = mx.random.normal(f(*args).shape)
    mx.eval(cot, *args)
    g = mx.compile(mx.value_and_grad(lambda *a: (f(*a) * cot).sum(), argnums=argnums))
    return lambda: mx.eval(g(*args))


def unflushed(fn):
    """fn with the flush off for its call (the mode is the MLX CPU thread's: one call each way)."""

    def call():
        kernels.flush_denormals(False)
        try:
            fn()
        finally:
            kernels.flush_denormals(True)

    return call


def parts(m: Transformer) -> dict[str, tuple[object, float, int]]:  # noqa: PLR0914
    """name -> (callable, GFLOP, times per step)."""
    B, T, dim = BATCH, SEQ, m.layers[0].attention.query.linear.weight.shape[1]
    att = m.layers[0].attention
    H, Hkv, D = att.num_heads, att.num_kv_heads, att.head_dim
    hidden = m.layers[0].mlp.up.weight.shape[0]
    V, L, N = m.vocab_size, len(m.layers), B * T
    x = mx.random.normal((B, T, dim))
    out_dims = [H * D, Hkv * D, Hkv * D, dim]
    ws = [mx.random.normal((o, dim)) * 0.02 for o in out_dims]  # frozen: not differentiated
    mlp_w = [
        mx.random.normal((hidden, dim)) * 0.02,
        mx.random.normal((hidden, dim)) * 0.02,
        mx.random.normal((dim, hidden)) * 0.02,
    ]
    lora = [
        (mx.random.normal((dim, RANK)) * 0.02, mx.random.normal((RANK, o)) * 0.02) for o in out_dims
    ]
    q, k, v = (mx.random.normal((B, h, T, D)) for h in (H, Hkv, Hkv))
    mask = causal_additive_mask(T, T)
    h1 = mx.random.normal((B, T, hidden))
    xr = mx.random.normal((B, T, H, D))
    labels = mx.random.randint(0, V, (B, T))
    head = mx.random.normal((V, dim)) * 0.02
    mx.eval(ws, mlp_w, lora, mask, labels, head)  # inputs, not traced into the compiled graphs

    def proj(x):  # attention projections (frozen bases), x in: dX only
        return mx.concatenate([x @ w.T for w in ws], axis=-1)

    def mlp(x):  # frozen weights: dX only
        return kernels.swiglu(x @ mlp_w[0].T, x @ mlp_w[1].T) @ mlp_w[2].T

    def adapters(x, *ab):
        return mx.concatenate([(x @ a) @ b for a, b in zip(ab[::2], ab[1::2])], axis=-1)

    def attention(q, k, v):  # as layers.Attention calls it
        return kernels.attention(q, k, v, att.scale, mask)

    def ce(x):
        return losses.token_cross_entropy(x @ head.T, labels)

    flat_ab = [t for pair in lora for t in pair]
    proj_flops = 2 * N * dim * sum(out_dims) * 2 / 1e9  # forward + dX
    mlp_flops = 2 * N * dim * hidden * 3 * 2 / 1e9
    lora_flops = 2 * N * RANK * sum(dim + o for o in out_dims) * 3 / 1e9  # fwd, dX, dA/dB
    att_flops = 2 * B * H * T * T * D * 2 * 3 / 1e9  # QK^T and PV, forward + 2x backward
    return {
        "projections q/k/v/o (frozen: fwd + dX)": (grad_fn(proj, 0, x), proj_flops, L),
        "MLP gate/up/down + SwiGLU (frozen: fwd + dX)": (grad_fn(mlp, 0, x), mlp_flops, L),
        "LoRA adapters (fwd, dX, dA, dB)": (
            grad_fn(adapters, list(range(9)), x, *flat_ab),
            lora_flops,
            L,
        ),
        "attention core (QK^T, softmax, PV)": (
            grad_fn(attention, (0, 1, 2), q, k, v),
            att_flops,
            L,
        ),
        "RoPE q + k": (grad_fn(lambda a: att.heads(a, 0), 0, xr), 0.0, 2 * L),
        "RMSNorm": (grad_fn(lambda a: m.layers[0].attention_norm(a), 0, x), 0.0, 2 * L + 1),
        "SwiGLU alone": (grad_fn(kernels.swiglu, (0, 1), h1, h1), 0.0, L),
        "head + cross-entropy": (grad_fn(ce, 0, x), 2 * N * dim * V * 2 / 1e9, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default=None)
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        args.rounds = 1
    work = Path(args.work or tempfile.mkdtemp(prefix="profile_lora_"))
    folder, _ = prepare(work)
    kernels.set_mode("auto")
    mx.random.seed(0)
    # mlxlab's own Transformer at the folder's shape (its layers are what `parts` times; the
    # pretrained path now runs mlx-lm's llama: benchmarks/speed/bench_lora_step.py times that step)
    c = json.loads((folder / "config.json").read_text())
    model = Transformer(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
        mlp_dim=c["intermediate_size"], max_seq_len=SEQ + 1, norm_eps=c["rms_norm_eps"],
        tie_embeddings=False,
        lora={"rank": RANK, "alpha": 16.0, "targets": ["query", "key", "value", "out"]},
    )
    settings = TrainerSettings(max_steps=100)
    opt = build_optimizer(partial(default_optimizer(), learning_rate=2e-4), settings.schedule, 100)
    opt.init(model.trainable_parameters())
    loss_fn = losses.task_loss("lm")
    step = make_step(model, opt, loss_fn, settings)
    ids = mx.random.randint(0, model.vocab_size, (BATCH, SEQ + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mx.ones((BATCH, SEQ))}
    mx.eval(batch, model.parameters())
    fwd = mx.compile(lambda b: loss_fn(model, b)[0])
    lg = nn.value_and_grad(model, loss_fn)
    vg = mx.compile(lambda b: lg(model, b))
    kernels.flush_denormals(True)  # as the trainer's loop (trainer.flush_denormals=true)
    entries = {
        "step (trainer's, compiled)": (lambda: step([batch]), None, 1),
        "step, denormals not flushed": (unflushed(lambda: step([batch])), None, 1),
        "forward (loss)": (lambda: mx.eval(fwd(batch)), None, 1),
        "forward + backward": (lambda: mx.eval(vg(batch)), None, 1),
        "forward + backward, denormals not flushed": (
            unflushed(lambda: mx.eval(vg(batch))),
            None,
            1,
        ),
    }
    entries.update(parts(model))
    gemm = {}
    for m_, k_, n_ in ((SEQ * BATCH, 512, 512), (SEQ * BATCH, 512, 1280), (SEQ * BATCH, 1280, 512)):
        a, b = mx.random.normal((m_, k_)), mx.random.normal((k_, n_))
        mx.eval(a, b)
        gemm[f"GEMM {m_}x{k_}x{n_}"] = (lambda a=a, b=b: mx.eval(a @ b), 2 * m_ * k_ * n_ / 1e9, 0)
    entries.update(gemm)
    for fn, _, _ in entries.values():  # compile + warm up
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in entries}
    for _ in range(args.rounds):
        for name, (fn, _, _) in entries.items():
            times[name].append(timed(fn))
    n_params = sum(v.size for _, v in mlx_flat(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters; batch {BATCH} x {SEQ}; rounds {args.rounds}")
    print(
        "| part | wall ms (each) | CPU ms (each) | x per step | wall ms per step | GFLOP per step | GFLOP/s (wall) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (_, gflop, reps) in entries.items():
        w = statistics.median(t[0] for t in times[name]) * 1000
        c = statistics.median(t[1] for t in times[name]) * 1000
        per = reps or 1
        fl = f"{gflop * per:.1f}" if gflop else "-"
        rate = f"{gflop / (w / 1000):.0f}" if gflop else "-"
        print(
            f"| {name} | {w:.1f} | {c:.1f} | {reps or '-'} | {w * per if reps else w:.0f} | {fl} | {rate} |"
        )


def mlx_flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


if __name__ == "__main__":
    main()
