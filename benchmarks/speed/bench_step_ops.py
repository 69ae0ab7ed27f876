"""Time the ops of a nano training step that part 3b of issue 12 fused (RMSNorm, RoPE with the
heads transpose, the AdamW update), each through `mlxlab.kernels` traced once with the kernels
off (MLX's ops) and once on (the fused primitives), forward + backward under mx.compile, best of
interleaved rounds (docs/benchmarks-history.md, issue 12 part 3b):

    python benchmarks/speed/bench_step_ops.py --threads 1
    python benchmarks/speed/bench_step_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# isort: off
import mlxlab  # noqa: F401  first: loads the fast BLAS before anything imports mlx.core
import mlx.core as mx
import mlx.optimizers as optim
import mlx.utils

# isort: on
from mlxlab import kernels
from mlxlab.models.transformer import Transformer
from mlxlab.runtime.blas import set_blas_threads

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402


def best_ms(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            mx.eval(f(*args))
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            mx.eval(f(*args))
            times[k].append(time.perf_counter() - start)
    return {k: min(v) * 1e3 for k, v in times.items()}


def traced(fn):
    """{"mlx": fn compiled with the kernels off, "fused": on} (the mode is read while tracing)."""
    out = {}
    for name, mode in (("mlx", "off"), ("fused", "on")):
        def call(*args, mode=mode):
            kernels.set_mode(mode)
            return fn(*args)

        out[name] = mx.compile(call)
    return out


def nano() -> Transformer:
    return Transformer(vocab_size=3776, dim=256, num_layers=4, num_heads=4, max_seq_len=128)


def adamw_steps() -> dict:
    out = {}
    for name, cls in (("mlx", optim.AdamW), ("fused", kernels.AdamW)):
        model = nano()
        opt = cls(learning_rate=1e-3, weight_decay=0.01, bias_correction=True)
        opt.init(model.trainable_parameters())
        state = [model.state, opt.state]
        update = mx.compile(lambda g, m=model, o=opt: o.update(m, g), inputs=state, outputs=state)
        out[name] = lambda g, update=update, state=state: (update(g), state)[1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS and kernel threads")
    parser.add_argument("--rounds", type=int, default=30)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    set_blas_threads(args.threads)
    kernels.set_mode("on")
    kernels.extension().set_num_threads(args.threads)
    x, w, dy = mx.random.normal((16, 128, 256)), mx.random.normal((256,)), mx.random.normal((16, 128, 256))
    q, dq = mx.random.normal((16, 128, 4, 64)), mx.random.normal((16, 4, 128, 64))
    grads = mlx.utils.tree_map(lambda p: mx.random.normal(p.shape) * 1e-3, nano().trainable_parameters())
    mx.eval(x, w, dy, q, dq, grads)
    rows = [
        ("RMSNorm (16, 128, 256) fwd+bwd", traced(
            lambda x, w: mx.vjp(lambda x, w: kernels.rms_norm(x, w, 1e-5), [x, w], [dy])), (x, w)),
        ("RoPE + heads transpose (16, 128, 4, 64) fwd+bwd", traced(
            lambda q: mx.vjp(lambda q: kernels.rope(q, 64, 1e4, 1.0, 0), [q], [dq])), (q,)),
        ("AdamW update of nano's 4.2M parameters", adamw_steps(), (grads,)),
    ]
    print(f"threads {args.threads}, best of {args.rounds} rounds")
    for name, fns, fn_args in rows:
        t = best_ms(fns, fn_args, args.rounds)
        print(f"{name:<50} MLX {t['mlx']:6.2f} ms  fused {t['fused']:6.2f} ms  "
              f"MLX/fused {t['mlx'] / t['fused']:.1f}x")


if __name__ == "__main__":
    main()
