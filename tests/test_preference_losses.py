"""The preference losses (training/preference_losses.py) against NumPy transcriptions of the
papers' formulas in float64: each loss, its metrics, and its gradient with respect to the
policy's log-probabilities (central finite differences of the NumPy loss) to 1e-5."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxlab.errors import ConfigError
from mlxlab.objectives.preference.preference_losses import PairLogps, pair_loss


def logsig(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


# --- the papers' formulas, per pair, from sums of log-probs and token counts -----------------


def np_dpo(pc, pr, rc, rr, nc, nr, nll, beta, ls, gamma):
    """Rafailov et al. 2023 eq. 7 with conservative smoothing (Mitchell 2023)."""
    z = beta * np.log(np.exp(pc - rc) / np.exp(pr - rr))
    return -(1 - ls) * logsig(z) - ls * logsig(-z), beta * (pc - rc), beta * (pr - rr)


def np_ipo(pc, pr, rc, rr, nc, nr, nll, beta, ls, gamma):
    """Azar et al. 2023 eq. 17 on per-token mean log-probs (TRL's), τ = β."""
    h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc) / nc, beta * (pr - rr) / nr


def np_orpo(pc, pr, rc, rr, nc, nr, nll, beta, ls, gamma):
    """Hong et al. 2024 eq. 6-7: odds(y) = P(y) / (1 - P(y)), P the mean-token probability;
    the NLL is added to the mean outside (L_SFT + λ L_OR)."""
    p_w, p_l = np.exp(pc / nc), np.exp(pr / nr)
    ratio = np.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
    return -beta * logsig(ratio), beta * pc / nc, beta * pr / nr


def np_simpo(pc, pr, rc, rr, nc, nr, nll, beta, ls, gamma):
    """Meng et al. 2024 eq. 6: -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)."""
    z = beta / nc * pc - beta / nr * pr - gamma
    return -(1 - ls) * logsig(z) - ls * logsig(-z), beta * pc / nc, beta * pr / nr


NUMPY = {"sigmoid": np_dpo, "ipo": np_ipo, "orpo": np_orpo, "simpo": np_simpo}


def np_loss(name, pc, pr, inputs, settings) -> float:
    losses, _, _ = NUMPY[name](pc, pr, *inputs, **settings)
    return float(losses.mean() + (inputs[-1] if name == "orpo" else 0.0))


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    n = 6
    nc, nr = rng.integers(3, 20, n).astype(np.float64), rng.integers(3, 20, n).astype(np.float64)
    pc = -nc * rng.uniform(0.3, 2.5, n)  # sums of log-probs: negative, ~ -1 a token
    pr = -nr * rng.uniform(0.3, 2.5, n)
    rc, rr = pc + rng.normal(0, 1.5, n), pr + rng.normal(0, 1.5, n)
    return pc, pr, rc, rr, nc, nr, 2.3  # 2.3: ORPO's mean NLL over the chosen tokens


CASES = [
    ("sigmoid", {"beta": 0.1, "ls": 0.0}),
    ("sigmoid", {"beta": 0.5, "ls": 0.2}),
    ("ipo", {"beta": 0.1, "ls": 0.0}),
    ("ipo", {"beta": 1.0, "ls": 0.0}),
    ("orpo", {"beta": 0.1, "ls": 0.0}),
    ("orpo", {"beta": 1.0, "ls": 0.0}),
    ("simpo", {"beta": 2.0, "ls": 0.0}),
    ("simpo", {"beta": 2.5, "ls": 0.1}),
]


