"""The fused kernels for the rest of a training step (mlxlab.kernels: RMSNorm, RoPE with the heads
transpose, AdamW, the global-norm clip) equal the MLX formulation they replace: values and
gradients on odd sizes, inside mx.compile, and AdamW bitwise, with interchangeable state."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlxlab import kernels
from test_kernels import both_paths, graph_text

# Every test here needs the built kernels and leaves their mode as it found it (conftest.py).
pytestmark = pytest.mark.usefixtures("fused_kernels_on")


@pytest.mark.parametrize("shape, eps", [((1, 1), 1e-5), ((3, 17), 1e-6), ((2, 5, 257), 1e-5),
                                        ((130, 300), 1e-5)])
def test_rms_norm_values_and_gradients_equal_mlx(shape, eps):
    k1, k2, k3 = mx.random.split(mx.random.key(shape[-1]), 3)
    x = mx.random.normal(shape, key=k1) * 3 + 0.5
    weight = mx.random.normal(shape[-1:], key=k2)
    cot = mx.random.normal(shape, key=k3)

    def run(x, weight):
        fn = mx.value_and_grad(lambda x, w: (kernels.rms_norm(x, w, eps) * cot).sum(), argnums=(0, 1))
        value, (dx, dw) = fn(x, weight)
        return kernels.rms_norm(x, weight, eps), value, dx, dw

    fused, ref = both_paths(run, x, weight)
    for got, want in zip(fused, ref):
        # atol: with D = 1 the exact dx is ~eps, a difference of two O(1) terms
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(want).max()))
    compiled = both_paths(mx.compile(run), x, weight)[0]  # traced with the kernels on
    for got, want in zip(compiled, fused):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("b, t, h, d, offset, scale", [
    (1, 1, 1, 2, 0, 1.0), (2, 9, 3, 8, 0, 1.0), (1, 5, 2, 6, 7, 0.25), (3, 33, 4, 64, 0, 1.0),
])
def test_rope_values_and_gradients_equal_mlx(b, t, h, d, offset, scale):
    k1, k2 = mx.random.split(mx.random.key(t * d), 2)
    x = mx.random.normal((b, t, h, d), key=k1)
    cot = mx.random.normal((b, h, t, d), key=k2)

    def rope(x):
        return kernels.rope(x, d, 10000.0, scale, offset)

    def run(x):
        value, dx = mx.value_and_grad(lambda x: (rope(x) * cot).sum())(x)
        return rope(x), value, dx

    fused, ref = both_paths(run, x)
    # The MLX path is nn.RoPE on the transposed heads, as the Attention layer had it.
    want = mx.fast.rope(x.transpose(0, 2, 1, 3), d, traditional=False, base=10000.0, scale=scale,
                        offset=offset)
    np.testing.assert_array_equal(ref[0], np.array(want))
    assert fused[0].shape == (b, h, t, d)
    for got, want in zip(fused, ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    compiled = both_paths(mx.compile(run), x)[0]
    for got, want in zip(compiled, fused):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_new_primitives_run_and_other_ropes_keep_mlx():
    from mlxlab.models.layers.blocks import Attention
    from mlxlab.models.layers.rope import make_rope

    x = mx.random.normal((2, 3, 4, 8))
    assert "MlxlabRMSNorm" in graph_text(lambda x: kernels.rms_norm(x, mx.ones((8,)), 1e-5), x)
    assert "MlxlabRope" in graph_text(lambda x: kernels.rope(x, 8, 1e4, 1.0, 0), x)
    # Partial rotary dims, bfloat16 and Llama 3 scaling take MLX's rope, with the same result.
    assert "Mlxlab" not in graph_text(lambda x: kernels.rope(x, 4, 1e4, 1.0, 0), x)
    half = x.astype(mx.bfloat16)
    np.testing.assert_array_equal(
        np.array(kernels.rope(half, 8, 1e4, 1.0, 0).astype(mx.float32)),
        np.array(nn.RoPE(8, base=1e4)(half.transpose(0, 2, 1, 3)).astype(mx.float32)))
    llama3 = make_rope(4, 5e5, {"rope_type": "llama3", "factor": 8.0})
    attention = Attention(12, 3, rope=llama3)
    h = mx.random.normal((2, 4, 12))
    assert "MlxlabRope" not in graph_text(lambda h: attention.heads(h.reshape(2, 4, 3, 4), 0), h)


def adamw_run(cls, params, grads, bias_correction, compiled, weight_decay=0.1):
    opt = cls(learning_rate=optim.cosine_decay(1e-2, 10), weight_decay=weight_decay,
              bias_correction=bias_correction)
    opt.init(params)
    apply = opt.apply_gradients
    if compiled:
        apply = mx.compile(apply, inputs=opt.state, outputs=opt.state)
    for g in grads:
        params = apply(g, params)
        mx.eval(params, opt.state)
    return opt, params


@pytest.mark.parametrize("bias_correction, compiled, weight_decay", [
    (True, True, 0.1), (True, False, 0.0), (False, True, 0.1)])
def test_adamw_equals_mlx_adamw_bitwise(bias_correction, compiled, weight_decay):
    """Bitwise, so a run can resume with the kernels on after a checkpoint written with them off
    (and back) and continue exactly; the state keeps mlx.optimizers.AdamW's names."""
    from mlx.utils import tree_flatten

    shapes = {"w": (37, 5), "b": (1,), "big": (70001,)}  # big: split over the kernel's threads
    params = {k: mx.random.normal(s, key=mx.random.key(i)) for i, (k, s) in enumerate(shapes.items())}
    grads = [{k: mx.random.normal(s, key=mx.random.key(10 * i + j)) for j, (k, s) in
              enumerate(shapes.items())} for i in range(4)]
    ref_opt, ref = adamw_run(optim.AdamW, params, grads, bias_correction, compiled, weight_decay)
    opt, got = adamw_run(kernels.AdamW, params, grads, bias_correction, compiled, weight_decay)
    for k in shapes:
        np.testing.assert_array_equal(np.array(got[k]), np.array(ref[k]), err_msg=k)
    ref_state, state = dict(tree_flatten(ref_opt.state)), dict(tree_flatten(opt.state))
    assert state.keys() == ref_state.keys()
    for k in state:
        np.testing.assert_array_equal(np.array(state[k]), np.array(ref_state[k]), err_msg=k)
    mx.eval(got)
    assert "MlxlabAdamW" in graph_text(lambda g: opt.apply_gradients({"w": g}, {"w": got["w"]})["w"],
                                       grads[0]["w"])


