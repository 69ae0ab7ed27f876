"""Mamba-2's scan through the gated linear attention kernel (models/layers/ssm_scan.py,
kernels.gated_delta with delta=False): outputs, final state and every gradient (x, A_log, B, C,
D, dt, dt_bias, the initial state) equal mlx-lm's `ssm_attn` (the reference: its chunks of 256
tokens as matrix products) to 1e-5 relative in float32, over lengths that are and are not the
kernel's span (64) or mlx-lm's step (256), one or two groups, with and without a state. mlx-lm's
Mamba-2 models route through it at load (models/decoders/ssm_swap.py) with mlx-lm's loss and
gradients, a masked call keeps mlx-lm's path, and the step's peak is a fraction of mlx-lm's."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import nemotron_h, ssm

from mlxlab import kernels
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.ssm_swap import ORIGINALS
from mlxlab.models.layers.ssm_scan import ssm_scan

TOL = 1e-5
NAMES = ["x", "A_log", "B", "C", "D", "dt", "dt_bias", "state"]
LIMIT = (0.001, 100.0)
HEADS, HEAD_DIM, STATE = 4, 8, 16


def rel(a: mx.array, b: mx.array) -> float:
    """|a - b| / |b| over the whole array."""
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def scan_inputs(length: int, groups: int, with_state: bool, seed: int, state: int = STATE
                ) -> list:
    mx.random.seed(seed)
    r = mx.random.normal
    return [r((2, length, HEADS, HEAD_DIM)), 0.5 * r((HEADS,)), 0.5 * r((2, length, groups, state)),
            0.5 * r((2, length, groups, state)), r((HEADS,)), r((2, length, HEADS)),
            0.5 * r((HEADS,)), r((2, HEADS, HEAD_DIM, state)) if with_state else None]


def values_and_grads(scan, inputs: list, seed: int) -> dict[str, mx.array]:
    """y, the final state and the gradients of a random linear function of both."""
    mx.random.seed(seed + 1)
    x = inputs[0]
    dy = mx.random.normal(x.shape)
    ds = mx.random.normal((x.shape[0], HEADS, HEAD_DIM, inputs[2].shape[-1]))
    given = [i for i, a in enumerate(inputs) if a is not None]

    def loss(*arrays):
        full = list(inputs)
        for i, a in zip(given, arrays):
            full[i] = a
        y, state = scan(*full, LIMIT)
        return (y * dy).sum() + (state * ds).sum(), (y, state)

    (_, (y, state)), grads = mx.value_and_grad(loss, argnums=list(range(len(given))))(
        *[inputs[i] for i in given])
    mx.eval(y, state, grads)
    return {"y": y, "state": state, **{f"d{NAMES[i]}": g for i, g in zip(given, grads)}}


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("length", [1, 37, 64, 300])
def test_the_scan_equals_mlx_lms(length, groups, with_state, fused_kernels_on):
    inputs = scan_inputs(length, groups, with_state, seed=length + groups)
    reference = values_and_grads(ssm.ssm_attn, inputs, seed=length)
    got = values_and_grads(ssm_scan, inputs, seed=length)
    assert got.keys() == reference.keys()
    errors = {name: rel(got[name], reference[name]) for name in reference}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("length", [37, 130])
def test_a_state_width_off_the_vector_path(length, fused_kernels_on):
    """A state of 12 (not a multiple of 8: the kernel's portable loops, not its AVX2 ones)."""
    inputs = scan_inputs(length, 2, True, seed=length, state=12)
    reference = values_and_grads(ssm.ssm_attn, inputs, seed=length)
    got = values_and_grads(ssm_scan, inputs, seed=length)
    assert got.keys() == reference.keys()
    errors = {name: rel(got[name], reference[name]) for name in reference}
    assert max(errors.values()) < TOL, errors


def test_the_delta_rule_is_not_the_scan(fused_kernels_on, monkeypatch):
    """The same walk with the delta term on (the gated delta rule) is far from mlx-lm's scan: the
    comparison above sees the difference."""
    inputs = scan_inputs(37, 2, True, seed=5)
    rule = kernels.gated_delta
    monkeypatch.setattr(kernels, "gated_delta", lambda *a, delta=True: rule(*a, delta=True))
    got = values_and_grads(ssm_scan, inputs, seed=5)
    monkeypatch.undo()
    reference = values_and_grads(ssm.ssm_attn, inputs, seed=5)
    assert rel(got["y"], reference["y"]) > 0.1


def test_off_the_kernel_the_scan_is_mlx_lms(fused_kernels_on):
    """Where the kernel does not run (skipped here, as off the CPU or in bfloat16) ssm_scan says
    so and the wrapper calls mlx-lm's function."""
    inputs = scan_inputs(20, 1, False, seed=2)
    kernels.set_skip(["gated_delta"])
    try:
        assert ssm_scan(*inputs, LIMIT) is None
    finally:
        kernels.set_skip(None)


def nemotron(config_extra: dict | None = None) -> MLXLMDecoder:
    config = {"model_type": "nemotron_h", "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 97, "attention_bias": False,
              "hybrid_override_pattern": list("M*M-"), "mamba_num_heads": 8,
              "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4,
              "mamba_proj_bias": False, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
              "use_bias": False, "use_conv_bias": True, "max_position_embeddings": 512,
              **(config_extra or {})}
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=97, hf_config=config,
                         lora={"rank": 4, "targets": ["in_proj", "out_proj", "query", "value"]})
    # the adapters' up-projections start at zero: drawn, so every gradient is non-zero
    model.update(nn.utils.tree_map(lambda p: 0.05 * mx.random.normal(p.shape),
                                   model.trainable_parameters()))
    return model


