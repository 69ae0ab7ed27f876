"""GRPO's arithmetic as pure functions: group-normalised advantages (NumPy, at generation time)
and the token-level clipped policy loss with its KL term (MLX, inside the compiled step).

The formulas are TRL's GRPOTrainer's (trl 1.16, `_generate_and_score_completions` and
`_compute_loss`), so a run moving from TRL trains the same objective:
- advantages: A = r - mean(group), divided by std(group) + 1e-4 (scale_rewards=group, Bessel's
  std) or by the batch's std (batch), or not at all (none: Dr. GRPO's unbiased form);
- ratio ρ = exp(log π - log π_old) per token; loss -min(ρ A, clip(ρ, 1-ε_low, 1+ε_high) A),
  plus β (exp(r - log π) - (r - log π) - 1) with r the reference's log-prob (Schulman's k3
  estimator of KL(π || π_ref)) when β > 0;
- the per-token losses reduced by the loss type: grpo = each completion's mean, averaged over
  completions; dr_grpo = the sum over the batch's tokens / (completions x
  max_completion_length); dapo = the sum / the batch's completion tokens (token-level).
With num_iterations (mu) = 1 the old policy is the policy itself (ρ = 1, its gradient A); with
mu > 1 `old_logps` are the log-probs at generation time. tests/test_grpo_loss.py holds each
type, its gradient and the advantages equal to TRL's own code.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np

from mlxlab import kernels
from mlxlab.errors import ConfigError

GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def check_loss_settings(loss_type: str, scale_rewards: str, epsilon_low: float,
                        epsilon_high: float, beta: float) -> None:
    """One line naming a setting GRPO cannot train with."""
    if loss_type not in GRPO_LOSSES:
        raise ConfigError(f"objective.loss_type={loss_type!r} is not one of {list(GRPO_LOSSES)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"objective.scale_rewards={scale_rewards!r} is not one of "
                          f"{list(SCALE_REWARDS)}")
    if not (0 <= epsilon_low < 1 and epsilon_high >= 0):
        raise ConfigError(f"objective.epsilon={epsilon_low} must be in [0, 1) and "
                          f"objective.epsilon_high={epsilon_high} >= 0")
    if beta < 0:
        raise ConfigError(f"objective.beta={beta} must be >= 0 (0: no KL term, no reference pass)")


def group_advantages(rewards: np.ndarray, group_size: int,
                     scale_rewards: str = "group") -> tuple[np.ndarray, np.ndarray]:
    """(advantage, std_is_zero) per completion; `rewards` holds `group_size` completions of each
    prompt in a row, NaN where no reward judged one (left out of its group's mean and std, its
    advantage 0). float32, as TRL computes them."""
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN group: NaN, then 0
        mean = np.nanmean(r, axis=1, keepdims=True)
        if scale_rewards == "batch":
            std = np.full_like(r, _nanstd(r.ravel()))
        else:  # group (and none: the group's std still counts frac_reward_zero_std)
            std = np.repeat(_nanstd(r, axis=1), group_size, axis=1)
        advantages = r - mean
        if scale_rewards != "none":
            advantages = advantages / (std + np.float32(STD_EPS))
    # torch.isclose(std, 0) is |std| <= 1e-8; a NaN std is not close to 0
    return (np.nan_to_num(advantages.ravel(), nan=0.0).astype(np.float32),
            (np.abs(std) <= 1e-8).ravel())


def _nanstd(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """TRL's nanstd: Bessel's std over the non-NaN values, NaN for fewer than two."""
    count = (~np.isnan(x)).sum(axis=axis, keepdims=axis is not None)
    var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=True)) ** 2, axis=axis,
                     keepdims=axis is not None)
    var = np.where(count > 1, var * count / np.maximum(count - 1, 1), np.nan)
    return np.sqrt(var).astype(np.float32)


def token_logps(logits: mx.array, targets: mx.array, temperature: float = 1.0
                ) -> tuple[mx.array, mx.array]:
    """(log-prob of each target token, entropy of each position's distribution) under
    logits / temperature, as TRL scores completions with the sampling temperature. The
    log-probs are the negated cross-entropy (kernels.cross_entropy: on the CPU one fused pass
    and a fused backward, no softmax over the vocabulary kept for the gradient); the entropy, a
    metric, is computed off the gradient's path: a step peaks at two (rows, positions,
    vocabulary) arrays beside its inputs instead of three (a 32 x 315 batch of a 49k
    vocabulary: 2 GB each)."""
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logps = -kernels.cross_entropy(logits, targets)
    frozen = mx.stop_gradient(logits)
    entropy = mx.logsumexp(frozen, axis=-1) - (mx.softmax(frozen, axis=-1) * frozen).sum(axis=-1)
    return logps, entropy


def policy_loss(
    loss_type: str,
    logps: mx.array,
    advantages: mx.array,
    mask: mx.array,
    old_logps: mx.array | None = None,
    ref_logps: mx.array | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    max_completion_length: int = 1,
) -> tuple[mx.array, dict[str, mx.array], tuple[mx.array, mx.array]]:
    """The loss of completions scored token by token: `logps`, `mask` (1: a completion token),
    `old_logps`, `ref_logps` shaped (N, T), `advantages` (N,). Returns (loss, TRL's metrics of
    it: kl, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, (the completion
    tokens, the completions with a token)).

    The counts are the arrays the loss divides by, handed out rather than summed again by the
    caller: MLX 0.32's mx.compile fails ("_Map_base::at") on a step whose aux output repeats a
    sum the differentiated loss also computes."""
    mask = mask.astype(mx.float32)
    row_tokens = mask.sum(axis=-1)
    all_tokens = row_tokens.sum()
    old = mx.stop_gradient(logps) if old_logps is None else old_logps
    adv = advantages[:, None]
    coef_1 = mx.exp(logps - old)
    coef_2 = mx.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -mx.minimum(coef_1 * adv, coef_2 * adv)
    tokens = mx.maximum(all_tokens, 1.0)
    metrics: dict[str, mx.array] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ConfigError("objective.beta > 0 needs the reference's log-probs")
        diff = ref_logps - logps
        kl = mx.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        metrics["kl"] = mx.stop_gradient((kl * mask).sum() / tokens)
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(axis=-1) / mx.maximum(row_tokens, 1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = masked.sum() / tokens
    else:
        raise ConfigError(f"objective.loss_type={loss_type!r} is not one of {list(GRPO_LOSSES)}")
    low = ((coef_1 < 1 - epsilon_low) & (adv < 0)).astype(mx.float32)
    high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).astype(mx.float32)
    region = mx.maximum(low, high)
    for name, clipped in (("low", low), ("high", high), ("region", region)):
        metrics[f"clip_ratio/{name}_mean"] = mx.stop_gradient((clipped * mask).sum() / tokens)
    completions = (row_tokens > 0).astype(mx.float32).sum()
    return loss, metrics, (all_tokens, completions)