def mlx_loss(name, pc, pr, inputs, settings):
    rc, rr, nc, nr, nll = inputs
    f32 = lambda a: mx.array(np.asarray(a, np.float32))  # noqa: E731
    ref = PairLogps(f32(rc), f32(rr), f32(nc), f32(nr))

    def loss(c, r):
        policy = PairLogps(c, r, f32(nc), f32(nr))
        return pair_loss(
            name,
            policy,
            ref,
            chosen_nll=f32(nll),
            beta=settings["beta"],
            label_smoothing=settings["ls"],
            gamma=settings["gamma"],
        )

    return loss, f32(pc), f32(pr)


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_loss_metrics_and_gradient_equal_the_papers_formulas(pairs, name, settings):
    pc, pr, *inputs = pairs
    settings = {**settings, "gamma": 0.7}
    loss_of, c, r = mlx_loss(name, pc, pr, inputs, settings)
    loss, metrics, per_pair = loss_of(c, r)
    expected, chosen_rw, rejected_rw = NUMPY[name](pc, pr, *inputs, **settings)
    assert loss.item() == pytest.approx(np_loss(name, pc, pr, inputs, settings), abs=1e-5)
    np.testing.assert_allclose(np.array(per_pair), expected, atol=1e-5, rtol=1e-5)
    nc, nr = inputs[2], inputs[3]
    dpo = name == "sigmoid"
    want = {
        "rewards/chosen": chosen_rw.mean(),
        "rewards/rejected": rejected_rw.mean(),
        "rewards/margin": (chosen_rw - rejected_rw).mean(),
        "rewards/accuracy": (chosen_rw > rejected_rw).mean(),
        "logps/chosen": (pc if dpo else pc / nc).mean(),
        "logps/rejected": (pr if dpo else pr / nr).mean(),
    }
    for key, value in want.items():
        assert metrics[key].item() == pytest.approx(value, abs=1e-5), key
    assert 0.0 < want["rewards/accuracy"] < 1.0  # the fixture has pairs either way

    # d loss / d policy log-probs: MLX's autodiff against central differences in float64
    grads = mx.grad(lambda c_, r_: loss_of(c_, r_)[0], argnums=(0, 1))(c, r)
    h = 1e-6
    for which, (got, base) in enumerate(zip(grads, (pc, pr))):
        numeric = np.zeros_like(base)
        for i in range(len(base)):
            up, down = base.copy(), base.copy()
            up[i] += h
            down[i] -= h
            args = [(up, pr), (down, pr)] if which == 0 else [(pc, up), (pc, down)]
            numeric[i] = (
                np_loss(name, *args[0], inputs, settings)
                - np_loss(name, *args[1], inputs, settings)
            ) / (2 * h)
        np.testing.assert_allclose(np.array(got), numeric, atol=1e-5, rtol=1e-4)
        assert np.abs(numeric).max() > 1e-4  # a gradient that exists


def test_orpo_adds_the_nll_and_reports_the_log_odds(pairs):
    pc, pr, *inputs = pairs
    nc, nr = inputs[2], inputs[3]
    settings = {"beta": 0.1, "ls": 0.0, "gamma": 0.0}
    loss_of, c, r = mlx_loss("orpo", pc, pr, inputs, settings)
    _, metrics, _ = loss_of(c, r)
    ratio = np.log(np.exp(pc / nc) / (1 - np.exp(pc / nc))) - np.log(
        np.exp(pr / nr) / (1 - np.exp(pr / nr))
    )
    assert metrics["nll_loss"].item() == pytest.approx(2.3, abs=1e-6)
    assert metrics["log_odds_chosen"].item() == pytest.approx(ratio.mean(), abs=1e-5)
    assert metrics["log_odds_ratio"].item() == pytest.approx(logsig(ratio).mean(), abs=1e-5)
    # the NLL's own gradient is 1: ORPO's supervised term trains the chosen completions
    grad = mx.grad(
        lambda n: pair_loss(
            "orpo",
            PairLogps(c, r, mx.array(nc, mx.float32), mx.array(nr, mx.float32)),
            chosen_nll=n,
        )[0]
    )(mx.array(2.3))
    assert grad.item() == pytest.approx(1.0)


def test_bad_names_and_a_missing_reference_are_config_errors(pairs):
    policy = PairLogps(*(mx.array([-1.0]) for _ in range(4)))
    with pytest.raises(ConfigError, match="objective.loss='kto' is not one of"):
        pair_loss("kto", policy)
    with pytest.raises(ConfigError, match="reference"):
        pair_loss("sigmoid", policy)
