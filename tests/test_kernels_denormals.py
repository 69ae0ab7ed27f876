"""trainer.flush_denormals (kernels/denormals.py): flush-to-zero on MLX's CPU thread and the
kernels' pool workers turns denormal results into 0 and nothing else, and a fit sets it for its
run and restores it after."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import CLASSIFIER_RUN
from mlxlab import kernels
from mlxlab.errors import ConfigError
from mlxlab.kernels import build
from mlxlab.runtime.compute import blas
from mlxlab.training.settings import TrainerSettings

TINY = 1e-32  # normal; TINY * 1e-9 * 64 is below float32's smallest normal (1.2e-38)


@pytest.fixture(autouse=True)
def flush_off():
    """Each test starts with the mode off (the default of a fresh thread) and leaves it off."""
    reason = build.unsupported_reason()
    if reason:
        pytest.skip(f"fused kernels not built here: {reason}")
    kernels.flush_denormals(False)
    yield
    kernels.flush_denormals(False)


@pytest.fixture
def blas_on_the_calling_thread():
    """The BLAS on one thread for the test: the mode is the calling thread's, and a product the
    BLAS splits over workers of its own (which this machine's measured small-product threshold
    decides for a 64 x 64 one) is flushed only in the caller's part."""
    before = blas.blas_threads()
    if before is None or not blas.set_blas_threads(1):
        pytest.skip("the BLAS serving MLX has no thread control here")
    yield
    blas.set_blas_threads(before)


def test_flush_turns_denormal_results_to_zero_and_says_what_it_was(blas_on_the_calling_thread):
    a = mx.full((64, 64), TINY)
    b = mx.full((64, 64), 1e-9)
    mx.eval(a, b)
    kept = np.array(a @ b)  # 64 * 1e-41: a denormal sum, kept
    assert 0 < kept.max() < np.finfo(np.float32).tiny
    assert kernels.flush_denormals(True) is False
    assert np.array(a @ b).max() == 0.0  # the same product, flushed
    normal = mx.random.normal((64, 64))
    np.testing.assert_array_equal(np.array(normal @ normal.T), np.array(normal @ normal.T))
    assert kernels.flush_denormals(True) is True
    assert kernels.flush_denormals(False) is True
    assert np.array(a @ b).max() > 0.0  # off again


def test_the_kernels_pool_workers_take_the_callers_mode():
    """A kernel split over two threads flushes in every part: a denormal gate reads as 0
    (silu(0) * 1 = 0) on the worker's rows too, so the result does not depend on the threads."""
    before = kernels.threads()
    kernels.set_threads(2)
    try:
        gate = mx.full((1 << 20,), 1e-39)  # denormal
        up = mx.ones((1 << 20,))
        mx.eval(gate, up)
        assert np.count_nonzero(np.array(kernels.swiglu(gate, up))) == 1 << 20
        kernels.flush_denormals(True)
        assert np.count_nonzero(np.array(kernels.swiglu(gate, up))) == 0
    finally:
        kernels.set_threads(before)


def test_peaked_attention_gradients_are_unchanged_by_the_flush():
    """The case it is for: a peaked softmax (probabilities down to ~1e-38) under a small
    cotangent. With the flush the score gradients' denormals are 0; the gradients of q, k, v
    equal the unflushed ones to float32 rounding."""
    mx.random.seed(0)
    q, k, v = (mx.random.normal((2, 4, 64, 16)) * 4 for _ in range(3))
    cot = mx.random.normal((2, 4, 64, 16)) * 1e-7
    mx.eval(q, k, v, cot)

    def grads():
        f = mx.grad(lambda q, k, v: (kernels.attention(q, k, v, 0.25) * cot).sum(), (0, 1, 2))
        return [np.array(g) for g in f(q, k, v)]

    # the case is real: the score gradients p * (dp - sum p dp) of these inputs are denormal
    # in places (float64 here, so nothing is flushed on the way)
    q64, k64, v64, cot64 = (np.array(a, dtype=np.float64) for a in (q, k, v, cot))
    scores = q64 @ k64.swapaxes(-1, -2) * 0.25
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = cot64 @ v64.swapaxes(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    tiny = np.finfo(np.float32).tiny
    assert ((np.abs(ds) < tiny) & (ds != 0)).sum() > 100

    kernels.set_mode("on")
    try:
        plain = grads()
        kernels.flush_denormals(True)
        flushed = grads()
    finally:
        kernels.flush_denormals(False)  # the next test on this worker starts unflushed
        kernels.set_mode("auto")
    for a, b in zip(plain, flushed):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-30)


def test_a_fit_flushes_during_its_run_and_restores_after(make_cfg, monkeypatch):
    from mlxlab.train import train

    calls = []
    real = kernels.flush_denormals

    def recorded(on: bool) -> bool | None:  # the real call, recorded
        calls.append((on, real(on)))
        return calls[-1][1]

    monkeypatch.setattr(kernels, "flush_denormals", recorded)
    train(make_cfg(*CLASSIFIER_RUN, "trainer.max_steps=3"))
    assert calls == [(True, False), (False, True)]  # on for the run (it was off), then off
    assert real(False) is False


def test_a_bad_value_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"trainer.flush_denormals must be true or false, got 'yes'"):
        TrainerSettings(max_steps=1, flush_denormals="yes")
