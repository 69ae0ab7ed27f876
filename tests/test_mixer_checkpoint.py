"""trainer.grad_checkpoint=mixers: each recurrent mixer of a hybrid (gated delta net, Mamba-2)
recomputes its activations in the backward (models/layers/grad_checkpoint.py); =cores: all but
its projections and rule, whose outputs the forward keeps and the recompute replays
(models/layers/replay.py). The gradients are those of the model as it was (with a dropout on too),
only the mixers (and with cores their projections) change class, the rule runs once a step with
cores, the step's MLX peak falls (measured, not assumed), a model without such mixers is one line,
and a run trains with each."""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from hybrid_families import save_tiny_hybrid
from mlxlab.errors import ConfigError
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.layers import grad_checkpoint, replay
from mlxlab.models.layers.grad_checkpoint import checkpoint_mixers, recurrent_mixers
from mlxlab.training.settings import TrainerSettings

WIDTH = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False}
GATED = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
         "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2}
CONFIGS = {  # model_type -> (its config, its recurrent mixers' class, how many)
    "qwen3_5": ({"model_type": "qwen3_5", "text_config": {
        **WIDTH, **GATED, "model_type": "qwen3_5_text"}}, "GatedDeltaNet", 2),
    "nemotron_h": ({**WIDTH, "model_type": "nemotron_h", "attention_bias": False,
                    "hybrid_override_pattern": list("M*M-"), "mamba_num_heads": 8,
                    "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4,
                    "mamba_proj_bias": False, "mlp_bias": False, "layer_norm_epsilon": 1e-5,
                    "use_bias": False, "use_conv_bias": True}, "NemotronHMamba2Mixer", 2),
    # Falcon-H1: a Mamba-2 mixer beside the attention in every layer
    "falcon_h1": ({**WIDTH, "model_type": "falcon_h1", "mamba_n_heads": 8, "mamba_d_head": 16,
                   "mamba_d_ssm": 128, "mamba_d_state": 16, "mamba_n_groups": 2},
                  "FalconH1Mixer", 4),
}
LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "key", "value", "out", "in_proj_qkv",
                                              "in_proj_z", "in_proj", "gate_proj", "down_proj"]}


def build(config: dict) -> MLXLMDecoder:
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=128, hf_config=config, lora=LORA).train()
    # the adapters' up-projections start at zero: drawn, so every gradient is non-zero
    mx.random.seed(1)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                                   model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def loss_and_grad(model: MLXLMDecoder, length: int):
    ids = mx.array(np.random.default_rng(2).integers(0, 128, size=(2, length + 1)))

    def loss(m):
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    return nn.value_and_grad(model, loss)(model)


