"""The hybrids' short causal depthwise convolution through the fused kernel
(kernels.depthwise_conv1d, csrc/depthwise_conv.cpp): its values and its gradients in x, the weight
and the bias equal nn.Conv1d(C, C, K, groups=C)'s (then nn.silu's, with silu=True) to float32
rounding on odd sizes, split over several threads; a loaded mlx-lm hybrid has its convolutions
routed (models/decoders/mlx_lm_fused.py DepthwiseConv1d) under the same parameter names, with
mlx-lm's logits, loss and gradients, and with the kernels off computes nn.Conv1d's to the bit."""

from __future__ import annotations

import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hybrid_families import FAMILIES, save_tiny_hybrid
from mlxlab import kernels
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder, load_folder
from mlxlab.models.decoders.mlx_lm_fused import DepthwiseConv1d

pytestmark = pytest.mark.usefixtures("fused_kernels_on")

# (B, T, C, K): T and C multiples of nothing, K 4 (every hybrid's) and 2, one output row
SHAPES = [(2, 37, 45, 4), (2, 50, 13, 2), (1, 1, 3, 4), (2, 301, 77, 4)]
TOLERANCE = 1e-5


def conv_module(channels: int, k: int, bias: bool, seed: int) -> nn.Conv1d:
    """mlx-lm's short convolution, its weight and bias drawn away from their initial values."""
    conv = nn.Conv1d(channels, channels, k, groups=channels, padding=0, bias=bias)
    keys = mx.random.split(mx.random.key(seed))
    conv.weight = mx.random.normal(conv.weight.shape, key=keys[0])
    if bias:
        conv.bias = mx.random.normal((channels,), key=keys[1])
    return conv


def value_and_grads(call, conv: nn.Conv1d, x: mx.array, cot: mx.array) -> dict[str, np.ndarray]:
    """call(x) (reading conv's parameters), the gradients of sum(call(x) * cot) in x and in
    each of conv's parameters, and in x alone ("x only": a frozen weight's, as under LoRA)."""
    params = conv.trainable_parameters()

    def loss(params: dict, x: mx.array) -> tuple[mx.array, mx.array]:
        conv.update(params)
        out = call(x)
        return (out * cot).sum(), out

    (_, out), grads = mx.value_and_grad(loss, argnums=(0, 1))(params, x)
    (_, _), x_only = mx.value_and_grad(loss, argnums=1)(params, x)
    conv.update(params)
    mx.eval(out, grads, x_only)
    return {"out": np.array(out), "x": np.array(grads[1]), "x only": np.array(x_only),
            **{k: np.array(v) for k, v in tree_flatten(grads[0])}}


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(got[name], w, rtol=TOLERANCE, atol=TOLERANCE * scale,
                                   err_msg=name)


@pytest.mark.parametrize("silu", [False, True], ids=["conv", "conv+silu"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_equal_nn_conv1d(shape, bias, silu):
    """Forward and the gradients of x, weight and bias against nn.Conv1d (+ nn.silu), the
    kernel's work split over three threads (parts that start inside a batch row: the rows before
    a part's first that its x gradient reads are recomputed there, not summed twice)."""
    b, t, c, k = shape
    conv = conv_module(c, k, bias, seed=t + c)
    keys = mx.random.split(mx.random.key(t * c + k))
    x = mx.random.normal((b, t + k - 1, c), key=keys[0]) * 2
    cot = mx.random.normal((b, t, c), key=keys[1])
    want = value_and_grads(lambda x: nn.silu(conv(x)) if silu else conv(x), conv, x, cot)
    kernels.set_threads(3)
    try:
        got = value_and_grads(lambda x: kernels.depthwise_conv1d(
            x, conv.weight, conv.get("bias"), silu), conv, x, cot)
    finally:
        kernels.set_threads(None)
    assert got["out"].shape == (b, t, c) and ("bias" in got) == bias
    assert_close(got, want)


@pytest.mark.parametrize("silu", [False, True], ids=["conv", "conv+silu"])
@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "mlx"])
def test_packed_rows_equal_each_row_alone(fused, silu):
    """With `positions` (each token's place in its packed row) the rows of one sequence, rows
    shorter than the kernel's reach among them, give each row's own values and gradients in x:
    to the bit through the kernel (the taps left are summed from the same zero), to rounding
    through MLX's ops; the weight's and bias's gradients sum the rows' in another order."""
    c, k, lengths = 21, 4, [5, 1, 2, 9, 3]
    conv = conv_module(c, k, True, seed=3)
    keys = mx.random.split(mx.random.key(4))
    x = mx.random.normal((1, sum(lengths), c), key=keys[0])
    cot = mx.random.normal((1, sum(lengths), c), key=keys[1])
    positions = mx.array([[i for n in lengths for i in range(n)]], mx.int32)
    starts = np.cumsum([0, *lengths])

    def pad(x: mx.array) -> mx.array:
        return mx.concatenate([mx.zeros((1, k - 1, c)), x], axis=1)

    def packed(x: mx.array) -> mx.array:
        return kernels.depthwise_conv1d(pad(x), conv.weight, conv.bias, silu, positions)

    def alone(x: mx.array) -> mx.array:
        return mx.concatenate([kernels.depthwise_conv1d(pad(x[:, a:a + n]), conv.weight,
                                                        conv.bias, silu)
                               for a, n in zip(starts, lengths)], axis=1)

    if not fused:
        kernels.set_mode("off")
    try:
        got, want = (value_and_grads(f, conv, x, cot) for f in (packed, alone))
        mixed = value_and_grads(lambda x: kernels.depthwise_conv1d(
            pad(x), conv.weight, conv.bias, silu), conv, x, cot)
    finally:
        kernels.set_mode("on")
    if fused:
        assert all(np.array_equal(got[n], want[n]) for n in ("out", "x", "x only"))
    assert_close(got, want)
    assert np.abs(mixed["out"] - want["out"]).max() > 0.1  # the rows' own: not the sequence's


