"""The losses against NumPy written from their formulas: per example for classifiers, per scored
token (loss_mask) for language models, label smoothing, and distillation with two teachers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxlab.objectives import losses


class FixedLogits(nn.Module):
    """A model whose logits are given (teachers and students below need exact known outputs)."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = mx.array(logits)

    def __call__(self, input_ids, attention_mask=None):
        return self.logits


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    logp = log_softmax(logits)
    nll = -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return (1 - smoothing) * nll + smoothing * -logp.mean(axis=-1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def lm_batch(rng, b=3, t=5, v=11):
    mask = (rng.random((b, t)) > 0.3).astype(np.float32)
    mask[0] = 0.0  # a padding row scores nothing
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    batch = {"input_ids": mx.zeros((b, t), mx.int32), "labels": mx.array(labels),
             "loss_mask": mx.array(mask)}
    return batch, labels, mask


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classification_loss_is_the_mean_cross_entropy(rng, smoothing):
    logits = rng.normal(size=(6, 3)).astype(np.float32) * 4
    labels = rng.integers(0, 3, 6).astype(np.int32)
    batch = {"input_ids": mx.zeros((6, 4), mx.int32), "labels": mx.array(labels)}
    loss, aux = losses.task_loss("classification", smoothing)(FixedLogits(logits), batch)
    assert loss.item() == pytest.approx(np_cross_entropy(logits, labels, smoothing).mean(), rel=1e-5)
    assert aux["ntokens"].item() == 6


def test_lm_loss_averages_over_scored_tokens_only(rng):
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    batch, labels, mask = lm_batch(rng)
    loss, aux = losses.task_loss("lm")(FixedLogits(logits), batch)
    expected = (np_cross_entropy(logits, labels) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert aux["ntokens"].item() == mask.sum()


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown data task 'regression'"):
        losses.task_loss("regression")


def test_distillation_loss_matches_numpy_with_two_weighted_teachers(rng):
    alpha, temperature, weights = 0.3, 2.0, (1.0, 3.0)
    student, t1, t2 = (rng.normal(size=(3, 5, 11)).astype(np.float32) * 2 for _ in range(3))
    batch, labels, mask = lm_batch(rng)
    loss_fn = losses.distillation_loss(
        [FixedLogits(t1), FixedLogits(t2)], list(weights), alpha=alpha, temperature=temperature
    )
    loss, aux = loss_fn(FixedLogits(student), batch)

    w = np.array(weights) / sum(weights)
    p_teacher = w[0] * np.exp(log_softmax(t1 / temperature)) + w[1] * np.exp(log_softmax(t2 / temperature))
    kl = (p_teacher * (np.log(p_teacher) - log_softmax(student / temperature))).sum(-1) * temperature**2
    ce = np_cross_entropy(student, labels)
    ce_mean, kl_mean = ((x * mask).sum() / mask.sum() for x in (ce, kl))
    assert aux["ce"].item() == pytest.approx(ce_mean, rel=1e-5)
    assert aux["kl"].item() == pytest.approx(kl_mean, rel=1e-4)
    assert loss.item() == pytest.approx(alpha * ce_mean + (1 - alpha) * kl_mean, rel=1e-5)


def test_distillation_gradient_reaches_the_student_only(rng):
    """d loss / d student logits = alpha * (softmax(s) - onehot) / N + (1 - alpha) * T *
    (softmax(s / T) - p_teacher) / N for a classifier batch of N examples."""
    alpha, temperature = 0.5, 2.0
    s, t = (rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2))
    labels = rng.integers(0, 3, 4).astype(np.int32)
    batch = {"input_ids": mx.zeros((4, 2), mx.int32), "labels": mx.array(labels)}
    student, teacher = FixedLogits(s), FixedLogits(t)
    loss_fn = losses.distillation_loss([teacher], alpha=alpha, temperature=temperature)
    grads = nn.value_and_grad(student, loss_fn)(student, batch)[1]

    soft = np.exp(log_softmax(s))
    onehot = np.eye(3)[labels]
    p_s, p_t = np.exp(log_softmax(s / temperature)), np.exp(log_softmax(t / temperature))
    expected = (alpha * (soft - onehot) + (1 - alpha) * temperature * (p_s - p_t)) / 4
    np.testing.assert_allclose(np.array(grads["logits"]), expected, atol=1e-6)
    assert np.array_equal(np.array(teacher.logits), t)  # the teacher is only read


def test_plain_kl_form_is_alpha_ce_plus_one_minus_alpha_kl(rng):
    """objective.kl_scale=none: the simplified form alpha*CE + (1-alpha)*KL, no T^2; the
    default (t2) is exactly T^2 times that KL."""
    alpha, temperature = 0.3, 3.0
    student, teacher = (rng.normal(size=(3, 5, 11)).astype(np.float32) * 2 for _ in range(2))
    batch, labels, mask = lm_batch(rng)
    plain_fn = losses.distillation_loss([FixedLogits(teacher)], alpha=alpha,
                                        temperature=temperature, kl_scale="none")
    loss, aux = plain_fn(FixedLogits(student), batch)
    p_t = np.exp(log_softmax(teacher / temperature))
    kl = (p_t * (np.log(p_t) - log_softmax(student / temperature))).sum(-1)
    ce = np_cross_entropy(student, labels)
    ce_mean, kl_mean = ((x * mask).sum() / mask.sum() for x in (ce, kl))
    assert aux["kl"].item() == pytest.approx(kl_mean, rel=1e-4)
    assert loss.item() == pytest.approx(alpha * ce_mean + (1 - alpha) * kl_mean, rel=1e-5)
    _, hinton = losses.distillation_loss([FixedLogits(teacher)], alpha=alpha,
                                         temperature=temperature)(FixedLogits(student), batch)
    assert hinton["kl"].item() == pytest.approx(temperature**2 * kl_mean, rel=1e-4)


@pytest.mark.parametrize("kl_scale", ["t2", "none"])
def test_reverse_kl_is_the_students_divergence_from_the_teachers(rng, kl_scale):
    alpha, temperature, weights = 0.4, 2.0, (2.0, 1.0)
    student, t1, t2 = (rng.normal(size=(3, 5, 11)).astype(np.float32) * 2 for _ in range(3))
    batch, labels, mask = lm_batch(rng)
    loss_fn = losses.distillation_loss([FixedLogits(t1), FixedLogits(t2)], list(weights),
                                       alpha=alpha, temperature=temperature, loss="reverse_kl",
                                       kl_scale=kl_scale)
    loss, aux = loss_fn(FixedLogits(student), batch)
    w = np.array(weights) / sum(weights)
    p_t = w[0] * np.exp(log_softmax(t1 / temperature)) + w[1] * np.exp(log_softmax(t2 / temperature))
    log_p_s = log_softmax(student / temperature)
    reverse = (np.exp(log_p_s) * (log_p_s - np.log(p_t))).sum(-1)
    reverse *= temperature**2 if kl_scale == "t2" else 1.0
    ce = np_cross_entropy(student, labels)
    ce_mean, soft_mean = ((x * mask).sum() / mask.sum() for x in (ce, reverse))
    assert set(aux) == {"ntokens", "ce", "reverse_kl"}
    assert aux["reverse_kl"].item() == pytest.approx(soft_mean, rel=1e-4)
    assert loss.item() == pytest.approx(alpha * ce_mean + (1 - alpha) * soft_mean, rel=1e-5)


def test_mse_distillation_compares_the_weighted_teacher_logits(rng):
    """loss=mse: the mean over classes of the squared logit difference, against the teachers'
    logits averaged with their weights; no temperature in it."""
    alpha, weights = 0.5, (1.0, 3.0)
    student, t1, t2 = (rng.normal(size=(3, 5, 11)).astype(np.float32) * 2 for _ in range(3))
    batch, labels, mask = lm_batch(rng)
    teachers = [FixedLogits(t1), FixedLogits(t2)]
    results = [losses.distillation_loss(teachers, list(weights), alpha=alpha, temperature=t,
                                        loss="mse", per_example=True)(FixedLogits(student), batch)
               for t in (1.0, 4.0)]
    w = np.array(weights) / sum(weights)
    z_t = w[0] * t1.astype(np.float64) + w[1] * t2
    mse = ((student - z_t) ** 2).mean(-1)
    ce = np_cross_entropy(student, labels)
    ce_mean, mse_mean = ((x * mask).sum() / mask.sum() for x in (ce, mse))
    for loss, aux in results:
        assert aux["mse"].item() == pytest.approx(mse_mean, rel=1e-5)
        assert loss.item() == pytest.approx(alpha * ce_mean + (1 - alpha) * mse_mean, rel=1e-5)
    teacher_ce = (np_cross_entropy(z_t, labels) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    np.testing.assert_allclose(np.array(results[0][1]["example_teacher_loss"]), teacher_ce,
                               rtol=1e-4)


def test_unknown_distillation_form_is_one_clear_line():
    teacher = FixedLogits(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"objective.loss='js' is not one of \['kl', "):
        losses.distillation_loss([teacher], loss="js")
    with pytest.raises(ValueError, match=r"objective.kl_scale='T' is not one of \['t2', "):
        losses.distillation_loss([teacher], kl_scale="T")
