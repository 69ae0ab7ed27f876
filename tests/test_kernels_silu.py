"""The SiLU through the fused kernel (kernels.silu, csrc/silu.cpp): nn.silu's values and gradient
to the bit on odd sizes and in the exp's tails, split over several threads, eager and compiled;
a loaded mlx-lm hybrid's `nn.silu(conv(...))` calls reach it (models/decoders/mlx_lm_fused.py
ROUTED_NN) with the unrouted model's logits, loss and gradients, and with the kernels off or the
op skipped run mlx-lm's own nn.silu, the unrouted model's to the bit."""

from __future__ import annotations

import io
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hybrid_families import FAMILIES, save_tiny_hybrid
from mlxlab import kernels
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.mlx_lm_fused import (
    ORIGINALS,
    ROUTED_NN,
    DepthwiseConv1d,
    use_fused_kernels,
)
from test_kernels_depthwise_conv import logits_loss_grads

pytestmark = pytest.mark.usefixtures("fused_kernels_on")

# odd sizes (a vector block's tail, one element), and scales whose tails pass the exp's cut-offs
# at +-88 (sigmoid 0 or 1 exactly)
SHAPES = [((1,), 1.0), ((7,), 3.0), ((3, 1023), 1.0), ((2, 37, 45), 30.0), ((5, 4099), 100.0)]


def graph(out: mx.array) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    return dot.getvalue()


def value_and_grad(silu, x: mx.array, cot: mx.array) -> list[np.ndarray]:
    """silu(x), and the gradient of sum(silu(x) * cot) in x, eager and through mx.compile."""
    grad = mx.grad(lambda x: (silu(x) * cot).sum())
    out = [silu(x), grad(x), mx.compile(grad)(x)]
    mx.eval(out)
    return [np.array(a) for a in out]