def test_the_fused_primitive_runs_only_where_dispatch_takes_the_call():
    """Kernels on, float32 on the CPU: the extension's primitive; kernels off, another dtype or
    the op skipped: MLX's convolution, nn.Conv1d's values to the bit."""
    conv = conv_module(24, 4, True, seed=1)
    x = mx.random.normal((2, 19, 24), key=mx.random.key(2))

    def graph(out: mx.array) -> str:
        dot = io.StringIO()
        mx.export_to_dot(dot, out)
        return dot.getvalue()

    eager = kernels.depthwise_conv1d(x, conv.weight, conv.bias)
    assert "MlxlabDepthwiseConv1d" in graph(eager)
    # in a compiled step (the trainer's), with its gradient
    step = mx.compile(mx.value_and_grad(lambda x: kernels.depthwise_conv1d(
        x, conv.weight, conv.bias).square().sum()))
    value, grad = step(x)
    want_value, want_grad = mx.value_and_grad(lambda x: conv(x).square().sum())(x)
    assert abs(value.item() - want_value.item()) <= 1e-5 * abs(want_value.item())
    assert mx.allclose(grad, want_grad, rtol=1e-5, atol=1e-5).item()
    kernels.set_skip(["depthwise_conv1d"])
    try:
        skipped = kernels.depthwise_conv1d(x, conv.weight, conv.bias)
    finally:
        kernels.set_skip(None)
    kernels.set_mode("off")
    off = kernels.depthwise_conv1d(x, conv.weight, conv.bias, silu=True)
    kernels.set_mode("on")
    half = kernels.depthwise_conv1d(x.astype(mx.bfloat16), conv.weight.astype(mx.bfloat16))
    for out in (skipped, off, half):
        assert "MlxlabDepthwiseConv1d" not in graph(out)
    assert mx.array_equal(skipped, conv(x)).item()
    assert mx.array_equal(off, nn.silu(conv(x))).item()
    conv16 = nn.Conv1d(24, 24, 4, groups=24, bias=False)
    conv16.weight = conv.weight.astype(mx.bfloat16)
    assert mx.array_equal(half, conv16(x.astype(mx.bfloat16))).item()


def test_the_route_takes_only_exact_depthwise_convolutions():
    assert DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4, groups=8))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4, groups=8, padding=3))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4, groups=8, stride=2))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4, groups=8, dilation=2))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4, groups=4))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 16, 4, groups=8))
    assert not DepthwiseConv1d.takes(nn.Conv1d(8, 8, 4))


def logits_loss_grads(model: MLXLMDecoder, ids: mx.array) -> dict[str, np.ndarray]:
    """The logits, the next-token loss and every parameter's gradient, in training mode."""

    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    model.train()
    value, grads = nn.value_and_grad(model, loss)(model)
    logits = model(ids)
    mx.eval(value, grads, logits)
    return {"logits": np.array(logits), "loss": np.array(value),
            **{k: np.array(v) for k, v in tree_flatten(grads)}}


def swap_convs(model: MLXLMDecoder, cls: type) -> None:
    for m in model.lm.modules():
        if isinstance(m, nn.Conv1d):
            m.__class__ = cls


@pytest.mark.parametrize("kind", [f for f in FAMILIES if f != "gemma4_text"])
def test_a_loaded_hybrid_routes_its_convolutions(kind, tmp_path, monkeypatch):
    """A tiny transformers-saved hybrid of each family loaded by mlxlab: its short convolutions
    (every nn.Conv1d mlx-lm builds for it) are DepthwiseConv1d under the parameter names mlx-lm's
    own load gives; with the kernels on they
    run the fused kernel with the logits, loss and every gradient of the unrouted nn.Conv1d to
    float32 rounding; with them off, the routed model computes the unrouted one's to the bit."""
    folder = save_tiny_hybrid(kind, tmp_path / kind)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder))
    routed = [m for m in model.lm.modules() if isinstance(m, nn.Conv1d)]
    raw, _ = load_folder(folder)  # mlx-lm's own model, nothing routed
    convs = sum(isinstance(m, nn.Conv1d) for m in raw.modules())
    assert convs and len(routed) == convs and all(type(m) is DepthwiseConv1d for m in routed)
    assert ([n for n, _ in tree_flatten(model.lm.parameters())]
            == [n for n, _ in tree_flatten(raw.parameters())])
    ids = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 29)))
    calls = []
    original = kernels.depthwise_conv1d

    def counted(*arrays: mx.array, silu: bool = False) -> mx.array:
        if not silu:  # (the SiLU after it calls again with silu: tests/test_kernels_silu.py)
            calls.append(1)
        return original(*arrays, silu=silu)

    monkeypatch.setattr(kernels, "depthwise_conv1d", counted)
    fused = logits_loss_grads(model, ids)
    assert len(calls) == 2 * convs  # the loss's forward and the logits'
    swap_convs(model, nn.Conv1d)
    unrouted = logits_loss_grads(model, ids)
    assert_close(fused, unrouted)
    kernels.set_mode("off")
    off_unrouted = logits_loss_grads(model, ids)
    swap_convs(model, DepthwiseConv1d)
    off_routed = logits_loss_grads(model, ids)
    assert len(calls) == 2 * convs  # none with the kernels off
    for name, value in off_unrouted.items():
        np.testing.assert_array_equal(off_routed[name], value, err_msg=name)