def test_the_trainer_builds_the_fused_adamw_and_falls_back_when_off():
    from mlxlab.training.optim import LRSchedule, build_optimizer, default_optimizer

    opt = build_optimizer(partial(default_optimizer(), learning_rate=3e-3), LRSchedule(), 10)
    assert type(opt) is kernels.AdamW and opt.bias_correction and opt.weight_decay == 0.01
    other = build_optimizer(partial(optim.Adam, learning_rate=1e-3), LRSchedule(), 10)
    assert type(other) is optim.Adam
    p, g = {"w": mx.random.normal((3, 4))}, {"w": mx.random.normal((3, 4))}
    kernels.set_mode("off")
    off = opt.apply_gradients(g, p)["w"]
    assert "Mlxlab" not in graph_text(lambda x: x, off)
    kernels.set_mode("on")
    ref = optim.AdamW(learning_rate=opt.learning_rate, weight_decay=0.01, bias_correction=True)
    np.testing.assert_array_equal(np.array(off), np.array(ref.apply_gradients(g, p)["w"]))
    bf16 = {"w": p["w"].astype(mx.bfloat16)}
    out = kernels.AdamW(learning_rate=1e-3).apply_gradients({"w": g["w"].astype(mx.bfloat16)}, bf16)
    assert out["w"].dtype == mx.bfloat16  # MLX's update for other dtypes


def clip_grads() -> dict:
    """Gradients of odd sizes, one over the kernel's split between threads, one a transposed
    (not row-contiguous) view, nested as a model's are."""
    k = mx.random.split(mx.random.key(5), 4)
    return {"w": mx.random.normal((37, 5), key=k[0]), "b": [mx.random.normal((1,), key=k[1])],
            "big": {"x": mx.random.normal((70001,), key=k[2]) * 0.01},
            "t": mx.random.normal((6, 9), key=k[3]).T}


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("compiled", [False, True])
def test_clip_grad_norm_equals_mlx(max_norm, compiled):
    """Scaled (0.5: the norm is ~4) and left as they are (1e9: scale 1, bitwise). The norm is
    summed in float64 by the kernel, float32 by MLX: equal to float32's rounding."""
    from mlx.utils import tree_flatten

    grads = clip_grads()
    clip = mx.compile(kernels.clip_grad_norm) if compiled else kernels.clip_grad_norm
    got, norm = clip(grads, max_norm)
    want, ref_norm = optim.clip_grad_norm(grads, max_norm)
    np.testing.assert_allclose(np.array(norm), np.array(ref_norm), rtol=1e-6)
    got, want = dict(tree_flatten(got)), dict(tree_flatten(want))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape
        if max_norm > 1:
            np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=k)
        else:
            np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=2e-6,
                                       atol=1e-9, err_msg=k)
    again = dict(tree_flatten(clip(grads, max_norm)[0]))
    for k in got:  # the same sums every call: resumes are bitwise
        np.testing.assert_array_equal(np.array(again[k]), np.array(got[k]))
    flat = [g for _, g in tree_flatten(grads)]
    assert "MlxlabClipGlobalNorm" in graph_text(lambda g: kernels.clip_grad_norm(g, max_norm)[1],
                                                flat)


