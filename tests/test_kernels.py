"""The fused CPU kernels (mlxlab.kernels) equal the pure-MLX formulation: values and gradients,
on odd sizes, large logits, masked and ignored rows; a training step with them on equals one
with them off; a machine that cannot build them falls back with one log line."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlab import kernels
from mlxlab.kernels import build
from mlxlab.objectives import losses
from mlxlab.runtime.compute import blas, cpu

PYTHON = sys.executable


# Every test here needs the built kernels and leaves their mode as it found it (conftest.py).
pytestmark = pytest.mark.usefixtures("fused_kernels_on")


def blas_layout_exact() -> bool:
    """Whether MLX's BLAS gives a product the same bits with B transposed (the fused kernels'
    contiguous heads) and copied (MLX's strided heads): OpenBLAS's AVX2 kernels do, its AVX-512
    ones, which an AVX-512 CPU runs where they measure faster (runtime/compute/blas_kernels.py), do not."""
    q = mx.random.normal((4, 4, 32, 32), key=mx.random.key(0))
    k = mx.random.normal((4, 32, 4, 32), key=mx.random.key(1)).transpose(0, 2, 1, 3)
    return mx.array_equal(q @ mx.contiguous(k).swapaxes(-1, -2), q @ k.swapaxes(-1, -2)).item()


def assert_same_run(got, want, err_msg=""):
    """To the bit where the BLAS is layout-exact; else to float32 rounding over a few steps."""
    if blas_layout_exact():
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=err_msg)


def both_paths(fn, *args):
    """fn(*args) with the kernels on, then off: two lists of numpy arrays."""
    out = []
    for mode in ("on", "off"):
        kernels.set_mode(mode)
        out.append([np.array(a) for a in fn(*args)])
    kernels.set_mode("on")
    return out


def ce_value_and_grad(logits, targets, weights):
    def loss(x):
        return (kernels.cross_entropy(x, targets) * weights).sum()

    value, grad = mx.value_and_grad(loss)(logits)
    return kernels.cross_entropy(logits, targets), value, grad


@pytest.mark.parametrize(
    "shape, scale",
    [((1, 1), 1.0), ((3, 17), 1.0), ((5, 1001), 4.0), ((2, 7, 333), 1.0), ((64, 515), 80.0)],
)
def test_cross_entropy_values_and_gradients_equal_mlx(shape, scale):
    key = mx.random.key(hash(shape) % 1000)
    k1, k2, k3 = mx.random.split(key, 3)
    logits = mx.random.normal(shape, key=k1) * scale + 3.0  # large, shifted logits included
    targets = mx.random.randint(0, shape[-1], shape[:-1], key=k2).astype(mx.int32)
    # Loss weights with masked rows (0): what masked_mean's cotangent looks like.
    weights = mx.random.uniform(shape=shape[:-1], key=k3) * (mx.random.uniform(shape=shape[:-1]) > 0.3)
    fused, ref = both_paths(ce_value_and_grad, logits, targets, weights)
    for got, want in zip(fused, ref):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale)
    assert fused[2].shape == shape


def test_cross_entropy_ignores_out_of_range_targets_and_keeps_nan():
    logits = mx.random.normal((4, 9))
    targets = mx.array([1, -1, 9, 3], dtype=mx.int32)
    ce, _, grad = ce_value_and_grad(logits, targets, mx.ones((4,)))
    ce, grad = np.array(ce), np.array(grad)
    assert ce[1] == 0 and ce[2] == 0 and ce[0] > 0 and ce[3] > 0
    assert not grad[1].any() and not grad[2].any()
    np.testing.assert_allclose(grad[0].sum(), 0.0, atol=1e-6)  # softmax - onehot sums to 0
    bad = mx.where(mx.arange(9) == 4, mx.array(float("nan")), logits)
    assert np.isnan(np.array(kernels.cross_entropy(bad, mx.array([1, 2, 3, 0])))).all()


def test_cross_entropy_is_fused_compiles_and_takes_int64_targets():
    logits = mx.random.normal((6, 50))
    targets = mx.random.randint(0, 50, (6,))
    fn = mx.compile(mx.value_and_grad(lambda x: kernels.cross_entropy(x, targets).mean()))
    value, grad = fn(logits)
    want = kernels.mlx_cross_entropy(logits, targets).mean()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    kernels.set_mode("off")
    np.testing.assert_allclose(np.array(fn(logits)[1]), np.array(grad), atol=1e-6)
    kernels.set_mode("on")
    hit = kernels.cross_entropy(logits, targets.astype(mx.int64))
    np.testing.assert_allclose(np.array(hit), np.array(kernels.mlx_cross_entropy(logits, targets)),
                               rtol=1e-5)


def test_the_fused_path_really_runs():
    """A fused graph holds the extension's primitive, the fallback MLX's ops (checked through the
    exported graph text, so a silent fallback cannot pass the equality tests above as 'fused')."""
    logits, targets = mx.random.normal((4, 8)), mx.array([0, 1, 2, 3])
    assert kernels.status() == "fused"
    assert "MlxlabCrossEntropy" in graph_text(lambda x: kernels.cross_entropy(x, targets), logits)
    assert "MlxlabSwiGLU" in graph_text(lambda x: kernels.swiglu(x, x), logits)
    q = logits.reshape(1, 1, 4, 8)
    assert "MlxlabSoftmax" in graph_text(lambda x: kernels.attention(x, x, x, 0.5), q)
    if blas.mlx_sgemm_batch():  # attention's products: one batched BLAS call each
        assert "MlxlabBatchedMatmul" in graph_text(lambda x: kernels.attention(x, x, x, 0.5), q)
    kernels.set_mode("off")
    for fn in (kernels.gelu, lambda x: kernels.dropout(x, 0.5), lambda x: kernels.layer_norm(
            x, mx.ones((8,)), mx.zeros((8,)), 1e-5), lambda x: kernels.attention(x, x, x, 0.5)):
        assert "Mlxlab" not in graph_text(fn, q)
    assert "Mlxlab" not in graph_text(lambda x: kernels.cross_entropy(x, targets), logits)


@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False), (True, True)])
def test_batched_matmul_is_mlx_matmul_to_the_bit(ta, tb):
    """kernels.batched_matmul (one cblas_sgemm_batch_strided call for all the batch's matrices)
    gives MLX's matmul's bits, forward and both gradients, eager and compiled, for every
    transpose of its operands; MLX's matmul calls the same BLAS one matrix at a time."""
    from mlxlab.kernels.dispatch import extension

    if not blas.mlx_sgemm_batch():
        pytest.skip("the BLAS MLX calls has no cblas_sgemm_batch_strided")
    module = extension()
    module.set_sgemm_batch(blas.mlx_sgemm_batch())
    ks = mx.random.split(mx.random.key(int(ta) * 2 + int(tb)), 3)
    m, k, n = 37, 16, 29
    a = mx.random.normal((2, 3, k, m) if ta else (2, 3, m, k), key=ks[0])
    b = mx.random.normal((2, 3, n, k) if tb else (2, 3, k, n), key=ks[1])
    cot = mx.random.normal((2, 3, m, n), key=ks[2])

    def op(x, t):
        return x.swapaxes(-1, -2) if t else x

    ours = mx.value_and_grad(lambda a, b: (module.batched_matmul(a, b, ta, tb) * cot).sum(),
                             argnums=(0, 1))
    mlx = mx.value_and_grad(lambda a, b: ((op(a, ta) @ op(b, tb)) * cot).sum(), argnums=(0, 1))
    for fn in (ours, mx.compile(ours)):
        (value, grads), (ref_value, ref_grads) = fn(a, b), mlx(a, b)
        np.testing.assert_array_equal(np.array(module.batched_matmul(a, b, ta, tb)),
                                      np.array(op(a, ta) @ op(b, tb)))
        assert float(value) == float(ref_value)
        for got, want in zip(grads, ref_grads):
            np.testing.assert_array_equal(np.array(got), np.array(want))
    with pytest.raises(ValueError, match="inner dimensions"):  # op(a) (m, k) @ op(a) (m, k)
        module.batched_matmul(a, a, ta, ta)


def graph_text(fn, x) -> str:
    import io

    out = io.StringIO()
    mx.export_to_dot(out, fn(x))
    return out.getvalue()


@pytest.mark.parametrize("shape, scale", [((1,), 1.0), ((7,), 3.0), ((3, 1023), 1.0), ((2, 4, 65), 30.0)])
def test_swiglu_values_and_gradients_equal_mlx(shape, scale):
    k1, k2, k3 = mx.random.split(mx.random.key(len(shape) * 7 + shape[-1]), 3)
    gate = mx.random.normal(shape, key=k1) * scale
    up = mx.random.normal(shape, key=k2)
    cot = mx.random.normal(shape, key=k3)

    def run(gate, up):
        fn = mx.value_and_grad(lambda g, u: (kernels.swiglu(g, u) * cot).sum(), argnums=(0, 1))
        value, (dg, du) = fn(gate, up)
        return kernels.swiglu(gate, up), value, dg, du

    fused, ref = both_paths(run, gate, up)
    for got, want in zip(fused, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("b, h, t_q, t_kv, d, masked", [
    (1, 1, 1, 1, 4, False), (2, 3, 5, 5, 8, True), (2, 2, 3, 11, 16, True), (3, 2, 17, 17, 32, False),
])
def test_attention_values_and_gradients_equal_mlx(b, h, t_q, t_kv, d, masked):
    from mlxlab.kernels import causal_additive_mask

    ks = mx.random.split(mx.random.key(b * 100 + t_q * 10 + t_kv), 4)
    q = mx.random.normal((b, h, t_q, d), key=ks[0]) * 2
    k = mx.random.normal((b, h, t_kv, d), key=ks[1]) * 2
    v = mx.random.normal((b, h, t_kv, d), key=ks[2])
    cot = mx.random.normal((b, h, t_q, d), key=ks[3])
    mask = causal_additive_mask(t_q, t_kv) if masked else None
    scale = d**-0.5

    def run(q, k, v):
        fn = mx.value_and_grad(
            lambda q, k, v: (kernels.attention(q, k, v, scale, mask) * cot).sum(), argnums=(0, 1, 2))
        value, grads = fn(q, k, v)
        return kernels.attention(q, k, v, scale, mask), value, *grads

    fused, ref = both_paths(run, q, k, v)
    for got, want in zip(fused, ref):  # MLX's softmax op for op: to the bit
        np.testing.assert_array_equal(got, want)


def attention_and_grads(scale, mask, cot, q, k, v):
    """kernels.attention's output, and the value and (q, k, v) gradients of its sum against cot."""
    fn = mx.value_and_grad(
        lambda q, k, v: (kernels.attention(q, k, v, scale, mask) * cot).sum(), argnums=(0, 1, 2))
    value, grads = fn(q, k, v)
    return kernels.attention(q, k, v, scale, mask), value, *grads


@pytest.mark.parametrize("b, h, h_kv, t_q, t_kv, d, mask_kind", [
    (2, 4, 2, 9, 9, 8, "causal"), (1, 6, 2, 5, 5, 16, None), (2, 4, 1, 1, 7, 8, None),
    (3, 4, 2, 6, 6, 8, "keys"),
])
def test_grouped_query_attention_equals_mlx(b, h, h_kv, t_q, t_kv, d, mask_kind):
    """Grouped-query heads (h = group * h_kv) run fused, the group's queries stacked on one key
    head (no repeated keys): values and gradients equal MLX's SDPA's to float32 rounding (the
    products sum in another blocking), and the fused softmax is in the graph."""
    from mlxlab.kernels import causal_additive_mask
    from mlxlab.models.layers.blocks import padding_mask

    ks = mx.random.split(mx.random.key(h * 10 + t_q), 4)
    q = mx.random.normal((b, h, t_q, d), key=ks[0]) * 2
    k = mx.random.normal((b, h_kv, t_kv, d), key=ks[1]) * 2
    v = mx.random.normal((b, h_kv, t_kv, d), key=ks[2])
    cot = mx.random.normal((b, h, t_q, d), key=ks[3])
    mask = {"causal": causal_additive_mask(t_q, t_kv), None: None,
            "keys": padding_mask(mx.arange(t_kv)[None] < mx.array([t_kv, 2, 4])[:b, None])}[mask_kind]

    fused, ref = both_paths(partial(attention_and_grads, d**-0.5, mask, cot), q, k, v)
    for got, want in zip(fused, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "MlxlabSoftmax" in graph_text(lambda x: kernels.attention(x, k, v, 0.5, mask), q)


@pytest.mark.parametrize("b, h, t, d, boolean", [(1, 1, 1, 4, True), (3, 4, 9, 8, True), (2, 2, 7, 16, False)])
def test_key_padding_attention_equals_mlx(b, h, t, d, boolean):
    """The (B, 1, 1, T) key-padding mask BERT makes runs fused (per batch row, broadcast over
    heads and queries): values and gradients are MLX's SDPA's to the bit, padded keys get no
    weight, and a row whose keys are all padding is uniform as MLX's is (not NaN)."""
    from mlxlab.models.layers.blocks import padding_mask

    ks = mx.random.split(mx.random.key(b * 10 + t), 4)
    q, k, v, cot = (mx.random.normal((b, h, t, d), key=key) for key in ks)
    lengths = mx.array([max(0, t - 3 * i) for i in range(b)])
    mask = padding_mask(mx.arange(t)[None] < lengths[:, None])
    assert mask.shape == (b, 1, 1, t) and mask.dtype == mx.bool_
    if not boolean:
        mask = mx.where(mask, 0.0, -1e9)

    fused, ref = both_paths(partial(attention_and_grads, d**-0.5, mask, cot), q, k, v)
    for got, want in zip(fused, ref):
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
    assert "MlxlabSoftmax" in graph_text(lambda x: kernels.attention(x, k, v, 0.5, mask), q)


@pytest.mark.parametrize("shape, scale", [((1,), 1.0), ((5, 3), 0.1), ((2, 9, 513), 3.0), ((4, 100), 30.0)])
def test_gelu_values_and_gradients_equal_mlx(shape, scale):
    """nn.gelu and its autodiff gradient op for op, MLX's erf and exp: to the bit, tails
    included (exp's cut-offs at +-88, erf's saturation)."""
    k1, k2 = mx.random.split(mx.random.key(shape[-1]))
    x = mx.random.normal(shape, key=k1) * scale
    cot = mx.random.normal(shape, key=k2)

    def run(x):
        value, grad = mx.value_and_grad(lambda x: (kernels.gelu(x) * cot).sum())(x)
        return kernels.gelu(x), value, grad

    fused, ref = both_paths(run, x)
    for got, want in zip(fused, ref):
        np.testing.assert_array_equal(got, want)
    assert "MlxlabGelu" in graph_text(kernels.gelu, x)


@pytest.mark.parametrize("shape, offset", [((1, 1), 0.0), ((3, 7), 2.0), ((2, 5, 128), 100.0), ((9, 333), -3.0)])
def test_layer_norm_values_and_gradients_equal_mlx(shape, offset):
    """mx.fast.layer_norm's CPU formula and its autodiff gradient op for op, sums in MLX's order:
    to the bit, large means included (cancellation in the variance)."""
    ks = mx.random.split(mx.random.key(shape[-1] + 1), 4)
    x = mx.random.normal(shape, key=ks[0]) * 2 + offset
    w = mx.random.normal(shape[-1:], key=ks[1])
    b = mx.random.normal(shape[-1:], key=ks[2])
    cot = mx.random.normal(shape, key=ks[3])

    def run(x, w, b):
        fn = mx.value_and_grad(lambda x, w, b: (kernels.layer_norm(x, w, b, 1e-5) * cot).sum(),
                               argnums=(0, 1, 2))
        value, grads = fn(x, w, b)
        return kernels.layer_norm(x, w, b, 1e-5), value, *grads

    fused, ref = both_paths(run, x, w, b)
    for got, want in zip(fused, ref):
        np.testing.assert_array_equal(got, want)
    assert "MlxlabLayerNorm" in graph_text(lambda x: kernels.layer_norm(x, w, b, 1e-5), x)
    # Not affine: MLX's own op.
    np.testing.assert_allclose(np.array(kernels.layer_norm(x, None, None, 1e-5)),
                               np.array(mx.fast.layer_norm(x, None, None, 1e-5)), rtol=1e-6)


@pytest.mark.parametrize("shape, p", [((1,), 0.3), ((3,), 0.3), ((7, 5), 0.1), ((64, 47, 128), 0.3),
                                      ((1000, 1001), 0.25), ((6, 9), 0.5), ((4, 33), 0.9)])
def test_dropout_is_nn_dropout_to_the_bit(shape, p):
    """The fused dropout draws MLX's own threefry bits with the key nn.Dropout's draw would take:
    outputs, gradients and the random state after it are nn.Dropout's to the bit, eager and under
    mx.compile over the random state (odd sizes cover RandomBits' middle word, small ones the
    scalar tail, (64, 47, 128) the vector blocks over two threads)."""
    ref = nn.Dropout(p)
    x = mx.random.normal(shape, key=mx.random.key(len(shape)))
    cot = mx.random.normal(shape, key=mx.random.key(9))

    def draws(fn):
        mx.random.seed(11)
        out = [fn(x) for _ in range(3)]
        y, vjp = mx.vjp(fn, [x], [cot])
        return [np.array(a).view(np.uint32) for a in (*out, y[0], vjp[0], mx.random.state[0])]

    fused = draws(lambda x: kernels.dropout(x, p))
    for got, want in zip(fused, draws(ref)):
        np.testing.assert_array_equal(got, want)
    assert "MlxlabDropout" in graph_text(lambda x: kernels.dropout(x, p), x)

    def compiled(fn):
        step = mx.compile(fn, inputs=mx.random.state, outputs=mx.random.state)
        mx.random.seed(5)
        return [np.array(step(x)).view(np.uint32) for _ in range(3)]

    twice = compiled(lambda x: kernels.dropout(kernels.dropout(x, p), p))
    for got, want in zip(twice, compiled(lambda x: ref(ref(x)))):
        np.testing.assert_array_equal(got, want)


def test_dropout_drops_at_rate_scales_and_follows_the_seed():
    """Keep rate 1 - p, kept values scaled by 1/(1-p), the gradient through the same mask; one
    seed gives one mask, the next call another; neighbours independent; compiled steps advance
    MLX's random state like the MLX path, so seeded runs repeat."""
    x = mx.ones((64, 48, 128))
    p = 0.3
    mx.random.seed(7)
    a = np.array(kernels.dropout(x, p))
    b = np.array(kernels.dropout(x, p))
    mx.random.seed(7)
    np.testing.assert_array_equal(np.array(kernels.dropout(x, p)), a)
    assert not np.array_equal(a, b)
    kept = a != 0
    assert abs(kept.mean() - (1 - p)) < 0.005
    np.testing.assert_allclose(a[kept], 1 / (1 - p), rtol=1e-6)
    flat = kept.reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01
    assert abs(np.corrcoef(kept[0].reshape(-1), kept[1].reshape(-1))[0, 1]) < 0.02

    cot = mx.random.normal(x.shape)
    mx.random.seed(3)
    y, vjp = mx.vjp(lambda x: kernels.dropout(x, p), [x * 2], [cot])
    np.testing.assert_allclose(np.array(vjp[0]), np.array(cot) * (np.array(y[0]) != 0) / (1 - p),
                               rtol=1e-6)
    assert "MlxlabDropout" in graph_text(lambda x: kernels.dropout(x, p), x)

    state = [mx.random.state]
    step = mx.compile(lambda x: kernels.dropout(x, p), inputs=state, outputs=state)
    masks = []
    for _ in range(2):
        mx.random.seed(11)
        masks.append([np.array(step(x)) for _ in range(2)])
    np.testing.assert_array_equal(masks[0][0], masks[1][0])
    np.testing.assert_array_equal(masks[0][1], masks[1][1])
    assert not np.array_equal(masks[0][0], masks[0][1])


def test_default_bert_fused_equals_mlx_and_drops_out_only_in_training():
    """The default experiment's BERT (hidden 128, 2 layers, 4 heads, dropout 0.3) on a padded
    batch of its shape: in eval mode the fused model's logits and gradients are MLX's to the bit
    (dropout off: seeds change nothing), and in training too for one seed (the same dropout
    masks); each
    of its dropouts draws its own mask, another one
    each step (also compiled over MLX's random state, as the trainer compiles), keeping 1 - p
    scaled by 1 / (1 - p)."""
    from mlx.utils import tree_flatten

    from mlxlab.models.encoders.bert import BertClassifier

    mx.random.seed(0)
    model = BertClassifier(vocab_size=128, num_labels=2)
    ids = mx.random.randint(1, 128, (32, 32))
    lengths = mx.array([32 - (i % 12) for i in range(32)])
    mask = mx.arange(32)[None] < lengths[:, None]
    labels = mx.arange(32) % 2

    def loss(m):
        return nn.losses.cross_entropy(m(ids, attention_mask=mask), labels).mean()

    def eval_outputs():
        model.eval()
        mx.random.seed(1)
        logits = model(ids, attention_mask=mask)
        mx.random.seed(2)
        again = model(ids, attention_mask=mask)
        grads = nn.value_and_grad(model, loss)(model)[1]
        return [logits, again, *(g for _, g in sorted(tree_flatten(grads)))]

    fused, ref = both_paths(eval_outputs)
    np.testing.assert_array_equal(fused[0], fused[1])
    for got, want in zip(fused, ref):
        assert_same_run(got, want)

    model.train()

    def train_outputs():  # the same seed draws the same masks on both paths
        mx.random.seed(3)
        loss_value, grads = nn.value_and_grad(model, loss)(model)
        return [loss_value, *(g for _, g in sorted(tree_flatten(grads)))]

    fused, ref = both_paths(train_outputs)
    for got, want in zip(fused, ref):
        assert_same_run(got, want)
    masks, original = [], kernels.dropout

    def recording(x, p):
        y = original(x, p)
        masks.append((np.array(y), np.array(x), p))
        return y

    kernels.dropout = recording
    try:
        for _ in range(2):
            model(ids, attention_mask=mask)
    finally:
        kernels.dropout = original
    assert len(masks) == 2 * 6  # embeddings, 2 per layer, the head: each step
    kept = [y != 0 for y, _, _ in masks]
    for (y, x, p), keep in zip(masks, kept):
        assert abs(keep.mean() - (1 - p)) < 0.02
        np.testing.assert_allclose(y[keep], x[keep] / (1 - p), rtol=1e-5)
    shapes = [k.shape for k in kept]
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            if shapes[i] == shapes[j]:
                r = np.corrcoef(kept[i].reshape(-1), kept[j].reshape(-1))[0, 1]
                assert abs(r) < 0.03, (i, j, r)
    state = [model.state, mx.random.state]
    step = mx.compile(lambda i: model(i, attention_mask=mask), inputs=state, outputs=state)
    assert not np.array_equal(np.array(step(ids)), np.array(step(ids)))


def test_masked_softmax_gradient_reaches_the_mask():
    module = kernels.extension()
    x, mask = mx.random.normal((2, 3, 4, 6)), mx.random.normal((4, 6))
    cot = mx.random.normal((2, 3, 4, 6))

    def grads(fn):
        return mx.grad(lambda x, m: (fn(x, m) * cot).sum(), argnums=(0, 1))(x, mask)

    for got, want in zip(grads(module.softmax), grads(lambda x, m: mx.softmax(x + m, axis=-1))):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_other_dtypes_and_broadcasts_take_the_mlx_path():
    gate = mx.random.normal((4, 8)).astype(mx.bfloat16)
    out = kernels.swiglu(gate, gate)
    assert out.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(out.astype(mx.float32)),
                               np.array((nn.silu(gate) * gate).astype(mx.float32)))
    g32 = mx.random.normal((4, 8))
    np.testing.assert_allclose(np.array(kernels.swiglu(g32, mx.ones((8,)))), np.array(nn.silu(g32)),
                               rtol=1e-6)


def test_label_smoothing_equals_the_mlx_path():
    logits, targets = mx.random.normal((2, 5, 40)), mx.random.randint(0, 40, (2, 5))
    fused, ref = both_paths(lambda: [losses.token_cross_entropy(logits, targets, 0.1)])
    np.testing.assert_allclose(fused[0], ref[0], rtol=1e-5)


def test_bad_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="fused_kernels='fast': expected one of auto, on, off"):
        kernels.set_mode("fast")


def trainer_steps(cfg, data, batches, task: str, lr: float, seed: int, mode: str = "on"):
    """The losses of len(batches) optimizer steps of the trainer's compiled step from `seed`,
    and the weights after them (numpy, by name)."""
    from mlx.utils import tree_flatten

    from mlxlab.config import instantiate
    from mlxlab.launch.wiring import seed_everything
    from mlxlab.training.optim import build_optimizer, default_optimizer
    from mlxlab.training.settings import TrainerSettings
    from mlxlab.training.step import make_step

    seed_everything(seed)
    kernels.set_mode(mode)  # as the loop sets it, once, before its step is built
    model = instantiate(cfg.model, vocab_size=data.vocab_size, num_labels=data.num_labels)
    model.train()
    settings = TrainerSettings(max_steps=len(batches), fused_kernels=mode)
    opt = build_optimizer(partial(default_optimizer(), learning_rate=lr), settings.schedule,
                          total_steps=len(batches))
    opt.init(model.trainable_parameters())
    step = make_step(model, opt, losses.task_loss(task), settings)
    step_losses = [step([b])[0].item() for b in batches]
    return step_losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def first_batches(cfg, tmp_path, count: int, batch_size: int):
    from mlxlab.config import instantiate
    from mlxlab.data.batching import Batching

    data = instantiate(cfg.data)
    data.setup(tmp_path / "run")
    return data, [b for _, b in zip(range(count), data.train_batches(Batching(batch_size=batch_size), 0))]


def test_training_steps_equal_with_kernels_on_and_off(make_cfg, tmp_path):
    """Six real optimizer steps of a small Llama-style LM on the shipped TinyStories sample:
    the losses and the final weights agree to float32 tolerance with the kernels on and off."""
    cfg = make_cfg("experiment=tinystories_nano", "tracking=none", "model.dim=64",
                   "model.num_layers=2", "model.num_heads=2", "model.max_seq_len=32",
                   "data.packing.seq_len=32", "data.tokenizer.max_vocab=300")
    data, batches = first_batches(cfg, tmp_path, 6, 4)
    (loss_on, w_on), (loss_off, w_off) = (
        trainer_steps(cfg, data, batches, "lm", 3e-3, 0, mode) for mode in ("on", "off"))
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-5)
    assert loss_on[-1] < loss_on[0]
    # Adam divides by sqrt(v): a weight whose gradient is ~0 moves by rounding noise, so the
    # weights get an absolute tolerance well under one step's movement (lr 3e-3).
    for name in w_on:
        np.testing.assert_allclose(w_on[name], w_off[name], rtol=1e-4, atol=1e-4, err_msg=name)


# The default BERT's fused ops; "heads" (its contiguous heads) changes which form of the attention's
# products MLX hands BLAS, which on an AVX-512 OpenBLAS changes their last bits.
ENCODER_KERNELS = ("gelu", "layer_norm", "dropout", "attention", "heads")


def test_the_default_experiment_trains_the_same_run_with_its_encoder_kernels_on_and_off(
        make_cfg, tmp_path):
    """The default experiment (BERT on Titanic, dropout on) through the trainer's compiled step:
    ten optimizer steps from one seed give the same losses and weights (to the bit on a
    layout-exact BLAS: OpenBLAS's AVX2 kernels) with the encoder's fused kernels (GELU,
    LayerNorm, dropout, attention) on and left to MLX, so a seed's results do not depend on
    them. (The cross-entropy kernel is not MLX's to the bit.)"""
    cfg = make_cfg("tracking=none")
    data, batches = first_batches(cfg, tmp_path, 10, 32)
    runs = []
    try:
        for skip in ((), ENCODER_KERNELS):
            kernels.set_skip(skip)
            runs.append(trainer_steps(cfg, data, batches, "classification", 1e-3, 5))
    finally:
        kernels.set_skip(None)
    (loss_on, w_on), (loss_off, w_off) = runs
    assert_same_run(np.array(loss_on), np.array(loss_off))
    assert loss_on[-1] < loss_on[0]
    for name in w_on:
        assert_same_run(w_on[name], w_off[name], err_msg=name)


def test_kernels_are_built_for_one_fixed_isa_level_not_for_this_cpu():
    """The module is compiled for x86-64-v3 (AVX2 + FMA, no AVX-512) on every x86-64 machine,
    AVX-512 ones included, and with no FMA contraction: the same program and the same results
    whichever CPU built it (-march=native would make it a different program per CPU)."""
    features = set(kernels.extension().isa())
    if cpu.isa_level() == cpu.X86_64_V3:
        assert {"avx2", "fma"} <= features and "avx512f" not in features, features
    else:
        assert "avx512f" not in features and "sve" not in features, features


@pytest.mark.parametrize("machine, flags, level", [
    ("x86_64", cpu.X86_64_V3_FLAGS | {"avx512f", "avx512bw"}, "x86-64-v3"),  # AVX-512: still v3
    ("x86_64", cpu.X86_64_V3_FLAGS, "x86-64-v3"),
    ("x86_64", cpu.X86_64_V3_FLAGS - {"avx2", "fma", "bmi2"}, None),  # e.g. Sandy Bridge
    ("aarch64", frozenset(), "armv8-a"),
    ("riscv64", frozenset(), None),
])
def test_isa_level_is_one_fixed_level_per_architecture(machine, flags, level):
    assert cpu.isa_level(machine, flags) == level
    if level is None and machine == "x86_64":
        assert cpu.below_level_reason(machine, flags) == (
            "this CPU is below x86-64-v3 (no avx2, bmi2, fma)")


def test_this_machines_cpuinfo_is_read():
    if sys.platform.startswith("linux") and cpu.isa_level() == cpu.X86_64_V3:
        assert {"avx2", "fma"} <= cpu.cpu_flags()
    assert cpu.cpu_flags("processor : 0\nflags\t\t: fpu avx2 fma\n") == {"fpu", "avx2", "fma"}


def test_a_machine_that_cannot_build_falls_back_with_one_log_line(tmp_path):
    """No cmake on PATH and an empty cache: auto trains on pure MLX after one warning line; on
    is a one-line error."""
    env = {**os.environ, "PATH": str(tmp_path), "MLXLAB_KERNELS_CACHE": str(tmp_path / "cache")}
    snippet = (
        "import mlx.core as mx; from mlxlab import kernels; "
        "x = mx.random.normal((3, 5)); t = mx.array([0, 1, 2]); "
        "print(kernels.cross_entropy(x, t).shape, kernels.status()); "
        "print(kernels.cross_entropy(x, t).shape); kernels.set_mode('on')"
    )
    out = subprocess.run([PYTHON, "-c", snippet], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert out.stdout.splitlines() == ["(3,) unavailable: `cmake` is not on PATH (install it, "
                                       "e.g. apt-get install cmake ninja-build)", "(3,)"]
    warnings = [line for line in out.stderr.splitlines() if "using pure-MLX ops" in line]
    assert len(warnings) == 1
    assert "trainer.fused_kernels=on but the fused CPU kernels are unavailable" in out.stderr


@pytest.mark.slow
def test_pip_install_builds_the_kernels_this_process_loads(tmp_path):
    """hatch_build.py compiles the kernels while pip builds mlxlab (in pip's isolated build
    environment) into the cache key this process computes, so a first run loads, not builds."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "kernels"
    env = {**os.environ, "MLXLAB_KERNELS_CACHE": str(cache)}
    env.pop("MLXLAB_SKIP_KERNEL_BUILD", None)
    done = subprocess.run([PYTHON, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                           str(root)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    built = list((cache / build.build_key(kernels.isa_level())).glob("_mlxlab_kernels*.so"))
    assert built, f"no kernels under {cache}: {sorted(p.name for p in cache.glob('*'))}"
    check = subprocess.run(
        [PYTHON, "-c", "import mlxlab, mlx.core as mx\nfrom mlxlab import kernels\n"
         "print(kernels.status(), float(kernels.gelu(mx.array([1.0]))[0]))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert check.stdout.split()[0] == "fused", check.stderr
    assert "compiling" not in check.stderr  # loaded, not built
