"""The blocked attention kernel (kernels.blocked_attention, csrc/blocked_attention.cpp) against
mx.fast.scaled_dot_product_attention: output and every gradient within 1e-5 of the reference's
largest value (float32 rounding: its sums run in other orders), over lengths that are and are not
multiples of the block, cross-attention (T_q != T_kv), a one-token query, causal, additive, per-row
and key-padding masks (a row with no key left), grouped-query heads; its causal flag against SDPA's
mask="causal"; kernels.attention takes it from BLOCKED_MIN_KEYS keys on; and it never holds the
(B, H, T_q, T_kv) scores, nor with the causal flag a (T_q, T_kv) mask."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from mlxlab import kernels
from mlxlab.kernels import dispatch, ops
from mlxlab.runtime.compute import blas

pytestmark = pytest.mark.usefixtures("fused_kernels_on")


@pytest.fixture
def module():
    """The compiled module with MLX's batched sgemm set; skipped where MLX's BLAS has none (the
    kernel calls the BLAS's products)."""
    batch = blas.mlx_sgemm_batch()
    if not batch:
        pytest.skip("MLX's BLAS has no cblas_sgemm_batch_strided here")
    ext = dispatch.extension()
    ext.set_sgemm_batch(batch)
    ext.set_blas_local_threads(blas.mlx_blas_local_threads() or 0)  # MKL: its calls stay on ours
    return ext


def inputs(b, h, h_kv, t_q, t_kv, d, seed=0):
    ks = mx.random.split(mx.random.key(seed + t_q * 31 + t_kv), 4)
    q = mx.random.normal((b, h, t_q, d), key=ks[0]) * 2
    k = mx.random.normal((b, h_kv, t_kv, d), key=ks[1]) * 2
    v = mx.random.normal((b, h_kv, t_kv, d), key=ks[2])
    cot = mx.random.normal((b, h, t_q, d), key=ks[3])
    return q, k, v, cot


def sdpa_mask(kind, b, t_q, t_kv):
    """The mask as attention() and SDPA take it: causal (T_q, T_kv) additive (the last T_q keys
    end at the query's own position), keys (B, 1, 1, T_kv) boolean whose last row keeps no key,
    rows (B, 1, T_q, T_kv) additive, bias (T_q, T_kv) additive random."""
    from mlxlab.kernels import causal_additive_mask
    from mlxlab.models.layers.blocks import padding_mask

    if kind is None:
        return None
    if kind == "causal":
        return causal_additive_mask(t_q, t_kv)
    if kind == "keys":
        lengths = mx.array([t_kv - 3 * i for i in range(b - 1)] + [0])
        return padding_mask(mx.arange(t_kv)[None] < lengths[:, None])
    if kind == "rows":
        return mx.random.normal((b, 1, t_q, t_kv), key=mx.random.key(7)) * 3
    return mx.random.normal((t_q, t_kv), key=mx.random.key(8)) * 3


def as_blocked(mask):
    """The mask as the kernel takes it: additive float32 (1 or B, 1 or T_q, T_kv)."""
    if mask is None:
        return None
    if mask.dtype == mx.bool_:
        mask = mx.where(mask, 0.0, mx.finfo(mx.float32).min)
    return mask[None] if mask.ndim == 2 else mask.reshape(mask.shape[0], *mask.shape[2:])


def value_and_grads(attend, cot, q, k, v):
    fn = mx.value_and_grad(lambda q, k, v: (attend(q, k, v) * cot).sum(), argnums=(0, 1, 2))
    value, grads = fn(q, k, v)
    return [np.array(a) for a in (attend(q, k, v), value, *grads)]


def assert_close(got_all, want_all):
    for name, got, want in zip(("out", "value", "dq", "dk", "dv", "dmask"), got_all, want_all):
        assert np.isfinite(got).all(), name
        scale = max(np.abs(want).max(), 1e-30)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize(
    "b, h, h_kv, t_q, t_kv, d, kind, block",
    [
        (2, 2, 2, 48, 48, 16, None, 16),  # T a multiple of the block
        (2, 2, 2, 37, 37, 16, None, 16),  # a partial last block
        (1, 4, 2, 21, 53, 8, "causal", 8),  # cross lengths, grouped heads, causal
        (2, 4, 1, 1, 70, 32, None, 16),  # decoding's one-token query, one key/value head
        (3, 2, 2, 19, 19, 8, "keys", 4),  # key padding, the last row with no key at all
        (2, 2, 2, 20, 33, 16, "rows", 16),  # an additive mask per batch row
        (1, 6, 3, 40, 17, 64, "bias", 32),  # an additive (T_q, T_kv) bias, D = 64
        (1, 1, 1, 5, 3, 128, None, 64),  # fewer rows than a block, D = 128
    ],
)
def test_blocked_attention_equals_sdpa(module, b, h, h_kv, t_q, t_kv, d, kind, block):
    q, k, v, cot = inputs(b, h, h_kv, t_q, t_kv, d)
    mask = sdpa_mask(kind, b, t_q, t_kv)
    scale = d**-0.5
    got = value_and_grads(
        lambda q, k, v: module.blocked_attention(q, k, v, as_blocked(mask), scale, block),
        cot,
        q,
        k,
        v,
    )
    want = value_and_grads(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
        cot,
        q,
        k,
        v,
    )
    assert_close(got, want)


@pytest.mark.parametrize(
    "b, h, h_kv, t_q, t_kv, d, block",
    [
        (2, 2, 2, 48, 48, 16, 16),  # T a multiple of the block
        (1, 4, 2, 37, 37, 16, 16),  # a partial last block, grouped heads
        (1, 4, 2, 21, 53, 8, 8),  # T_q < T_kv (the diagonal starts at key 32), partial blocks
        (1, 6, 3, 32, 64, 64, 16),  # T_q < T_kv, block multiples, D = 64
        (2, 4, 1, 1, 70, 32, 16),  # decoding's one-token query: every key
        (1, 2, 2, 5, 5, 128, 64),  # fewer rows than a block, D = 128
    ],
)
def test_the_causal_flag_equals_sdpa_causal(module, b, h, h_kv, t_q, t_kv, d, block):
    """causal=True with no mask array computes SDPA's mask="causal" (query row i reads keys
    j <= i + T_kv - T_q), output and q/k/v gradients, though it never multiplies the keys
    above the diagonal."""
    q, k, v, cot = inputs(b, h, h_kv, t_q, t_kv, d, seed=13)
    scale = d**-0.5
    got = value_and_grads(
        lambda q, k, v: module.blocked_attention(q, k, v, None, scale, block, True), cot, q, k, v
    )
    want = value_and_grads(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal"),
        cot,
        q,
        k,
        v,
    )
    assert_close(got, want)


def test_attention_takes_causal_as_the_blocked_kernels_flag(module, monkeypatch):
    """kernels.attention(mask="causal") runs the blocked kernel's causal path from
    BLOCKED_MIN_KEYS keys on (SDPA's values and gradients), and below that, or with more queries
    than keys, MLX's bits for SDPA's mask="causal"."""
    monkeypatch.setattr(ops, "BLOCKED_MIN_KEYS", 24)
    for t_q, t_kv in ((25, 25), (9, 30)):
        q, k, v, cot = inputs(2, 4, 2, t_q, t_kv, 16, seed=17)
        want = value_and_grads(
            partial(mx.fast.scaled_dot_product_attention, scale=0.25, mask="causal"), cot, q, k, v
        )
        got = value_and_grads(partial(kernels.attention, scale=0.25, mask="causal"), cot, q, k, v)
        assert_close(got, want)
        assert "MlxlabBlockedAttention" in graph(q, k, v, "causal")
    for t_q, t_kv in ((23, 23), (9, 20), (30, 25)):  # too few keys; more queries than keys
        q, k, v, cot = inputs(2, 4, 2, t_q, t_kv, 16, seed=19)
        assert "MlxlabBlockedAttention" not in graph(q, k, v, "causal")
        got = kernels.attention(q, k, v, 0.25, "causal")
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
        assert mx.array_equal(got, want).item()
        assert not mx.isnan(got).any().item()  # (30, 25): a query row with no key, not NaN


@pytest.mark.parametrize("mode", ["on", "off"])
def test_causal_equals_the_additive_mask(module, mode):
    """mask="causal" computes what the explicit causal_additive_mask array computes, output and
    q/k/v gradients: to the bit below BLOCKED_MIN_KEYS (the whole-scores path, given that very
    array) and with the kernels off (MLX's SDPA given it), to float32 rounding from
    BLOCKED_MIN_KEYS keys on, where the blocked kernel skips the keys above the diagonal instead
    of adding -inf to them."""
    kernels.set_mode(mode)
    for t_q, t_kv in ((ops.BLOCKED_MIN_KEYS - 1,) * 2, (40, ops.BLOCKED_MIN_KEYS - 1),
                      (ops.BLOCKED_MIN_KEYS,) * 2, (40, ops.BLOCKED_MIN_KEYS + 9)):
        q, k, v, cot = inputs(1, 2, 1, t_q, t_kv, 16, seed=29)
        additive = kernels.causal_additive_mask(t_q, t_kv)
        got = value_and_grads(partial(kernels.attention, scale=0.25, mask="causal"), cot, q, k, v)
        want = value_and_grads(partial(kernels.attention, scale=0.25, mask=additive),
                               cot, q, k, v)
        blocked = mode == "on" and t_kv >= ops.BLOCKED_MIN_KEYS
        assert ("MlxlabBlockedAttention" in graph(q, k, v, "causal")) == blocked
        if blocked:
            assert_close(got, want)
        else:
            for name, a, b in zip(("out", "value", "dq", "dk", "dv"), got, want):
                np.testing.assert_array_equal(a, b, err_msg=name)


def test_the_causal_flag_holds_no_mask(module):
    """A causal step over 4096 tokens through kernels.attention peaks far below the (T, T)
    float32 mask it used to build (64 MiB; the one head's q, k, v, output and gradients are
    1.5 MiB)."""
    t, d = 4096, 16
    q, k, v, cot = inputs(1, 1, 1, t, t, d, seed=23)
    mx.eval(q, k, v, cot)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    grads = mx.grad(
        lambda q, k, v: (kernels.attention(q, k, v, d**-0.5, "causal") * cot).sum(),
        argnums=(0, 1, 2),
    )(q, k, v)
    mx.eval(grads)
    assert mx.get_peak_memory() - before < t * t * 4 / 16


def test_a_learned_bias_gets_its_gradient(module):
    """An additive mask that is itself trained (a position bias) gets d loss / d mask: summed
    over the heads (and the batch, for a (T_q, T_kv) one) as SDPA's autodiff gives it."""
    q, k, v, cot = inputs(2, 4, 2, 23, 29, 16, seed=3)
    for bias in (sdpa_mask("bias", 2, 23, 29), sdpa_mask("rows", 2, 23, 29)):
        got = mx.grad(
            lambda m: (module.blocked_attention(q, k, v, as_blocked(m), 0.25, 8) * cot).sum()
        )(bias)
        want = mx.grad(
            lambda m: (
                mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m) * cot
            ).sum()
        )(bias)
        assert_close([np.array(got).reshape(want.shape)], [np.array(want)])


