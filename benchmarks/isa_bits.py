"""Hashes of what the fused kernels and MLX's BLAS compute on fixed inputs, to compare CPUs (issue 39).

    OPENBLAS_NUM_THREADS=1 MLXLAB_KERNEL_THREADS=1 python benchmarks/isa_bits.py
    OPENBLAS_NUM_THREADS=1 MLXLAB_KERNEL_THREADS=1 qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/isa_bits.py

Prints one JSON line: the ISA the kernels were built for, MLX's OpenBLAS and the kernels it runs,
a hash of every fused kernel's outputs and gradients (GELU, LayerNorm, RMSNorm, SwiGLU,
cross-entropy, attention, RoPE, dropout, AdamW), and of the default BERT's eval logits and
gradients with the kernels on and off (and whether the two are equal). The same line on two
machines: the same bits there. Run it at one thread: OpenBLAS and the kernels split work by
thread count, and a split changes the order of sums. Under `qemu-x86_64 -cpu Haswell` (QEMU 7.2+
user mode: an AVX2 CPU without AVX-512) it shows what an AVX2 machine computes.
"""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlxlab
from mlxlab import kernels
from mlxlab.models.bert import BertClassifier


def digest(*values) -> str:
    h = hashlib.sha256()
    for value in values:
        for leaf in value if isinstance(value, tuple | list) else [value]:
            h.update(np.array(leaf).tobytes())
    return h.hexdigest()[:12]


def value_and_grads(fn, *args):
    return mx.value_and_grad(lambda *a: (fn(*a) * 1.7).sum(), argnums=tuple(range(len(args))))(*args)


def main() -> None:
    kernels.set_mode("on")
    out = {"isa": kernels.extension().isa(), "blas": mlxlab.blas.detail}
    mx.random.seed(0)
    x, g = mx.random.normal((8, 33, 64)), mx.random.normal((8, 33, 64))
    w, b = mx.random.normal((64,)), mx.random.normal((64,))
    logits, targets = mx.random.normal((40, 301)) * 3, mx.random.randint(0, 301, (40,))
    q, k, v = (mx.random.normal((2, 4, 16, 8)) for _ in range(3))
    heads = mx.random.normal((2, 16, 4, 8))
    out["gelu"] = digest(*value_and_grads(kernels.gelu, x))
    out["layer_norm"] = digest(*value_and_grads(lambda a, c, d: kernels.layer_norm(a, c, d, 1e-5), x, w, b))
    out["rms_norm"] = digest(*value_and_grads(lambda a, c: kernels.rms_norm(a, c, 1e-5), x, w))
    out["swiglu"] = digest(*value_and_grads(kernels.swiglu, x, g))
    out["cross_entropy"] = digest(*value_and_grads(lambda a: kernels.cross_entropy(a, targets), logits))
    out["attention"] = digest(*value_and_grads(lambda a, c, d: kernels.attention(a, c, d, 0.35), q, k, v))
    out["rope"] = digest(*value_and_grads(lambda a: kernels.rope(a, 8, 10000.0, 1.0, 0), heads))
    mx.random.seed(5)
    out["dropout"] = digest(kernels.dropout(x, 0.3))
    params, optimizer = {"w": mx.random.normal((1000,))}, kernels.AdamW(learning_rate=1e-3)
    for _ in range(3):
        optimizer.update(params, {"w": mx.random.normal((1000,))})
        mx.eval(params)
    out["adamw"] = digest(params["w"])
    # the default BERT on tests/test_kernels.py's padded batch, eval mode, fused and MLX
    mx.random.seed(0)
    model = BertClassifier(vocab_size=128, num_labels=2)
    ids = mx.random.randint(1, 128, (32, 32))
    mask = mx.arange(32)[None] < mx.array([32 - (i % 12) for i in range(32)])[:, None]
    labels = mx.arange(32) % 2
    model.eval()

    def bert() -> list:
        def loss(m):
            return nn.losses.cross_entropy(m(ids, attention_mask=mask), labels).mean()

        grads = nn.value_and_grad(model, loss)(model)[1]
        return [model(ids, attention_mask=mask), *(a for _, a in sorted(tree_flatten(grads)))]

    fused = bert()
    kernels.set_mode("off")
    plain = bert()
    out["bert_fused"], out["bert_mlx"] = digest(*fused), digest(*plain)
    out["bert_on_equals_off"] = all(np.array_equal(np.array(a), np.array(c)) for a, c in zip(fused, plain))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