def loss_and_grads(model: MLXLMDecoder, ids: mx.array) -> tuple[float, dict]:
    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    return value.item(), dict(tree_flatten(grads))


def test_a_mamba_model_trains_through_the_scan_with_mlx_lms_gradients(fused_kernels_on,
                                                                      monkeypatch):
    """Nemotron-H built by mlxlab's decoder: its mixers' ssm_update is the wrapper (swapped at
    load), mlx-lm's `ssm_attn` never runs in its training step, and its loss and gradients are
    those of the same model through mlx-lm's own function."""
    model = nemotron().train()
    assert nemotron_h.ssm_update in ORIGINALS
    ids = mx.random.randint(0, 97, (2, 300))

    def no_chunks(*args, **kwargs):
        raise AssertionError("mlx-lm's ssm_attn ran")

    monkeypatch.setattr(ssm, "ssm_attn", no_chunks)
    value, grads = loss_and_grads(model, ids)
    monkeypatch.undo()
    monkeypatch.setattr(nemotron_h, "ssm_update", ORIGINALS[nemotron_h.ssm_update])
    expected_value, expected = loss_and_grads(model, ids)
    assert value == pytest.approx(expected_value, rel=1e-6)
    assert grads.keys() == expected.keys()
    for name, g in expected.items():
        assert rel(grads[name], g) < TOL, name


def test_a_masked_call_keeps_mlx_lms_path(fused_kernels_on, monkeypatch):
    calls = []
    original = ssm.ssm_attn
    monkeypatch.setattr(ssm, "ssm_attn", lambda *a, **k: calls.append(1) or original(*a, **k))
    nemotron()  # swaps the name
    inputs = scan_inputs(12, 2, False, seed=3)
    wrapper = nemotron_h.ssm_update
    wrapper(*inputs, LIMIT, mx.ones((2, 12), mx.bool_))
    assert calls == [1]
    wrapper(*inputs, LIMIT)
    assert calls == [1]


def test_the_step_keeps_states_a_span_apart_not_chunk_matrices(fused_kernels_on, monkeypatch):
    """A Nemotron-H step at 1,024 tokens: mlx-lm's scan keeps its [heads, 256, 256] matrices
    for the backward, the kernel a state every 64 tokens: the peak measured 0.23x."""
    ids = mx.random.randint(0, 97, (1, 1025))

    def peak() -> int:
        model = nemotron({"mamba_num_heads": 16}).train()
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(loss_and_grads(model, ids)[1])
        return mx.get_peak_memory()

    scanned = peak()
    monkeypatch.setattr(nemotron_h, "ssm_update", ORIGINALS[nemotron_h.ssm_update])
    monkeypatch.setattr("mlxlab.models.decoders.mlx_lm_decoder.use_ssm_scan", lambda lm: 0)
    chunked = peak()
    assert scanned < 0.6 * chunked, (scanned, chunked)