@pytest.mark.parametrize("cores", [False, True], ids=["mixers", "cores"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_the_mixers_recompute_with_the_same_gradients_and_nothing_else_changes(kind, cores):
    config, mixer_class, count = CONFIGS[kind]
    plain, wrapped = build(config), build(config)
    attention_before = sorted(type(m).__name__ for _, m in wrapped.named_modules())
    assert checkpoint_mixers(wrapped, cores) == count
    mixers = recurrent_mixers(wrapped)
    prefix = "Replayed" if cores else "Checkpointed"
    assert {type(m).__name__ for m in mixers} == {f"{prefix}{mixer_class}"}
    assert {type(m).__name__ for m in recurrent_mixers(plain)} == {mixer_class}
    # every other module keeps its class: the attention, the MLPs, the mixers' own parts but
    # (cores) their projections, which are replayed too
    inside = [name.rsplit(".", 1)[-1] for mixer in mixers for name, m in mixer.named_modules()
              if name and type(m).__name__.startswith(prefix)]
    assert all("proj" in name for name in inside)
    assert len(inside) >= 2 * count if cores else not inside
    after = sorted(type(m).__name__.removeprefix(prefix) for _, m in wrapped.named_modules())
    assert after == attention_before
    # cores: past the rule's first kept state after the initial one (replay.KEPT_SPAN)
    length = replay.KEPT_SPAN + 44 if cores else 48
    (l0, g0), (l1, g1) = loss_and_grad(plain, length), loss_and_grad(wrapped, length)
    expected, got = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert expected.keys() == got.keys() and len(expected) > 8
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for name, value in expected.items():
        scale = float(mx.abs(value).max())
        assert scale > 0, name
        assert float(mx.abs(got[name] - value).max()) <= 1e-5 * scale, name


def test_a_checkpointed_part_keeps_its_input_not_its_output(monkeypatch):
    """grad_checkpoint.checkpoint orders a part's recompute after its cotangent arrives: unlike
    mx.checkpoint, which orders it after the part's outputs and so keeps each of them until the
    part's backward, a chain of 12 checkpointed blocks keeps none of their outputs (2 MB each
    here): its peak is at least 10 outputs below mx.checkpoint's (15 measured), with the same
    gradients."""
    mx.random.seed(0)
    blocks = [nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
              for _ in range(12)]
    mx.eval([b.parameters() for b in blocks])
    x = mx.random.normal((2048, 256))

    def grads_and_peak():
        calls = [grad_checkpoint.recomputed(lambda p, h, b=b: (b.update(p), b(h))[1], b)
                 for b in blocks]

        def loss(params):
            h = x
            for call, p in zip(calls, params):
                h = h + call(p, h)
            return (h * h).mean()

        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        grads = mx.grad(loss)([b.trainable_parameters() for b in blocks])
        mx.eval(grads)
        return grads, mx.get_peak_memory()

    ours, peak = grads_and_peak()
    monkeypatch.setattr(grad_checkpoint, "checkpoint", mx.checkpoint)
    theirs, their_peak = grads_and_peak()
    assert peak <= their_peak - 10 * x.nbytes, (peak, their_peak)
    for (_, a), (_, b) in zip(tree_flatten(ours), tree_flatten(theirs)):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-7).item()


def test_the_step_peak_falls_where_the_mixers_hold_the_activations():
    """A gated-delta hybrid's step at 1,024 tokens (3 gated-delta layers, 1 attention): its MLX
    peak (deterministic: the buffers the graph holds) with the mixers recomputed is 0.72x the
    step's as it is, here where the logits and attention weigh more than at a real width (the
    bench's 2,048-token hybrid at hidden 512: 1,427 -> 884 MB, 0.62x); with cores, between the
    two, 0.84x (the projections' outputs, the rule's and its kept states stay; the convolution,
    norms and gates go; the bench's: 1,103 MB, 0.77x)."""
    config = {"model_type": "qwen3_5", "text_config": {
        **WIDTH, **GATED, "full_attention_interval": 4, "model_type": "qwen3_5_text"}}

    def peak(model):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(loss_and_grad(model, 1024))
        return mx.get_peak_memory()

    plain, mixers, cores = build(config), build(config), build(config)
    checkpoint_mixers(mixers)
    checkpoint_mixers(cores, cores=True)
    as_is, recomputed, replayed = peak(plain), peak(mixers), peak(cores)
    assert recomputed < 0.8 * as_is, (as_is, recomputed)
    assert recomputed < replayed < 0.9 * as_is, (as_is, recomputed, replayed)


def test_an_evaluation_forward_with_cores_keeps_nothing(monkeypatch):
    """In eval mode (evaluation, generation) a cores mixer runs as the model's: no tape, so no
    projection output held and the rule not asked for the states its backward would need; the
    logits are the unchanged model's."""
    config = CONFIGS["qwen3_5"][0]
    ids = mx.array(np.random.default_rng(5).integers(0, 128, size=(2, 40)))
    tapes, asked = [], []
    monkeypatch.setattr(replay, "Tape", lambda cls=replay.Tape: tapes.append(1) or cls())
    original = replay.kernels.gated_delta
    monkeypatch.setattr(replay.kernels, "gated_delta",
                        lambda *a, **k: asked.append(k.get("with_kept")) or original(*a, **k))
    plain, cores = build(config).eval(), build(config)
    checkpoint_mixers(cores, cores=True)
    logits = cores.eval()(ids)
    assert mx.array_equal(logits, plain(ids)).item()
    assert not tapes and not any(asked)
    loss_and_grad(cores.train(), 40)  # training: one tape a mixer call, the states asked for
    assert tapes and any(asked)


@pytest.mark.parametrize("kind", ["qwen3_5", "nemotron_h"])
def test_with_cores_the_rule_runs_once_a_step(kind, monkeypatch):
    """The recompute takes the rule's outputs from the forward (its backward from the states it
    kept): one kernel call a mixer a step, where mixers runs it again in the backward."""
    config, _, count = CONFIGS[kind]
    calls = []
    original = replay.kernels.gated_delta
    monkeypatch.setattr(replay.kernels, "gated_delta",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    for cores, runs in ((False, 2), (True, 1)):
        model = build(config)
        checkpoint_mixers(model, cores)
        calls.clear()
        mx.eval(loss_and_grad(model, 40))
        assert len(calls) == runs * count, (cores, len(calls))


def test_with_cores_a_dropout_gradient_is_that_of_the_forwards_loss():
    """With a dropout on the adapters (p = 0.5), the gradient through the replayed projections
    uses the forward's masks: its dot with a direction equals the loss's central difference along
    it, each loss drawn from the same seed (masks drawn otherwise would miss by far more)."""
    config = CONFIGS["qwen3_5"][0]
    mx.random.seed(0)
    model = MLXLMDecoder(vocab_size=128, hf_config=config, lora={**LORA, "dropout": 0.5}).train()
    mx.random.seed(1)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                                   model.trainable_parameters()))
    checkpoint_mixers(model, cores=True)
    params = model.trainable_parameters()
    mx.random.seed(3)
    direction = nn.utils.tree_map(lambda p: 0.01 * mx.random.normal(p.shape), params)

    def seeded(shift: float):
        model.update(nn.utils.tree_map(lambda p, d: p + shift * d, params, direction))
        mx.random.seed(7)
        loss, grads = loss_and_grad(model, 24)
        mx.eval(loss, grads)
        return float(loss), grads

    _, grads = seeded(0.0)
    slope = sum(float((g * d).sum()) for (_, g), (_, d)
                in zip(tree_flatten(grads), tree_flatten(direction)))
    step = 3e-2
    difference = (seeded(step)[0] - seeded(-step)[0]) / (2 * step)
    assert abs(slope) > 1e-2
    assert difference == pytest.approx(slope, rel=1e-2), (difference, slope)