@pytest.mark.parametrize("kind", [None, "causal", "keys", "rows"])
def test_attention_takes_the_blocked_kernel_from_min_keys(module, monkeypatch, kind):
    """kernels.attention sends T_kv >= BLOCKED_MIN_KEYS to the blocked kernel with its mask as
    given (boolean key padding, (T_q, T_kv), (B, 1, T_q, T_kv)), shorter ones to the whole-scores
    path, and `blocked_attention` in set_skip keeps the whole-scores path."""
    monkeypatch.setattr(ops, "BLOCKED_MIN_KEYS", 24)
    q, k, v, cot = inputs(3, 4, 2, 25, 25, 16, seed=5)
    mask = sdpa_mask(kind, 3, 25, 25)
    want = value_and_grads(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask),
        cot,
        q,
        k,
        v,
    )
    assert_close(
        value_and_grads(partial(kernels.attention, scale=0.25, mask=mask), cot, q, k, v), want
    )
    assert "MlxlabBlockedAttention" in graph(q, k, v, mask)
    kernels.set_skip(["blocked_attention"])
    try:
        assert "MlxlabBlockedAttention" not in graph(q, k, v, mask)
    finally:
        kernels.set_skip(None)
    short = inputs(3, 4, 2, 25, 23, 16)
    short_mask = None if kind is None else sdpa_mask(kind, 3, 25, 23)
    assert "MlxlabBlockedAttention" not in graph(*short[:3], short_mask)


