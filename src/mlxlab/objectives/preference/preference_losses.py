"""Preference losses as pure functions of sequence log-probabilities: DPO (sigmoid), IPO, ORPO
and SimPO, each with the metrics TRL logs (rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected; TRL writes the last two rewards/ names in the
plural).

The inputs are one value per pair (shape (B,)): the policy's log-probability of the chosen and of
the rejected completion, summed over the completion's tokens, with the token counts, and for
DPO and IPO the reference model's. Which form a loss reads is the paper's: DPO the sums
(Rafailov et al. 2023), IPO (Azar et al. 2023, as TRL computes it), ORPO (Hong et al. 2024) and
SimPO (Meng et al. 2024) the per-token means. Nothing here runs a model: preference.py builds
the log-probabilities and calls `pair_loss`, so each formula is tested on given numbers
(tests/test_preference_losses.py against NumPy transcriptions of the papers).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.errors import ConfigError

# objective.loss: sigmoid = DPO (TRL's loss_type name), ipo, orpo, simpo
PREFERENCE_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
# the losses that compare with a reference model (orpo and simpo need none)
NEEDS_REFERENCE = ("sigmoid", "ipo")


class PairLogps(NamedTuple):
    """Per-pair log-probabilities of the completions: sums over their tokens, and counts."""

    chosen: mx.array
    rejected: mx.array
    chosen_tokens: mx.array
    rejected_tokens: mx.array

    def means(self) -> tuple[mx.array, mx.array]:
        """The per-token averages (IPO, ORPO, SimPO read these)."""
        return (
            self.chosen / mx.maximum(self.chosen_tokens, 1.0),
            self.rejected / mx.maximum(self.rejected_tokens, 1.0),
        )


class PairLoss(NamedTuple):
    """A loss's value per pair and the rewards TRL reports for it."""

    losses: mx.array  # (B,), averaged into the loss
    chosen_rewards: mx.array  # (B,)
    rejected_rewards: mx.array  # (B,)


def check_loss_name(name: str) -> None:
    if name not in PREFERENCE_LOSSES:
        raise ConfigError(
            f"objective.loss={name!r} is not one of {list(PREFERENCE_LOSSES)}"
        )


def _smoothed_logsigmoid_loss(logits: mx.array, label_smoothing: float) -> mx.array:
    """-log σ(z) with conservative label smoothing ε (Mitchell 2023, TRL's sigmoid loss): the
    preference is flipped with probability ε, -(1-ε) log σ(z) - ε log σ(-z)."""
    loss = -nn.log_sigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - nn.log_sigmoid(-logits) * label_smoothing
    return loss


def dpo(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO: -log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]) on summed
    log-probs; rewards β (log π - log π_ref)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return PairLoss(
        _smoothed_logsigmoid_loss(chosen - rejected, label_smoothing),
        mx.stop_gradient(chosen),
        mx.stop_gradient(rejected),
    )


def ipo(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float = 0.1,
) -> PairLoss:
    """IPO: (h - 1/(2β))² with h the log-ratio difference of per-token mean log-probs (TRL's
    form; the paper's τ is β); rewards β (log π - log π_ref)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return PairLoss(
        mx.square(h - 1.0 / (2.0 * beta)),
        mx.stop_gradient(beta * (policy_chosen - ref_chosen)),
        mx.stop_gradient(beta * (policy_rejected - ref_rejected)),
    )


# The largest mean log-prob log(1 - P) is taken at: log(1 - 2^-24). At 0 (P = 1: a reply the model
# is certain of, or the masked padding row of a rank without rows under data parallelism, whose
# mean is 0) log(1 - P) is -inf, the loss NaN, and so is its gradient, even weighted by 0.
LOG_P_MAX = float(np.log1p(-(2.0**-24)))


def log_odds(chosen_mean: mx.array, rejected_mean: mx.array) -> mx.array:
    """log odds(y_w) - log odds(y_l), odds(y) = P(y) / (1 - P(y)) with P the per-token mean
    probability exp(mean log-prob) (ORPO, eq. 3)."""

    def log_1m_p(mean: mx.array) -> mx.array:
        return mx.log1p(-mx.exp(mx.minimum(mean, LOG_P_MAX)))

    return (chosen_mean - rejected_mean) - (log_1m_p(chosen_mean) - log_1m_p(rejected_mean))


def orpo(chosen_mean: mx.array, rejected_mean: mx.array, beta: float = 0.1) -> PairLoss:
    """ORPO's odds-ratio term, -β log σ(log odds ratio) (β is the paper's λ, TRL's name); the
    NLL of the chosen completion is added by `pair_loss`. Rewards β · mean log-prob, as TRL."""
    return PairLoss(
        -beta * nn.log_sigmoid(log_odds(chosen_mean, rejected_mean)),
        mx.stop_gradient(beta * chosen_mean),
        mx.stop_gradient(beta * rejected_mean),
    )


def simpo(
    chosen_mean: mx.array,
    rejected_mean: mx.array,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """SimPO: -log σ(β (mean log π(y_w) - mean log π(y_l)) - γ), no reference model; rewards
    β · mean log-prob."""
    logits = beta * (chosen_mean - rejected_mean) - gamma
    return PairLoss(
        _smoothed_logsigmoid_loss(logits, label_smoothing),
        mx.stop_gradient(beta * chosen_mean),
        mx.stop_gradient(beta * rejected_mean),
    )


def pair_loss(
    name: str,
    policy: PairLogps,
    reference: PairLogps | None = None,
    chosen_nll: mx.array | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> tuple[mx.array, dict[str, mx.array], mx.array]:
    """(loss, metrics, per-pair losses) of loss `name` (PREFERENCE_LOSSES). `reference`: the
    reference model's log-probs (sigmoid, ipo); `chosen_nll`: the mean NLL over the chosen
    completions' tokens, ORPO's supervised term. Metrics are batch means under TRL's names;
    the log-probs reported are those the loss reads (sums for DPO, means for the others)."""
    check_loss_name(name)
    if name in NEEDS_REFERENCE and reference is None:
        raise ConfigError(f"objective.loss={name} compares with a reference model")
    extra: dict[str, mx.array] = {}
    if name == "sigmoid":
        chosen, rejected = policy.chosen, policy.rejected
        out = dpo(chosen, rejected, reference.chosen, reference.rejected, beta, label_smoothing)
    elif name == "ipo":
        chosen, rejected = policy.means()
        ref_chosen, ref_rejected = reference.means()
        out = ipo(chosen, rejected, ref_chosen, ref_rejected, beta)
    elif name == "orpo":
        if chosen_nll is None:
            raise ConfigError("objective.loss=orpo needs the chosen completions' NLL")
        chosen, rejected = policy.means()
        out = orpo(chosen, rejected, beta)
        ratio = log_odds(chosen, rejected)
        extra = {
            "nll_loss": mx.stop_gradient(chosen_nll),
            "log_odds_ratio": mx.stop_gradient(nn.log_sigmoid(ratio).mean()),
            "log_odds_chosen": mx.stop_gradient(ratio.mean()),
        }
    else:
        chosen, rejected = policy.means()
        out = simpo(chosen, rejected, beta, gamma, label_smoothing)
    loss = out.losses.mean()
    if name == "orpo":
        loss = chosen_nll + loss
    metrics = {
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/margin": (out.chosen_rewards - out.rejected_rewards).mean(),
        "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).astype(mx.float32).mean(),
        "logps/chosen": mx.stop_gradient(chosen).mean(),
        "logps/rejected": mx.stop_gradient(rejected).mean(),
        **extra,
    }
    return loss, metrics, mx.stop_gradient(out.losses)