# each hybrid family as transformers saves it (tests/hybrid_families.py): its recurrent mixers'
# class and count; LFM2's short convolutions and Gemma 4 carry no recurrent state
FAMILY_MIXERS = {"qwen3_5": ("GatedDeltaNet", 1), "qwen3_next": ("Qwen3NextGatedDeltaNet", 1),
                 "kimi_linear": ("KimiDeltaAttention", 1), "olmo_hybrid": ("GatedDeltaNet", 1),
                 "nemotron_h": ("NemotronHMamba2Mixer", 1), "falcon_h1": ("FalconH1Mixer", 2),
                 "granitemoehybrid": ("GraniteMoeHybridMamba2Mixer", 1),
                 "mamba2": ("Mamba2Block", 2), "lfm2": (None, 0), "gemma4_text": (None, 0)}


@pytest.mark.parametrize("kind", list(FAMILY_MIXERS))
def test_each_familys_recurrent_mixers_are_found(kind, tmp_path):
    folder = save_tiny_hybrid(kind, tmp_path / kind)
    model = MLXLMDecoder(vocab_size=1, pretrained=str(folder))
    name, count = FAMILY_MIXERS[kind]
    mixers = recurrent_mixers(model)
    assert len(mixers) == count
    assert {type(m).__name__ for m in mixers} == ({name} if name else set())


@pytest.mark.parametrize("kind", [k for k, (name, _) in FAMILY_MIXERS.items() if name])
def test_each_family_fully_trained_with_cores_has_the_models_gradients(kind, tmp_path):
    """Every family's folder as transformers saves it, all its weights trained (the projections
    replayed are plain Linears whose weights take gradients), over more tokens than the rule's
    first kept state: loss and gradients those of the model without checkpointing."""
    folder = save_tiny_hybrid(kind, tmp_path / kind)
    plain, cores = (MLXLMDecoder(vocab_size=1, pretrained=str(folder)).train() for _ in range(2))
    checkpoint_mixers(cores, cores=True)
    length = replay.KEPT_SPAN + 20
    ids = mx.array(np.random.default_rng(4).integers(0, 100, size=(1, length + 1)))

    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    (l0, g0), (l1, g1) = (nn.value_and_grad(m, loss)(m) for m in (plain, cores))
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    expected, got = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        scale = float(mx.abs(value).max())
        assert float(mx.abs(got[name] - value).max()) <= 1e-4 * scale + 1e-9, name


def test_a_model_without_recurrent_mixers_is_one_line():
    plain = MLXLMDecoder(vocab_size=128,
                         hf_config={**WIDTH, "model_type": "qwen3", "rope_theta": 1e6})
    with pytest.raises(ConfigError, match="has no recurrent .* mixers to recompute; use true"):
        checkpoint_mixers(plain)


def test_the_setting_takes_mixers_and_cores_and_refuses_other_words():
    assert TrainerSettings(grad_checkpoint="mixers").grad_checkpoint == "mixers"
    assert TrainerSettings(grad_checkpoint="cores").grad_checkpoint == "cores"
    with pytest.raises(ConfigError, match=r"trainer.grad_checkpoint='layers' is not one of "
                                          r"\[True, False, 'mixers', 'cores'\]"):
        TrainerSettings(grad_checkpoint="layers")


@pytest.mark.parametrize("setting", ["mixers", "cores"])
def test_a_run_trains_with_its_mixers_recomputed(tmp_path, caplog, setting):
    from test_mlx_lm_decoders import train_chat

    folder = save_tiny_hybrid("qwen3_5", tmp_path / "qwen3_5")
    with caplog.at_level(logging.INFO, logger="mlxlab.training.loop"):
        metrics, _ = train_chat(folder, tmp_path, f"trainer.grad_checkpoint={setting}")
    assert np.isfinite(metrics["val/loss"])
    assert "gradient checkpointing: 1 recurrent mixers recompute" in caplog.text, caplog.text
    assert ("outputs kept" in caplog.text) == (setting == "cores")
