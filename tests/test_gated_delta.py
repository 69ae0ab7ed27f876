"""The gated delta rule a gated-delta layer trains through (models/layers/gated_delta.py), on both
of its paths: the fused token-by-token kernel (kernels.gated_delta, csrc/gated_delta.cpp, the
CPU's) and the chunked form (a GPU's; here with the kernel skipped). Each equals mlx-lm's
sequential recurrence (`gated_delta_ops`, the reference): outputs, final state and every gradient
(q, k, v, the gate, beta, the initial state) to 1e-5 relative (the norm of the difference over
the reference's) in float32, over lengths that are and are not chunk (span) multiples, with a
left-padding mask and a hole, a per-head and a per-key-channel (KDA) gate, grouped heads.
mlx-lm's models trained through the swap (models/decoders/gated_delta_swap.py) give the
sequential path's loss and gradients, and their training step never runs the token loop; the
backward's peak memory stays a fraction of the loop's."""

from __future__ import annotations

import io

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gated_delta, kimi_linear, qwen3_5, qwen3_next

from mlxlab import kernels
from mlxlab.models.decoders.gated_delta_swap import ORIGINALS, use_chunked_gated_delta
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.layers import gate_decay
from mlxlab.models.layers import gated_delta as chunked_module
from mlxlab.models.layers.gated_delta import chunked_gated_delta_update, gated_delta_chunked

TOL = 1e-5
B, HK, HV, DK, DV = 2, 2, 4, 16, 8


@pytest.fixture
def chunked_path():
    """The chunked form on the CPU: the kernel's op skipped."""
    kernels.set_skip(["gated_delta"])
    try:
        yield
    finally:
        kernels.set_skip(None)


@pytest.fixture(params=["kernel", "chunks"])
def rule_path(request) -> str:
    """Each of the rule's paths: the fused kernel (the kernels on), then the chunked form."""
    request.getfixturevalue("fused_kernels_on" if request.param == "kernel" else "chunked_path")
    return request.param


def rel(a: mx.array, b: mx.array) -> float:
    """|a - b| / |b| over the whole array (float32 rounding: ~1e-7 per element)."""
    diff = mx.linalg.norm((a - b).astype(mx.float32).flatten())
    return (diff / mx.maximum(mx.linalg.norm(b.astype(mx.float32).flatten()), 1e-30)).item()


def rule_inputs(length: int, vectorized: bool, seed: int, batch: int = B, hk: int = HK,
                hv: int = HV, dk: int = DK, dv: int = DV) -> list[mx.array]:
    """q, k l2-normalised as the layers give them (q scaled by Dk^-0.5), a gate in (0, 1), a
    sigmoid beta, a nonzero initial state."""
    mx.random.seed(seed)
    q = mx.random.normal((batch, length, hk, dk))
    k = mx.random.normal((batch, length, hk, dk))
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) / dk**0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((batch, length, hv, dv))
    gate_shape = (batch, length, hv, dk) if vectorized else (batch, length, hv)
    # decays from ~1 to e^-8 a step: a chunk's cumulative log gate reaches the hundreds
    g = mx.exp(-mx.random.uniform(0.01, 8.0, gate_shape))
    beta = mx.sigmoid(mx.random.normal((batch, length, hv)))
    state = 0.1 * mx.random.normal((batch, hv, dv, dk))
    return [q, k, v, g, beta, state]