def graph(q, k, v, mask) -> str:
    import io

    out = io.StringIO()
    mx.export_to_dot(out, kernels.attention(q, k, v, 0.25, mask))
    return out.getvalue()


def test_the_scores_are_never_whole(module):
    """Forward and backward of a 1024-token attention peak well below its (B, H, T, T) scores
    (32 MiB here): the kernel holds a block of rows a thread, outside MLX's allocator, and MLX
    holds the inputs, the output, the row statistics and the gradients."""
    b, h, t, d = 2, 4, 1024, 32
    q, k, v, cot = inputs(b, h, h, t, t, d, seed=9)
    mx.eval(q, k, v, cot)
    scores_bytes = b * h * t * t * 4
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    grads = mx.grad(
        lambda q, k, v: (module.blocked_attention(q, k, v, None, d**-0.5, 64) * cot).sum(),
        argnums=(0, 1, 2),
    )(q, k, v)
    mx.eval(grads)
    assert mx.get_peak_memory() - before < scores_bytes / 4


def test_bad_shapes_are_refused(module):
    q = mx.zeros((1, 4, 8, 16))
    with pytest.raises(ValueError, match="H_kv"):
        module.blocked_attention(q, mx.zeros((1, 3, 8, 16)), mx.zeros((1, 3, 8, 16)), None, 1.0)
    with pytest.raises(ValueError, match="mask"):
        module.blocked_attention(q, q, q, mx.zeros((1, 8, 7)), 1.0)
    with pytest.raises(ValueError, match="block"):
        module.blocked_attention(q, q, q, None, 1.0, 0)
    with pytest.raises(ValueError, match="causal"):  # a mask with the flag
        module.blocked_attention(q, q, q, mx.zeros((1, 8, 8)), 1.0, 4, True)
    with pytest.raises(ValueError, match="causal"):  # more queries than keys
        module.blocked_attention(q, q[:, :, :5], q[:, :, :5], None, 1.0, 4, True)