@pytest.mark.parametrize("shape, scale", SHAPES, ids=lambda s: str(s))
def test_values_and_gradients_equal_nn_silu_to_the_bit(shape, scale):
    """nn.silu's values and autodiff gradient, MLX's sigmoid and exp op for op, on three
    threads (parts that end inside a vector block)."""
    k1, k2 = mx.random.split(mx.random.key(shape[-1]))
    x = mx.random.normal(shape, key=k1) * scale
    cot = mx.random.normal(shape, key=k2)
    want = value_and_grad(nn.silu, x, cot)
    kernels.set_threads(3)
    try:
        got = value_and_grad(kernels.silu, x, cot)
    finally:
        kernels.set_threads(None)
    for name, g, w in zip(("value", "gradient", "compiled gradient"), got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_an_input_with_other_uses_gets_its_gradient_to_float32_rounding():
    """Where x reaches the loss through more than the SiLU, MLX adds the SiLU's two gradient
    parts to the rest one at a time and the kernel adds them first: float32 rounding apart."""
    k1, k2 = mx.random.split(mx.random.key(5))
    x = mx.random.normal((3, 515), key=k1) * 4
    cot = mx.random.normal((3, 515), key=k2)

    def grad(silu):
        return mx.grad(lambda x: ((silu(x) + mx.exp(x) * x) * cot).sum())(x)

    got, want = grad(kernels.silu), grad(nn.silu)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


def test_the_fused_primitive_runs_only_where_dispatch_takes_the_call():
    """Kernels on, float32 on the CPU: the extension's primitive (a transposed input too);
    kernels off, another dtype or the op skipped: nn.silu itself."""
    x = mx.random.normal((19, 24), key=mx.random.key(2)) * 5
    assert "MlxlabSilu" in graph(kernels.silu(x))
    assert mx.array_equal(kernels.silu(x.T), nn.silu(x.T)).item()
    kernels.set_skip(["silu"])
    try:
        skipped = kernels.silu(x)
    finally:
        kernels.set_skip(None)
    kernels.set_mode("off")
    off = kernels.silu(x)
    kernels.set_mode("on")
    half = kernels.silu(x.astype(mx.bfloat16))
    for out, want in ((skipped, nn.silu(x)), (off, nn.silu(x)),
                      (half, nn.silu(x.astype(mx.bfloat16)))):
        assert "MlxlabSilu" not in graph(out)
        assert mx.array_equal(out, want).item()


def test_routed_nn_is_mlx_nn_but_for_silu():
    """What a routed mlx-lm module finds under `nn`: mlx.nn's own names (classes, functions,
    submodules), and a silu wrapper recorded as wrapping mlx.nn.silu."""
    assert ROUTED_NN.Conv1d is nn.Conv1d and ROUTED_NN.Module is nn.Module
    assert ROUTED_NN.gelu is nn.gelu and ROUTED_NN.layers is nn.layers
    assert ROUTED_NN.silu is not nn.silu and ORIGINALS[ROUTED_NN.silu] is nn.silu
    with pytest.raises(AttributeError):
        ROUTED_NN.no_such_name  # noqa: B018


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def routed_modules(model: MLXLMDecoder) -> list:
    """The mlx-lm modules of `model`'s classes whose `nn` is ROUTED_NN."""
    names = {cls.__module__ for m in model.lm.modules() for cls in type(m).__mro__}
    return [sys.modules[n] for n in sorted(names) if vars(sys.modules[n]).get("nn") is ROUTED_NN]


# every family whose mixer has a short convolution (LFM2's is gated by a product: no SiLU)
SILU_FAMILIES = [f for f in FAMILIES if f not in ("gemma4_text", "lfm2")]


def unrouted(model: MLXLMDecoder, ids: mx.array, modules: list, monkeypatch: pytest.MonkeyPatch,
             calls: list | None = None) -> dict[str, np.ndarray]:
    """logits_loss_grads with `modules` as mlx-lm made them (`nn` is mlx.nn), each nn.silu call
    their code makes counted in `calls` (not those of mlx-lm's compiled activations, which
    call it once, when traced)."""
    mlx_silu, names = nn.silu, {m.__name__ for m in modules}

    def silu(x: mx.array) -> mx.array:
        if sys._getframe(1).f_globals.get("__name__") in names:
            calls.append(1)
        return mlx_silu(x)

    with monkeypatch.context() as patch:
        for module in modules:
            patch.setitem(vars(module), "nn", nn)
        if calls is not None:
            patch.setattr(nn, "silu", silu)
        return logits_loss_grads(model, ids)


@pytest.mark.parametrize("kind", SILU_FAMILIES)
def test_a_loaded_hybrids_silu_calls_take_the_kernel(kind, tmp_path, monkeypatch):
    """A tiny transformers-saved hybrid of each family loaded by mlxlab: the mlx-lm module
    holding its short convolutions sees ROUTED_NN as `nn` (once: routing it again changes
    nothing); with the kernels on, each nn.silu call mlx-lm's code makes (as many as the
    unrouted module makes) is kernels.silu, or where its input is the routed convolution's
    output the convolution with its SiLU fused, with the logits, loss and every gradient of the
    unrouted model to the bit (each SiLU's input is a convolution's or a projection's output
    used by nothing else); with the kernels off or the op skipped, no kernel call and the
    unrouted model's bits."""
    folder = save_tiny_hybrid(kind, tmp_path / kind)
    model = MLXLMDecoder(vocab_size=0, pretrained=str(folder))
    modules = routed_modules(model)
    holders = {type(m).__module__ for m in model.lm.modules()
               if any(isinstance(c, DepthwiseConv1d)
                      for _, c in tree_flatten(m.children(), is_leaf=nn.Module.is_module))}
    assert holders and holders <= {m.__name__ for m in modules}
    routed = use_fused_kernels(model.lm)  # a second routing (another model) wraps nothing again
    assert use_fused_kernels(model.lm) == routed and routed_modules(model) == modules
    ids = mx.array(np.random.default_rng(0).integers(0, model.vocab_size, (2, 29)))
    fused_calls, mlx_calls, paired = [], [], []
    silu, conv = kernels.silu, kernels.depthwise_conv1d
    monkeypatch.setattr(kernels, "silu", lambda x: fused_calls.append(1) or silu(x))

    def fused_conv(*arrays: mx.array, silu: bool = False) -> mx.array:
        if silu:  # a SiLU of the convolution that ran last: both in one kernel call
            fused_calls.append(1)
            paired.append(1)
        return conv(*arrays, silu=silu)

    monkeypatch.setattr(kernels, "depthwise_conv1d", fused_conv)
    fused = logits_loss_grads(model, ids)
    want = unrouted(model, ids, modules, monkeypatch, mlx_calls)
    assert fused_calls and len(fused_calls) == len(mlx_calls) and paired
    assert_same(fused, want)
    kernels.set_skip(["silu"])
    try:
        assert_same(logits_loss_grads(model, ids), want)
    finally:
        kernels.set_skip(None)
    kernels.set_mode("off")
    assert_same(logits_loss_grads(model, ids), unrouted(model, ids, modules, monkeypatch))
    assert len(fused_calls) == len(mlx_calls)  # none skipped or off