def padding_mask(length: int) -> mx.array:
    """Row 0 whole, row 1 left-padded by 3 (as a batched prompt cache masks), and a hole in the
    middle of both rows."""
    positions = mx.arange(length)[None, :]
    mask = positions >= mx.array([[0], [3]])
    return mask & (positions != length // 2) if length > 5 else mask


def values_and_grads(rule, inputs: list[mx.array], mask: mx.array | None, seed: int):
    """(y, state) and the gradients of a random linear function of both, for all six inputs."""
    length = inputs[0].shape[1]
    mx.random.seed(seed + 1)
    dy = mx.random.normal((B, length, HV, DV))
    ds = mx.random.normal((B, HV, DV, DK))

    def loss(*arrays):
        y, state = rule(*arrays, mask=mask)
        return (y * dy).sum() + (state * ds).sum()

    outputs = rule(*inputs, mask=mask)
    grads = mx.grad(loss, argnums=list(range(6)))(*inputs)
    mx.eval(outputs, grads)
    return [*outputs, *grads]


NAMES = ["y", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate0"]


@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar-gate", "kda-gate"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("length", [1, 37, 64, 130])
def test_the_rule_equals_the_sequential_recurrence(length, masked, vectorized, rule_path):
    inputs = rule_inputs(length, vectorized, seed=length)
    mask = padding_mask(length) if masked else None
    reference = values_and_grads(gated_delta.gated_delta_ops, inputs, mask, seed=length)
    chunked = values_and_grads(gated_delta_chunked, inputs, mask, seed=length)
    errors = {n: rel(c, r) for n, c, r in zip(NAMES, chunked, reference)}
    assert max(errors.values()) < TOL, errors


def test_an_unused_final_state_and_small_chunks(rule_path):
    """Only y reaches the loss (the state's cotangent is MLX's zeros), chunks of 16 over 50."""
    inputs = rule_inputs(50, False, seed=3)

    def loss(rule):
        return lambda *xs: rule(*xs)[0].square().sum()

    ref = mx.grad(loss(gated_delta.gated_delta_ops), argnums=list(range(6)))(*inputs)
    got = mx.grad(loss(lambda *xs: gated_delta_chunked(*xs, chunk_size=16)),
                  argnums=list(range(6)))(*inputs)
    assert max(rel(g, r) for g, r in zip(got, ref)) < TOL


@pytest.mark.parametrize(("batch", "heads", "length"), [(1, 1, 75), (1, 2, 64), (1, 4, 61)],
                         ids=["8-chunk-groups", "whole-groups", "2-chunk-groups"])
def test_the_batched_scalar_gate_over_groups_of_chunks(batch, heads, length, monkeypatch,
                                                       chunked_path):
    """A scalar gate without a mask over few heads batches its chunks in groups (8 over one
    head, 2 over four): chunks of 4 over 75 tokens are two groups of 8 and a padded group of 3
    (the padded steps must neither decay nor write the state), over 61 a padded last chunk,
    over 64 whole groups; output, final state and all six gradients equal the loop's, compiled
    too (mlxlab compiles its step)."""
    inputs = rule_inputs(length, False, seed=length, batch=batch, hk=1, hv=heads)
    mx.random.seed(length + 1)
    dy = mx.random.normal((batch, length, heads, DV))
    ds = mx.random.normal((batch, heads, DV, DK))

    def loss(rule):
        def f(*xs):
            y, state = rule(*xs)
            return (y * dy).sum() + (state * ds).sum()
        return f

    def chunked(*xs):
        return gated_delta_chunked(*xs, chunk_size=4)

    monkeypatch.setattr(chunked_module, "GROUP_MATRICES", 8)  # the groups this test walks
    assert chunked_module._group_chunks(batch, heads) == 8 // heads
    ref = [*gated_delta.gated_delta_ops(*inputs), *mx.grad(loss(gated_delta.gated_delta_ops),
                                                         argnums=list(range(6)))(*inputs)]
    got = [*chunked(*inputs), *mx.grad(loss(chunked), argnums=list(range(6)))(*inputs)]
    errors = {n: rel(c, r) for n, c, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < TOL, errors
    compiled = mx.compile(mx.grad(loss(chunked), argnums=list(range(6))))(*inputs)
    assert max(rel(c, r) for c, r in zip(compiled, ref[2:])) < TOL


@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar-gate", "kda-gate"])
def test_blocked_gate_ratios_equal_one_exp_each(vectorized):
    """Across blocks of 8 steps a ratio is a product of two exps (gate_decay): over a chunk of 64
    with a gate decaying up to e^-8 a step, the pair products and the gate's gradient through
    them equal those from one exp per ratio."""
    mx.random.seed(5)
    shape = (2, 3, 64, 16) if vectorized else (2, 3, 64)
    lg = -mx.random.uniform(0.01, 8.0, shape)
    x, k = mx.random.normal((2, 3, 64, 16)), mx.random.normal((2, 3, 64, 16))
    weights = mx.random.normal((2, 3, 64, 64))

    def products(decay):
        def f(lg, x, k):
            return (gate_decay.pairs(x, k, decay(lg, vectorized), vectorized) * weights).sum()
        return mx.value_and_grad(f, argnums=[0, 1, 2])(lg, x, k)

    blocked, plain = products(gate_decay.decay), products(gate_decay.pair_decay)
    assert isinstance(gate_decay.decay(lg, vectorized), tuple) == vectorized
    assert rel(blocked[0], plain[0]) < TOL
    assert max(rel(b, p) for b, p in zip(blocked[1], plain[1])) < TOL


def test_the_squarings_inverse_off_the_cpu(monkeypatch, chunked_path):
    """Off the CPU (no triangular inverse there) (I + A)^-1 is log2(C) squarings: the rule
    through them equals the loop too."""
    monkeypatch.setattr(chunked_module, "_inverse", chunked_module._unit_lower_inverse)
    inputs = rule_inputs(70, False, seed=4)
    reference = values_and_grads(gated_delta.gated_delta_ops, inputs, None, seed=4)
    chunked = values_and_grads(gated_delta_chunked, inputs, None, seed=4)
    errors = {n: rel(c, r) for n, c, r in zip(NAMES, chunked, reference)}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("options", [{}, {"lower_bound": -5.0}, {"allow_neg_eigval": True}],
                         ids=["softplus-gate", "lower-bound-gate", "neg-eigval"])
def test_update_equals_mlx_lms_in_training(options, rule_path):
    """chunked_gated_delta_update against mlx-lm's gated_delta_update(use_kernel=False): the
    gate's and beta's parameters get the same gradients (a, b, A_log, dt_bias)."""
    mx.random.seed(7)
    q, k, v, _, _, state = rule_inputs(70, False, seed=7)
    a, b = mx.random.normal((B, 70, HV)), mx.random.normal((B, 70, HV))
    a_log, dt_bias = mx.log(mx.random.uniform(1.0, 16.0, (HV,))), mx.random.normal((HV,))

    def loss(update):
        def f(*xs):
            y, s = update(*xs, use_kernel=False, **options)
            return y.square().sum() + s.sum()
        return f

    args = [q, k, v, a, b, a_log, dt_bias, state]
    ref = mx.value_and_grad(loss(gated_delta.gated_delta_update), argnums=list(range(8)))(*args)
    got = mx.value_and_grad(loss(chunked_gated_delta_update), argnums=list(range(8)))(*args)
    assert rel(got[0], ref[0]) < TOL
    assert max(rel(g, r) for g, r in zip(got[1], ref[1])) < TOL


def tiny_qwen3_5() -> nn.Module:
    text = {"model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 97, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
            "linear_key_head_dim": 16, "linear_value_head_dim": 8, "full_attention_interval": 2,
            "head_dim": 16}
    return qwen3_5.Model(qwen3_5.ModelArgs.from_dict({"model_type": "qwen3_5",
                                                        "text_config": text}))


def tiny_qwen3_next() -> nn.Module:
    return qwen3_next.Model(qwen3_next.ModelArgs(
        model_type="qwen3_next", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
        num_attention_heads=4, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
        num_experts=0, num_experts_per_tok=0, decoder_sparse_step=1,
        shared_expert_intermediate_size=0, mlp_only_layers=[], moe_intermediate_size=0,
        rms_norm_eps=1e-6, vocab_size=97, num_key_value_heads=2, rope_theta=10000.0,
        partial_rotary_factor=0.25, max_position_embeddings=512, head_dim=16,
        full_attention_interval=2))


def tiny_kimi_linear() -> nn.Module:
    """Kimi-Linear: KDA (a gate per key channel) in layer 1, MLA attention in layer 2."""
    return kimi_linear.Model(kimi_linear.ModelArgs(
        model_type="kimi_linear", vocab_size=97, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, head_dim=16,
        rope_theta=10000.0, rms_norm_eps=1e-6, model_max_length=512, num_experts=0,
        linear_attn_config={"kda_layers": [1], "num_heads": 4, "head_dim": 16,
                            "short_conv_kernel_size": 4},
        moe_intermediate_size=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=16, first_k_dense_replace=2))


def loss_and_grads(model: nn.Module, ids: mx.array) -> tuple[mx.array, dict]:
    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    mx.eval(value, grads)
    return value, dict(tree_flatten(grads))


@pytest.mark.parametrize(("build", "module"), [(tiny_qwen3_5, qwen3_5),
                                               (tiny_qwen3_next, qwen3_next),
                                               (tiny_kimi_linear, kimi_linear)],
                         ids=["qwen3_5", "qwen3_next", "kimi_linear"])
def test_a_hybrid_trains_through_the_rule(build, module, monkeypatch, rule_path):
    """A tiny model from mlx-lm's ModelArgs (random weights), training mode: its loss and every
    gradient through the swap equal mlx-lm's sequential path, and the swapped step never runs
    the token loop (gated_delta_ops would raise)."""
    mx.random.seed(0)
    model = build()
    model.train()
    assert use_chunked_gated_delta(model) >= 1  # qwen3_5 imports qwen3_next's classes too
    assert ORIGINALS[module.gated_delta_update] is gated_delta.gated_delta_update
    ids = mx.random.randint(0, 97, (2, 71))
    with monkeypatch.context() as patch:
        patch.setattr(module, "gated_delta_update", gated_delta.gated_delta_update)
        ref_loss, ref_grads = loss_and_grads(model, ids)

    def no_loop(*args, **kwargs):
        raise AssertionError("the token loop ran in training")

    monkeypatch.setattr(gated_delta, "gated_delta_ops", no_loop)
    got_loss, got_grads = loss_and_grads(model, ids)
    assert rel(got_loss, ref_loss) < TOL
    errors = {n: rel(got_grads[n], g) for n, g in ref_grads.items()}
    assert max(errors.values()) < TOL, sorted(errors.items(), key=lambda e: -e[1])[:3]


def test_mlxlabs_decoder_swaps_at_load(monkeypatch):
    """mlxlab's mlx-lm decoder (rebuilt from a config, as a checkpoint rebuilds it) with LoRA:
    its LoRA gradient step never runs the token loop."""
    config = {"model_type": "qwen3_5", "text_config": {
        "model_type": "qwen3_5_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 97, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 8, "full_attention_interval": 2,
        "head_dim": 16}}
    monkeypatch.setattr(qwen3_5, "gated_delta_update", gated_delta.gated_delta_update)
    model = MLXLMDecoder(vocab_size=97, hf_config=config,
                         lora={"rank": 4, "targets": ["query", "value", "out"]})
    assert qwen3_5.gated_delta_update in ORIGINALS  # swapped by the load itself
    model.train()

    def no_loop(*args, **kwargs):
        raise AssertionError("the token loop ran in training")

    monkeypatch.setattr(gated_delta, "gated_delta_ops", no_loop)
    loss, grads = loss_and_grads(model, mx.random.randint(0, 97, (1, 40)))
    assert grads and all(mx.isfinite(g).all().item() for g in grads.values())


def test_evaluation_keeps_mlx_lms_own_path(monkeypatch):
    """Outside training (use_kernel True) the wrapper calls mlx-lm's function: without Metal,
    the token loop."""
    model = tiny_qwen3_5()
    model.eval()
    use_chunked_gated_delta(model)
    calls = []
    original = gated_delta.gated_delta_ops
    monkeypatch.setattr(gated_delta, "gated_delta_ops",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    mx.eval(model(mx.zeros((1, 5), mx.int32)))
    assert len(calls) == 2  # the two gated-delta layers


def backward_peak(rule, length: int) -> int:
    inputs = rule_inputs(length, False, seed=1, batch=1, hk=4, hv=4, dk=64, dv=64)
    mx.eval(inputs)
    mx.synchronize()
    mx.reset_peak_memory()
    grads = mx.grad(lambda *xs: rule(*xs)[0].square().sum(), argnums=list(range(6)))(*inputs)
    mx.eval(grads)
    return mx.get_peak_memory()


def test_the_backward_keeps_chunk_boundaries_not_tokens(rule_path):
    """MLX's peak memory of one forward + backward at 512 tokens: the loop keeps a state per
    token, the chunked rule one per chunk boundary (the kernel none: it recomputes its states in
    its own buffers)."""
    sequential = backward_peak(gated_delta.gated_delta_ops, 512)
    chunked = backward_peak(gated_delta_chunked, 512)
    assert chunked * 4 < sequential, (chunked, sequential)


@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar-gate", "kda-gate"])
def test_the_rule_compiles_as_the_training_step_does(vectorized, rule_path):
    """mlxlab compiles its step (mx.compile): the rule's gradients under it are the same."""
    inputs = rule_inputs(70, vectorized, seed=2)
    grad = mx.grad(lambda *xs: gated_delta_chunked(*xs)[0].square().sum(), argnums=list(range(6)))
    compiled = mx.compile(grad)(*inputs)
    assert max(rel(c, g) for c, g in zip(compiled, grad(*inputs))) < TOL


def graph(out: mx.array) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    return dot.getvalue()


@pytest.mark.usefixtures("fused_kernels_on")
def test_the_kernel_runs_where_dispatch_takes_the_call():
    """Float32 on the CPU with the kernels on: the kernel's primitive, forward and backward;
    the op skipped or the kernels off: the chunked form's ops, and the same values."""
    q, k, v, g, beta, state = rule_inputs(40, False, seed=8)

    def rule(*xs):
        return gated_delta_chunked(*xs)

    fused = rule(q, k, v, g, beta, state)
    backward = mx.grad(lambda *xs: rule(*xs)[0].sum())(q, k, v, g, beta, state)
    assert "MlxlabGatedDelta" in graph(fused[0])
    assert "MlxlabGatedDeltaGrad" in graph(backward)
    kernels.set_skip(["gated_delta"])
    try:
        skipped = rule(q, k, v, g, beta, state)
    finally:
        kernels.set_skip(None)
    kernels.set_mode("off")
    off = rule(q, k, v, g, beta, state)
    kernels.set_mode("on")
    for other in (skipped, off):
        assert "MlxlabGatedDelta" not in graph(other[0])
        assert rel(other[0], fused[0]) < TOL and rel(other[1], fused[1]) < TOL


@pytest.mark.usefixtures("fused_kernels_on")
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar-gate", "kda-gate"])
@pytest.mark.parametrize(("span", "dv", "dk"), [(1, 8, DK), (5, 8, 12), (16, 37, DK),
                                                (64, 130, DK)],
                         ids=["span-1", "span-5-keys-off-the-lanes", "span-16-odd-rows",
                              "span-64-two-blocks"])
def test_the_kernels_backward_from_states_kept_a_span_apart(span, dv, dk, vectorized):
    """The kernel's backward recomputes the states from ones kept `span` tokens apart: over 70
    masked tokens, spans that do and do not divide it, a state of rows that are not a multiple
    of 4 (the padded last group), more than one block of 32 rows, and a key width that is not a
    multiple of 8 (the dot products' path without 8-lane sums), the loop's gradients."""
    inputs = rule_inputs(70, vectorized, seed=span, dk=dk, dv=dv)
    mask = padding_mask(70)
    module = kernels.extension()
    mx.random.seed(span + 1)
    dy, ds = mx.random.normal((B, 70, HV, dv)), mx.random.normal((B, HV, dv, dk))

    def loss(rule):
        def f(*xs):
            y, state = rule(*xs)
            return (y * dy).sum() + (state * ds).sum()
        return f

    def kernel(q, k, v, g, beta, state):
        return module.gated_delta(q, k, v, mx.log(g), beta, state, mask.astype(mx.float32), span)

    def loop(*xs):
        return gated_delta.gated_delta_ops(*xs, mask=mask)

    ref = [*loop(*inputs), *mx.grad(loss(loop), argnums=list(range(6)))(*inputs)]
    got = [*kernel(*inputs), *mx.grad(loss(kernel), argnums=list(range(6)))(*inputs)]
    errors = {n: rel(c, r) for n, c, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < TOL, errors


@pytest.mark.usefixtures("fused_kernels_on")
@pytest.mark.parametrize("delta", [True, False], ids=["delta-rule", "linear-attention"])
def test_the_backward_alone_from_the_kept_states_is_the_vjps(delta):
    """kernels.gated_delta_grad (what a replayed mixer's recompute calls: models/layers/replay.py)
    from the states the forward returned with_kept, a span of 16 over 70 masked tokens: the
    gradients mx.vjp gives through the kernel, to the bit (the same primitive); kept states of
    the wrong count are refused in one line."""
    q, k, v, g, beta, state = rule_inputs(70, False, seed=4)
    primals = [q, k, v, mx.log(g), beta, state, padding_mask(70).astype(mx.float32)]
    mx.random.seed(5)
    dy, ds = mx.random.normal(v.shape), mx.random.normal(state.shape)
    y, final, kept = kernels.gated_delta(*primals, delta=delta, with_kept=True, span=16)
    assert kept.shape == (B, HV, 5, DV, DK)
    got = kernels.gated_delta_grad(primals, kept, dy, ds, delta=delta, span=16)
    _, want = mx.vjp(lambda *xs: list(kernels.gated_delta(*xs, delta=delta, span=16)),
                     primals, [dy, ds])
    for name, a, b in zip(NAMES[2:], got, want[:6]):
        assert mx.array_equal(a, b), name
    with pytest.raises(ValueError, match="expected kept"):
        kernels.gated_delta_grad(primals, kept[:, :, :4], dy, ds, delta=delta, span=16)


@pytest.mark.usefixtures("fused_kernels_on")
def test_the_kernel_refuses_shapes_it_does_not_read():
    """A beta or a state that does not match q, k and v: one line naming the expected shapes."""
    q, k, v, g, beta, state = rule_inputs(9, False, seed=9)
    module = kernels.extension()
    with pytest.raises(ValueError, match="expected q, k"):
        module.gated_delta(q, k, v, mx.log(g), beta[:, :, :2], state)
    with pytest.raises(ValueError, match="expected q, k"):
        module.gated_delta(q, k, v, mx.log(g), beta, state[:, :, :3])
