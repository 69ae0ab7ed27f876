"""trainer.precision=bf16 on a CPU with bf16 units: Linear products in bf16 through MKL's
cblas_gemm_bf16bf16f32 (kernels.bf16_matmul, runtime/compute/bf16.py, models/layers/bf16_linear.py).

The products must equal float32 products of the bf16-rounded operands to float32 accumulation's
tolerance, forward and backward, and a short training run in bf16 must follow the fp32 run's
loss curve to bf16's tolerance. Where this CPU has no bf16 units or MKL is not installed those
cases skip, and the one line that says so is checked instead.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlab import kernels
from mlxlab.data.batching import Batching
from mlxlab.models.layers import replay
from mlxlab.models.layers.bf16_linear import Bf16Linear, bf16_products, rounded
from mlxlab.objectives.supervised.supervised import Supervised
from mlxlab.runtime.compute import bf16
from mlxlab.training import step as training_step
from mlxlab.training.optim import build_optimizer
from test_trainer import adamw, build, objective_loss

# float32 accumulation of K bf16 products: each sum's error stays below K * 2^-24 times the sum
# of the products' magnitudes; rounding the operands to bf16 moves a product by ~2^-8 of them.
ACCUMULATION = 2.0**-24
# (M, K, N); the last above bf16.Gemm.below: on MKL's threads, the others on one
SHAPES = [(1, 1, 1), (7, 13, 5), (64, 64, 64), (300, 200, 150), (33, 517, 96), (272, 256, 256)]


@pytest.fixture
def bf16_units(fused_kernels_on):
    """The bf16 path live here: bf16 units, MKL and the fused kernels; skipped elsewhere."""
    address, why = bf16.gemm_bf16()
    if address is None:
        pytest.skip(why)


def operands(m: int, k: int, n: int, ta: bool, tb: bool, seed: int = 0):
    keys = mx.random.split(mx.random.key(seed), 2)
    a = mx.random.normal((k, m) if ta else (m, k), key=keys[0]) * 3.0
    b = mx.random.normal((n, k) if tb else (k, n), key=keys[1])
    return a, b


def op(x: mx.array, t: bool) -> mx.array:
    return x.T if t else x


def assert_accumulation_close(got: mx.array, a: mx.array, b: mx.array, k: int) -> None:
    """got == a @ b (float32 operands already rounded) to float32 accumulation's bound."""
    want, scale = a @ b, mx.abs(a) @ mx.abs(b)
    assert got.dtype == mx.float32 and got.shape == want.shape
    excess = mx.abs(got - want) - 4 * max(k, 1) * ACCUMULATION * scale
    assert mx.max(excess).item() <= 0.0


def test_units_read_from_the_cpu_flags():
    assert bf16.units(frozenset({"avx2", "amx_bf16", "avx512_bf16"})) == ["AMX", "AVX512-BF16"]
    assert bf16.units(frozenset({"avx512f", "avx512_bf16"})) == ["AVX512-BF16"]
    assert bf16.units(frozenset({"avx2", "avx512f"})) == []
    address, why = bf16._find([])
    assert address is None and "amx_bf16 or avx512_bf16" in why


def test_units_on_an_amd_cpu_are_not_driven_by_mkl(monkeypatch):
    monkeypatch.setattr(bf16.cpu, "cpu_vendor", lambda cpuinfo=None: "AuthenticAMD")
    address, why = bf16._find(["AVX512-BF16"])
    assert address is None and why == ("this AuthenticAMD CPU has AVX512-BF16, but MKL drives "
                                       "them on Intel CPUs only")


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_products_are_fp32_sums_of_bf16_rounded_operands(bf16_units, m, k, n, ta, tb):
    a, b = operands(m, k, n, ta, tb)
    got = kernels.bf16_matmul(a, b, ta, tb)
    assert got is not None  # the MKL path ran, not a fallback
    assert_accumulation_close(got, op(rounded(a), ta), op(rounded(b), tb), k)
    if m * n * k > 1000:  # and it is the rounded operands' product, not the float32 one
        assert mx.max(mx.abs(got - op(a, ta) @ op(b, tb))).item() > 1e-3


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_backward_products_take_bf16_operands(bf16_units, ta, tb):
    """The VJP in each operand is the product of the bf16-rounded cotangent with the other
    bf16-rounded operand, summed in float32."""
    m, k, n = 45, 70, 38
    a, b = operands(m, k, n, ta, tb, seed=1)
    g = mx.random.normal((m, n), key=mx.random.key(2))
    _, (da, db) = mx.vjp(lambda x, y: kernels.bf16_matmul(x, y, ta, tb), [a, b], [g])
    def product(x, y):
        return op(x, ta) @ op(y, tb)

    _, (want_a, want_b) = mx.vjp(product, [rounded(a), rounded(b)], [rounded(g)])
    _, scales = mx.vjp(product, [mx.abs(rounded(a)), mx.abs(rounded(b))], [mx.abs(rounded(g))])
    for got, want, scale, inner in ((da, want_a, scales[0], n), (db, want_b, scales[1], m)):
        assert got.shape == want.shape
        excess = mx.abs(got - want) - 4 * inner * ACCUMULATION * scale
        assert mx.max(excess).item() <= 0.0