def test_clip_grad_norm_off_returns_the_gradients_and_their_norm():
    grads = clip_grads()
    for mode in ("on", "off"):
        kernels.set_mode(mode)
        same, norm = kernels.clip_grad_norm(grads, 0.0)
        assert same is grads
        ref = np.sqrt(sum(float((np.array(g, dtype=np.float64) ** 2).sum()) for g in
                          (grads["w"], grads["b"][0], grads["big"]["x"], grads["t"])))
        np.testing.assert_allclose(float(norm), ref, rtol=1e-6)
    kernels.set_mode("on")


def test_kernels_take_strided_inputs_without_a_contiguous_node():
    """The ops copy a strided input inside their own evaluation: a transposed, a broadcast and a
    sliced input give MLX's values, and the graph holds no Contiguous node."""
    x = mx.random.normal((9, 16), key=mx.random.key(1))
    weight = mx.random.normal((16,), key=mx.random.key(2))
    views = {"transposed": mx.random.normal((16, 9), key=mx.random.key(3)).T,
             "broadcast": mx.broadcast_to(x[:1], (9, 16)), "sliced": mx.random.normal(
                 (9, 40), key=mx.random.key(4))[:, 3:19]}
    for name, v in views.items():
        got = kernels.rms_norm(v, weight, 1e-5)
        want = mx.fast.rms_norm(mx.array(np.array(v)), weight, 1e-5)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=2e-6,
                                   err_msg=name)
        assert "Contiguous" not in graph_text(lambda a: kernels.rms_norm(a, weight, 1e-5), v)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 9, 3, 8), (3, 33, 4, 64)])
def test_heads_transposes_equal_mlx_exactly(shape):
    x = mx.random.normal(shape, key=mx.random.key(shape[1]))
    cot = mx.random.normal((shape[0], shape[1], shape[2] * shape[3]))

    def run(x):
        def f(x):
            return kernels.merge_heads(kernels.split_heads(x) * 2.0)

        value, dx = mx.value_and_grad(lambda x: (f(x) * cot).sum())(x)
        return kernels.split_heads(x), f(x), value, dx

    fused, ref = both_paths(run, x)
    for got, want in zip(fused, ref):
        np.testing.assert_array_equal(got, want)
    assert "MlxlabSwapHeads" in graph_text(kernels.split_heads, x)


def test_lora_step_on_a_grouped_query_llama_equals_mlx():
    """The LoRA fine-tune's loss and adapter gradients on a grouped-query Llama (4 query / 2
    key-value heads, adapters on q/k/v/o) with the kernels on (the fused grouped attention)
    equal those with them off (MLX's SDPA and ops), to float32 rounding: the fused grouped
    attention's speed on long rows must not change them."""
    from mlx.utils import tree_flatten

    from mlxlab.models.adapters.lora import LoRALinear
    from mlxlab.models.decoders.transformer import Transformer
    from mlxlab.objectives import losses

    mx.random.seed(3)
    model = Transformer(vocab_size=61, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        max_seq_len=64, tie_embeddings=False,
                        lora={"rank": 4, "targets": ["query", "key", "value", "out"]})
    # B starts at zero (no gradient reaches A); give the adapters a value so both get one
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)
    ids = mx.random.randint(0, 61, (3, 41))
    mask = (mx.arange(40)[None] >= mx.array([[0], [5], [17]])).astype(mx.float32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask}
    loss_and_grad = nn.value_and_grad(model, losses.task_loss("lm"))

    def run():
        (loss, _), grads = loss_and_grad(model, batch)
        return [loss, *(g for _, g in sorted(tree_flatten(grads)))]

    fused, ref = both_paths(run)
    assert len(fused) == 1 + 2 * 4 * 2  # the loss, A and B of 4 adapters in 2 layers
    for got, want in zip(fused, ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    att = model.layers[0].attention
    q, k, v = att.project(mx.random.normal((1, 5, 32)))
    assert "MlxlabSoftmax" in graph_text(lambda x: kernels.attention(x, k, v, att.scale), q)
