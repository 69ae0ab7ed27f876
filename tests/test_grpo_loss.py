"""GRPO's loss and advantages equal TRL's (trl 1.16 GRPOTrainer, run here on torch CPU): each
loss type's value, its metrics and its gradient wrt the policy's log-probs, with old log-probs
apart from the policy's (num_iterations > 1: the ratio is clipped) and beta > 0 (the KL term).

TRL's `_compute_loss` is called as it is, unbound, on an object holding the trainer attributes
it reads; its `_get_per_token_logps_and_entropies` hands back the log-probs under test, so the
loss, the clipping and the reductions are TRL's own lines. The advantages are computed in TRL
inline in `_generate_and_score_completions`; `trl_advantages` below is those lines
(grpo_trainer.py, "sum_then_normalize") on torch with TRL's own `nanstd`.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.objectives.rl.grpo_loss import group_advantages, policy_loss, token_logps

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

N, T, G = 6, 7, 3
MAX_COMPLETION = 9


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def trl_loss(loss_type, logps, old, ref, adv, mask, beta, eps_low, eps_high):
    """TRL's GRPOTrainer._compute_loss on these numbers: (loss, its metrics, d loss / d logps)."""
    policy = torch.tensor(logps, dtype=torch.float32, requires_grad=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy),
                                                            None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics=defaultdict(lambda: defaultdict(list)))
    m = torch.tensor(mask, dtype=torch.float32)
    inputs = {
        "prompt_ids": torch.zeros((N, 2), dtype=torch.long),
        "prompt_mask": torch.ones((N, 2), dtype=torch.long),
        "completion_ids": torch.zeros((N, T), dtype=torch.long), "completion_mask": m,
        "advantages": torch.tensor(adv, dtype=torch.float32),
        "old_per_token_logps": None if old is None else torch.tensor(old, dtype=torch.float32),
        "ref_per_token_logps": torch.tensor(ref, dtype=torch.float32),
        "num_items_in_batch": m.sum(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, policy.grad.numpy()


def case(seed: int):
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3, -0.05, (N, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (N, T))).astype(np.float32)  # mu > 1: the policy moved
    ref = (logps + rng.normal(0, 0.5, (N, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, N)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    adv = rng.normal(0, 1, N).astype(np.float32)
    return logps, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mu_old", [True, False])
def test_loss_and_gradient_equal_trls(loss_type, beta, mu_old):
    logps, old, ref, mask, adv = case(7)
    old = old if mu_old else None  # mu = 1: the old policy is the policy, detached
    eps_low, eps_high = 0.2, 0.28  # DAPO's clip-higher: the two sides differ
    want, want_metrics, want_grad = trl_loss(loss_type, logps, old, ref, adv, mask, beta,
                                             eps_low, eps_high)

    def ours(x):
        return policy_loss(loss_type, x, mx.array(adv), mx.array(mask),
                           None if old is None else mx.array(old), mx.array(ref), beta,
                           eps_low, eps_high, MAX_COMPLETION)

    got, metrics, (tokens, completions) = ours(mx.array(logps))
    grad = mx.grad(lambda x: ours(x)[0])(mx.array(logps))
    assert (tokens.item(), completions.item()) == (mask.sum(), N)
    assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want))
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=1e-5, atol=1e-6)
    assert np.abs(want_grad).sum() > 0  # the case exercises a gradient
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(want_metrics[name], abs=1e-6)
    if beta:
        assert metrics["kl"].item() == pytest.approx(want_metrics["kl"], rel=1e-5)
    else:
        assert "kl" not in metrics
    if mu_old:  # the case clips some tokens: the clipped branch is compared too
        assert want_metrics["clip_ratio/region_mean"] > 0


def trl_advantages(rewards: np.ndarray, G: int, scale_rewards: str):
    """TRL's advantages (grpo_trainer.py _generate_and_score_completions, sum_then_normalize)."""
    rewards = torch.tensor(rewards)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ["group", "none"]:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0).numpy(), is_std_zero.numpy()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trls(scale_rewards):
    rng = np.random.default_rng(3)
    rewards = rng.integers(0, 3, 4 * G).astype(np.float32) * 0.5
    rewards[:G] = 1.0  # a group of equal rewards: std 0, advantage 0, frac_reward_zero_std
    rewards[G + 1] = np.nan  # a completion no reward judged
    got, zero = group_advantages(rewards, G, scale_rewards)
    want, want_zero = trl_advantages(rewards, G, scale_rewards)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(zero, want_zero)
    assert got[:G].tolist() == [0.0] * G and zero[:G].all() == (scale_rewards != "batch")


def test_token_logps_are_log_softmax_at_the_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    logps, entropy = token_logps(mx.array(logits), mx.array(targets), temperature=0.7)
    t = torch.tensor(logits) / 0.7
    want = torch.log_softmax(t, -1).gather(-1, torch.tensor(targets)[..., None]).squeeze(-1)
    np.testing.assert_allclose(np.array(logps), want.numpy(), rtol=1e-5, atol=1e-5)
    p = torch.softmax(t, -1)
    want_entropy = -(p * torch.log_softmax(t, -1)).sum(-1)
    np.testing.assert_allclose(np.array(entropy), want_entropy.numpy(), rtol=1e-5, atol=1e-5)


def test_token_logps_keeps_no_vocabulary_array_beside_the_gradient():
    """A compiled GRPO loss over token_logps peaks, beyond its inputs, at two arrays of the
    (rows, positions, vocabulary) size: the logits' gradient and the entropy's softmax (a
    metric, off the gradient's path); the log-probs are the fused cross-entropy's. The
    log-sum-exp formulation's softmax, kept for the gradient, made it three."""
    import mlx.core as mx

    from mlxlab.objectives.rl.grpo_loss import token_logps

    logits = mx.random.normal((4, 64, 8192), key=mx.random.key(0))
    targets = mx.random.randint(0, 8192, (4, 64), key=mx.random.key(1))
    advantages = mx.random.normal((4, 64), key=mx.random.key(2))
    mx.eval(logits, targets, advantages)

    def loss(x):
        logps, entropy = token_logps(x, targets)
        return (logps * advantages).sum(), mx.stop_gradient(entropy.mean())

    step = mx.compile(mx.value_and_grad(loss))
    mx.eval(step(logits))  # traced and compiled once: measured on the next call
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    (value, entropy), grad = step(logits)
    mx.eval(value, entropy, grad)
    assert (mx.get_peak_memory() - before) / logits.nbytes < 2.5
    assert 0 < entropy.item() < float(np.log(8192)) + 1e-3
