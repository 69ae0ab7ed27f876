"""What repeats bit for bit on this device, op by op, and the first compile's cost: MLX and
mlx-lm only (it runs on a GPU machine before mlxlab's other dependencies are there).

    python benchmarks/speed/gpu_probe.py [--out probe.json] [--layers 30] [--smoke]

1. Compile: a Llama of SmolLM2-135M's shape (random weights, bf16; LoRA rank 8 on q/k/v/o) takes
   mlx-lm's training step (its default_loss, value_and_grad, Adam, `mx.compile` over the state)
   for 3 steps, then the same on its 4-bit (group 32) quantization, then 8 greedy tokens through
   mlx-lm's KV cache: each phase's seconds (the first ones hold MLX's kernel compiles; the
   kernels stay in MLX_PTX_CACHE_DIR for the processes after it).
2. Determinism: each op below evaluated twice on the same inputs in one process; `equal` is
   bitwise equality, `max_rel` the largest |a - b| / max|a|. Forward ops and the vector-Jacobian
   products a training step runs (the weight gradients' reductions, the embedding's scatter-add,
   attention's backward).
3. The model's gradients of one step computed twice (full fine-tuning: every tensor, embedding
   included): the tensors that differ, in the model's order, with their max_rel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

VOCAB, VOCAB_SMALL = 49152, 256


def compare(a: mx.array, b: mx.array) -> dict:
    a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
    scale = mx.max(mx.abs(a32)).item() or 1.0
    return {"equal": bool(mx.array_equal(a, b).item()),
            "max_rel": mx.max(mx.abs(a32 - b32)).item() / scale}


def twice(fn, *args) -> dict:
    """fn(*args) evaluated in two separate graphs: equal bit for bit?"""
    first = fn(*args)
    mx.eval(first)
    second = fn(*args)
    mx.eval(second)
    if isinstance(first, (tuple, list)):
        worst = [compare(x, y) for x, y in zip(first, second)]
        return {"equal": all(w["equal"] for w in worst),
                "max_rel": max(w["max_rel"] for w in worst)}
    return compare(first, second)


def op_cases(dtype: mx.Dtype, small: bool = False) -> dict:
    k = iter(mx.random.split(mx.random.key(0), 16))
    n, d, v, t, h = (64, 32, 256, 32, 2) if small else (4096, 576, 49152, 1024, 9)

    def rnd(*shape: int, scale: float = 1.0) -> mx.array:
        return (scale * mx.random.normal(shape, key=next(k))).astype(dtype)

    x, w, g = rnd(n, d), rnd(d, d, scale=0.05), rnd(n, d)
    big = rnd(n, v, scale=3.0)
    idx = mx.random.randint(0, v, (n,), key=next(k))
    emb = rnd(v, d, scale=0.02)
    q, kk, vv = (rnd(4, h, t, 8 if small else 64) for _ in range(3))
    norm_w = rnd(d) + 1
    cases = {
        "matmul": lambda: x @ w,
        "matmul_weight_grad (x^T g)": lambda: x.T @ g,
        "sum rows (4096 x 576 -> 576)": lambda: mx.sum(x, axis=0),
        "sum all": lambda: mx.sum(x.astype(mx.float32)),
        "softmax over 49152": lambda: mx.softmax(big, axis=-1),
        "logsumexp over 49152": lambda: mx.logsumexp(big, axis=-1),
        "cross_entropy fwd+grad": lambda: mx.value_and_grad(
            lambda z: nn.losses.cross_entropy(z, idx, reduction="mean"))(big.astype(mx.float32)),
        "rms_norm fwd": lambda: mx.fast.rms_norm(x, norm_w, 1e-5),
        "rms_norm vjp (x, weight)": lambda: mx.vjp(
            lambda a, b: mx.fast.rms_norm(a, b, 1e-5), [x, norm_w], [g])[1],
        "rope fwd": lambda: mx.fast.rope(q, q.shape[-1], traditional=False, base=1e5, scale=1.0, offset=0),
        "sdpa causal fwd": lambda: mx.fast.scaled_dot_product_attention(
            q, kk, vv, scale=0.125, mask="causal"),
        "sdpa causal vjp": lambda: mx.vjp(
            lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=0.125,
                                                                  mask="causal"),
            [q, kk, vv], [q])[1],
        "embedding take": lambda: emb[idx],
        "embedding vjp (scatter-add)": lambda: mx.vjp(lambda e: e[idx], [emb], [g])[1],
        "scatter-add at[].add": lambda: mx.zeros((v, d), dtype).at[idx].add(g),
    }
    return {name: twice(fn) for name, fn in cases.items()}


def llama(layers: int, small: bool = False):
    from mlx_lm.models import llama as L

    args = L.ModelArgs(model_type="llama", hidden_size=64 if small else 576,
                       num_hidden_layers=layers, intermediate_size=128 if small else 1536,
                       num_attention_heads=2 if small else 9, num_key_value_heads=1 if small else 3,
                       rms_norm_eps=1e-5, vocab_size=VOCAB_SMALL if small else VOCAB, rope_theta=100000.0,
                       tie_word_embeddings=True, max_position_embeddings=8192)
    mx.random.seed(0)
    model = L.Model(args)
    model.set_dtype(mx.bfloat16)
    return model


def batch(n: int = 4, t: int = 64, vocab: int = VOCAB) -> tuple[mx.array, mx.array, mx.array]:
    ids = mx.random.randint(0, vocab, (n, t + 1), key=mx.random.key(1))
    lengths = mx.array([[8, t]] * n)  # mlx-lm's (offset, length): the prompt masked
    return ids[:, :-1], ids[:, 1:], lengths


def train_phase(model, steps: int, vocab: int) -> dict:
    """mlx-lm's compiled LoRA step, as its trainer builds it: seconds of each step."""
    from mlx_lm.tuner.trainer import default_loss

    opt = optim.Adam(learning_rate=1e-3)
    state = [model.state, opt.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, default_loss)

    @mx.compile
    def step(x, lengths):
        (loss, _), grads = loss_and_grad(model, x, lengths)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    x, _, lengths = batch(vocab=vocab)
    full = mx.concatenate([x, x[:, -1:]], axis=1)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(full, lengths)
        mx.eval(state, loss)
        out.append(round(time.perf_counter() - t0, 3))
    return {"step_s": out, "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_probe.json")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="2 layers (a CPU check of the script)")
    args = p.parse_args()
    layers, small = (2, True) if args.smoke else (args.layers, False)
    vocab = VOCAB_SMALL if small else VOCAB
    from mlx_lm.generate import generate_step
    from mlx_lm.tuner.utils import linear_to_lora_layers

    result: dict = {"device": str(mx.default_device()), "mlx": mx.__version__}
    try:
        result["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception as e:  # noqa: BLE001 - a report, not a requirement
        result["device_info"] = repr(e)
    lora = {"rank": 8, "scale": 2.0, "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]}
    t0 = time.perf_counter()
    model = llama(layers, small)
    model.freeze()
    linear_to_lora_layers(model, layers, lora)
    result["lora_bf16"] = train_phase(model, 3, vocab)
    qmodel = llama(layers, small)
    nn.quantize(qmodel, group_size=32, bits=4)
    qmodel.freeze()
    linear_to_lora_layers(qmodel, layers, lora)
    result["lora_4bit"] = train_phase(qmodel, 3, vocab)
    t1 = time.perf_counter()
    prompt = batch(1, 16, vocab)[0][0]
    tokens = [int(tok) for (tok, _), _ in zip(generate_step(prompt, qmodel), range(8))]
    result["generate_8_s"] = round(time.perf_counter() - t1, 3)
    result["compile_phase_s"] = round(time.perf_counter() - t0, 3)
    result["tokens"] = tokens
    print(json.dumps(result), flush=True)

    t0 = time.perf_counter()
    result["ops"] = {str(dt): op_cases(dt, args.smoke) for dt in (mx.float32, mx.bfloat16)}
    for dt, cases in result["ops"].items():
        for name, r in cases.items():
            print(f"{dt:14s} {name:32s} equal={r['equal']!s:5s} max_rel={r['max_rel']:.2e}",
                  flush=True)

    # one full fine-tuning step's gradients, twice
    model = llama(layers, small)
    model.set_dtype(mx.float32)
    x, y, _ = batch(vocab=vocab)

    def loss(m):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    grad = nn.value_and_grad(model, loss)
    _, g1 = grad(model)
    mx.eval(g1)
    _, g2 = grad(model)
    mx.eval(g2)
    diffs = []
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        r = compare(a, b)
        if not r["equal"]:
            diffs.append({"tensor": name, **r})
    result["model_grads"] = {"tensors": len(tree_flatten(g1)), "differ": diffs}
    result["determinism_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(result["model_grads"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