def test_a_compiled_step_equals_the_eager_one(module, monkeypatch):
    """mx.compile traces the blocked kernel and its backward as they are: the compiled value and
    gradients are the eager ones to the bit."""
    monkeypatch.setattr(ops, "BLOCKED_MIN_KEYS", 8)
    q, k, v, cot = inputs(2, 4, 4, 33, 33, 16, seed=11)
    step = mx.value_and_grad(
        lambda q, k, v: (kernels.attention(q, k, v, 0.25, None) * cot).sum(), argnums=(0, 1, 2)
    )
    eager, compiled = step(q, k, v), mx.compile(step)(q, k, v)
    for got, want in zip([compiled[0], *compiled[1]], [eager[0], *eager[1]]):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    assert "MlxlabBlockedAttention" in graph(q, k, v, None)


MKL_PROBE = """
import mlx.core as mx, numpy as np
from mlxlab import kernels
from mlxlab.kernels import ops
from mlxlab.runtime.compute import blas
kernels.set_mode("on")
ops.BLOCKED_MIN_KEYS = 8
ks = mx.random.split(mx.random.key(2), 4)
q, k, v, cot = (mx.random.normal((2, 4, 45, 16), key=key) for key in ks)
def grads(attend):
    return mx.value_and_grad(lambda q, k, v: (attend(q, k, v) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
got = grads(lambda q, k, v: kernels.attention(q, k, v, 0.25, None))
want = grads(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25))
out = __import__("io").StringIO()
mx.export_to_dot(out, kernels.attention(q, k, v, 0.25, None))
err = max(float(mx.abs(a - b).max() / mx.abs(b).max())
          for a, b in zip([got[0], *got[1]], [want[0], *want[1]]))
print(blas.mlx_gemm_library(), "MlxlabBlockedAttention" in out.getvalue(), err)
"""


def test_mkl_serving_mlx_runs_it_on_the_kernels_threads(module):
    """Where MKL serves MLX, the kernel's threads run its batched sgemm alone
    (MKL_Set_Num_Threads_Local): the blocked path runs, with SDPA's values and gradients."""
    import os
    import subprocess
    import sys

    from mlxlab.runtime.compute import mkl

    if mkl.mkl_directory() is None:
        pytest.skip("the optional mkl package is not installed (pip install 'mlxlab[mkl]')")
    env = {**os.environ, "MLXLAB_BLAS": "mkl"}
    done = subprocess.run(
        [sys.executable, "-c", MKL_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    library, blocked, err = done.stdout.split()[-3:]
    assert "mkl" in library.lower() and blocked == "True"
    assert float(err) < 1e-5