def test_linear_layers_switch_for_the_block_only(bf16_units):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = mx.random.normal((5, 3, 16), key=mx.random.key(3))
    with bf16_products(model) as switched:
        assert switched == 2 and all(type(m) is Bf16Linear for m in model.layers[::2])
        y = model(x)
    assert all(type(m) is nn.Linear for m in model.layers[::2])
    first, last = model.layers[0], model.layers[2]
    hidden = nn.relu(rounded(x) @ rounded(first.weight).T + first.bias)
    want = rounded(hidden) @ rounded(last.weight).T
    assert y.shape == (5, 3, 4) and mx.allclose(y, want, rtol=1e-5, atol=1e-5).item()


def test_a_replayed_mixers_projection_switches_and_keeps_its_replay(bf16_units):
    """A projection trainer.grad_checkpoint=cores replays (replay.py) computes in bf16 within the
    block as a replayed Bf16Linear, and is its replayed nn.Linear again after it."""
    model = nn.Sequential(nn.Linear(16, 8))
    replayed = replay.replayed_projection(nn.Linear)
    model.layers[0].__class__ = replayed
    x = mx.random.normal((5, 16), key=mx.random.key(4))
    with bf16_products(model) as switched:
        layer = model.layers[0]
        assert switched == 1 and type(layer) is replay.replayed_projection(Bf16Linear)
        y = model(x)
    assert type(model.layers[0]) is replayed
    want = rounded(x) @ rounded(layer.weight).T + layer.bias
    assert mx.allclose(y, want, rtol=1e-5, atol=1e-5).item()


def losses_of(make_cfg, tmp_path, precision: str, seed: int, steps: int = 16) -> list[float]:
    """The default experiment's tiny transformer learning one batch at `precision`: its losses."""
    _, data, model = build(make_cfg, tmp_path, "model.hidden_size=32", "model.num_layers=1",
                           "model.num_heads=2", "model.dropout=0.0", f"seed={seed}")
    settings = training_step.TrainerSettings(precision=precision, grad_clip=1.0)
    loss_fn = training_step.with_precision(objective_loss(Supervised(), data, model),
                                           settings.precision)
    opt = build_optimizer(adamw(5e-3), settings.schedule, total_steps=steps)
    opt.init(model.trainable_parameters())
    run = training_step.make_step(model, opt, loss_fn, settings)
    batch = next(iter(data.train_batches(Batching(batch_size=32), 0)))  # one batch, learnt
    return [run([batch])[0].item() for _ in range(steps)]


@pytest.mark.parametrize("seed", [0, pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_bf16_training_follows_the_fp32_loss_curve(bf16_units, make_cfg, tmp_path, caplog,
                                                   monkeypatch, seed):
    monkeypatch.setattr(training_step, "_said", set())
    with caplog.at_level(logging.INFO):
        low = losses_of(make_cfg, tmp_path, "bf16", seed)
    assert "bf16 products on" in caplog.text
    full = losses_of(make_cfg, tmp_path, "fp32", seed)
    low, full = np.array(low), np.array(full)
    assert not np.array_equal(low, full)  # bf16 products ran
    assert full[-1] < full[0] - 0.05  # the run learns
    # bf16 operands (8-bit significands: a relative step of 2^-8) move no loss of these 16 steps
    # by half that step (seen: at most 5e-4 relative)
    np.testing.assert_allclose(low, full, rtol=2.0**-9)


def test_no_units_keeps_mlx_bf16_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(bf16, "_answer", (None, "this CPU reports no bf16 units (test)"))
    monkeypatch.setattr(training_step, "_said", set())
    monkeypatch.setattr(training_step.device, "backend", lambda: "cpu")
    seen = {}

    def loss(model, batch):
        seen["dtype"] = model.weight.dtype
        return model(batch).sum(), {}

    with caplog.at_level(logging.WARNING):
        wrapped = training_step.with_precision(loss, "bf16")
    lines = [r.getMessage() for r in caplog.records if "trainer.precision=bf16" in r.getMessage()]
    assert len(lines) == 1 and "no bf16 units (test)" in lines[0]
    wrapped(nn.Linear(4, 2), mx.ones((1, 4)))
    assert seen["dtype"] == mx.bfloat16  # MLX's own bf16 compute, as before


def test_fused_kernels_off_keeps_mlx_bf16_with_one_line(bf16_units, monkeypatch, caplog):
    """The bf16 products are a fused kernel: trainer.fused_kernels=off leaves bf16 to MLX, said."""
    monkeypatch.setattr(training_step, "_said", set())
    monkeypatch.setattr(kernels, "status", lambda: "off")
    with caplog.at_level(logging.WARNING):
        training_step.with_precision(lambda model, batch: (model(batch).sum(), {}), "bf16")
    assert "MLX's own bf16 products" in caplog.text
    assert "the fused CPU kernels are off" in caplog.text
