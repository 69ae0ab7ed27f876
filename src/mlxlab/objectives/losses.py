"""Losses: pure functions `loss_fn(model, batch) -> (loss, aux)`.

`aux` holds scalar arrays the trainer may log (`ntokens` weights accumulation exactly). The
cross-entropy is mlxlab.kernels.cross_entropy: a fused CPU kernel, or its pure-MLX formulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels
from mlxlab.errors import ConfigError
from mlxlab.objectives.head_chunks import chunked_head_cross_entropy

Batch = dict[str, mx.array]
LossFn = Callable[[nn.Module, Batch], tuple[mx.array, dict[str, mx.array]]]

# aux keys `example_<column>` hold one value per example (not scalars): a loss built with
# per_example=True adds them (example_loss, and what else its objective measures per example)
# for callbacks such as PerExampleLosses, which write each as the column <column>; the trainer
# takes them out before averaging aux.
EXAMPLE_PREFIX = "example_"


def per_example_mean(values: mx.array, batch: Batch) -> mx.array:
    """One value per example: itself (classifiers) or the mean over its scored tokens (lm)."""
    mask = batch.get("loss_mask")
    if mask is None:
        return values
    return (values * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)


def pop_example_outputs(aux: dict[str, mx.array]) -> dict[str, mx.array]:
    """Take the per-example entries out of `aux` (what is left are scalars to average)."""
    return {k: aux.pop(k) for k in [k for k in aux if k.startswith(EXAMPLE_PREFIX)]}


def token_cross_entropy(logits: mx.array, targets: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """Per-example cross-entropy over the last axis (no reduction); fused on CPU (mlxlab.kernels)."""
    logits = logits.astype(mx.float32)
    ce = kernels.cross_entropy(logits, targets)
    if label_smoothing > 0.0:
        # Smoothed target puts eps/V on every class: the extra term is mean(lse - logits).
        lse = ce + mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
        smooth = lse - logits.mean(axis=-1)
        ce = (1.0 - label_smoothing) * ce + label_smoothing * smooth
    return ce


# batch keys a vision-language model reads beside the ids (data/vision_chat.py): the processor's
# pixel arrays and image grids, and a prefix-LM family's token types (PaliGemma's prefix and
# answer), handed to the model by name
IMAGE_INPUTS = ("pixel_", "image_", "token_type_ids")


def forward(model: nn.Module, batch: Batch) -> mx.array:
    """Logits of any mlxlab model; LM batches have no attention_mask (right-padded, causal); a
    packed batch's `segment_ids` keep its rows apart (models/decoders/packing.py); an image chat's
    pixel arrays go to the model by name."""
    if "segment_ids" in batch:
        return model(batch["input_ids"], segment_ids=batch["segment_ids"])
    images = {k: v for k, v in batch.items() if k.startswith(IMAGE_INPUTS)}
    if images:
        return model(batch["input_ids"], **images)
    return model(batch["input_ids"], batch.get("attention_mask"))


def masked_sum(values: mx.array, batch: Batch) -> tuple[mx.array, mx.array]:
    """(sum, count) of per-example values (classifiers: every example counts) or per-token
    values (language models: weighted by loss_mask, so padding and repeated tokens count 0)."""
    mask = batch.get("loss_mask")
    if mask is None:
        return values.sum(), mx.array(values.shape[0], dtype=mx.float32)
    return (values * mask).sum(), mask.sum()


def masked_mean(values: mx.array, batch: Batch) -> tuple[mx.array, mx.array]:
    """(mean, count) over what counts in `batch`, see masked_sum."""
    total, count = masked_sum(values, batch)
    return total / mx.maximum(count, 1.0), count


def task_loss(task: str, label_smoothing: float = 0.0, per_example: bool = False,
              head_chunk: int = 0) -> LossFn:
    """Cross-entropy against batch["labels"]: per example (classification) or per scored token
    (lm). `aux["ntokens"]` is the count the mean is over; per_example=True adds
    `aux["example_loss"]`, each example's loss, from the values the mean is taken over.
    `head_chunk` (lm): the output head's logits that many tokens at a time (head_chunks.py; the
    model's `head_split`, which the caller checked)."""
    if task not in ("classification", "lm"):
        raise ConfigError(f"unknown data task {task!r}: expected 'classification' or 'lm'")

    def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
        return token_cross_entropy(logits, targets, label_smoothing)

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        if head_chunk:
            ce = chunked_head_cross_entropy(model.head_split(), batch["input_ids"],
                                            batch.get("segment_ids"), batch["labels"],
                                            head_chunk, cross_entropy)
        else:
            ce = cross_entropy(forward(model, batch), batch["labels"])
        loss, count = masked_mean(ce, batch)
        if per_example:
            return loss, {"ntokens": count, "example_loss": per_example_mean(mx.stop_gradient(ce), batch)}
        return loss, {"ntokens": count}

    return loss_fn


# objective.loss: the soft term (conf/objective/distill.yaml). kl and reverse_kl compare the
# distributions at temperature T; mse compares the raw logits (no temperature).
DISTILL_LOSSES = ("kl", "reverse_kl", "mse")
# objective.kl_scale: t2 multiplies a KL by T^2 (Hinton et al. 2015: the soft gradients,
# which scale as 1/T^2, keep their size as T changes); none is the plain alpha*CE + (1-alpha)*KL.
KL_SCALES = ("t2", "none")


def check_distill_form(loss: str, kl_scale: str) -> None:
    """One line naming the key for an unknown objective.loss or objective.kl_scale."""
    if loss not in DISTILL_LOSSES:
        raise ConfigError(f"objective.loss={loss!r} is not one of {list(DISTILL_LOSSES)}")
    if kl_scale not in KL_SCALES:
        raise ConfigError(f"objective.kl_scale={kl_scale!r} is not one of {list(KL_SCALES)}")


def soft_cross_entropy_kl(student: mx.array, teacher_probs: mx.array, temperature: float) -> mx.array:
    """KL(teacher || student) at temperature T, per position (no reduction)."""
    log_p_student = nn.log_softmax(student.astype(mx.float32) / temperature, axis=-1)
    log_p_teacher = mx.log(mx.maximum(teacher_probs, 1e-12))
    return (teacher_probs * (log_p_teacher - log_p_student)).sum(axis=-1)


def reverse_kl(student: mx.array, teacher_probs: mx.array, temperature: float) -> mx.array:
    """KL(student || teacher) at temperature T, per position (no reduction): mode-seeking, the
    student is pushed off the tokens the teacher finds unlikely rather than made to cover all."""
    log_p_student = nn.log_softmax(student.astype(mx.float32) / temperature, axis=-1)
    log_p_teacher = mx.log(mx.maximum(teacher_probs, 1e-12))
    return (mx.exp(log_p_student) * (log_p_student - log_p_teacher)).sum(axis=-1)


def logit_mse(student: mx.array, teacher_logits: mx.array) -> mx.array:
    """Mean over classes of (student logit - teacher logit)^2, per position (no reduction): the
    large-T limit of T^2 * KL, up to a factor 2 and the logits' means (Hinton et al. 2015)."""
    return mx.square(student.astype(mx.float32) - teacher_logits).mean(axis=-1)


def teacher_logits(
    teachers: Sequence[nn.Module], weights: Sequence[float] | None
) -> Callable[[Batch], mx.array]:
    """batch -> the teachers' logits averaged with `weights` (loss=mse), under stop_gradient."""
    w = _normalized_weights(teachers, weights)

    def logits(batch: Batch) -> mx.array:
        out = None
        for weight, teacher in zip(w, teachers):
            z = weight * mx.stop_gradient(forward(teacher, batch)).astype(mx.float32)
            out = z if out is None else out + z
        return out

    return logits


def _normalized_weights(teachers: Sequence[nn.Module], weights: Sequence[float] | None) -> list[float]:
    if not teachers:
        raise ConfigError("distillation needs at least one teacher: set objective.teachers")
    w = list(weights) if weights else [1.0] * len(teachers)
    if len(w) != len(teachers):
        raise ConfigError(f"{len(teachers)} teachers but {len(w)} weights in objective.teachers")
    return [x / float(sum(w)) for x in w]


def teacher_probabilities(
    teachers: Sequence[nn.Module], weights: Sequence[float] | None, temperature: float
) -> Callable[[Batch], mx.array]:
    """batch -> the teachers' softened distributions softmax(logits / T), averaged with `weights`,
    under stop_gradient (no gradient is ever computed for a teacher)."""
    w = _normalized_weights(teachers, weights)

    def probs(batch: Batch) -> mx.array:
        out = None
        for weight, teacher in zip(w, teachers):
            logits = mx.stop_gradient(forward(teacher, batch)).astype(mx.float32)
            p = weight * mx.softmax(logits / temperature, axis=-1)
            out = p if out is None else out + p
        return out

    return probs


def teacher_log_probs(
    teachers: Sequence[nn.Module], weights: Sequence[float] | None, temperature: float
) -> Callable[[Batch], mx.array]:
    """batch -> log of teacher_probabilities' mixture, log sum_k w_k softmax(logits_k / T), as
    log-sum-exp of each teacher's log-softmax (one teacher: its log-softmax to the bit, no
    probability rounds to 0 first), under stop_gradient."""
    logw = [math.log(w) for w in _normalized_weights(teachers, weights)]

    def logps(batch: Batch) -> mx.array:
        parts = []
        for log_weight, teacher in zip(logw, teachers):
            logits = mx.stop_gradient(forward(teacher, batch)).astype(mx.float32)
            parts.append(nn.log_softmax(logits / temperature, axis=-1) + log_weight)
        return parts[0] if len(parts) == 1 else mx.logsumexp(mx.stack(parts), axis=0)

    return logps


def teacher_targets(
    teachers: Sequence[nn.Module], weights: Sequence[float] | None, temperature: float,
    loss: str = "kl",
) -> Callable[[Batch], mx.array]:
    """What the soft term of `loss` compares the student with: the teachers' probabilities at T
    (kl, reverse_kl) or their logits (mse). objectives/supervised/distill.py teacher_cache keeps
    these per example."""
    if loss == "mse":
        return teacher_logits(teachers, weights)
    return teacher_probabilities(teachers, weights, temperature)


def distillation_loss(
    teachers: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    label_smoothing: float = 0.0,
    cache: mx.array | None = None,
    per_example: bool = False,
    loss: str = "kl",
    kl_scale: str = "t2",
) -> LossFn:
    """alpha * CE(student, labels) + (1 - alpha) * soft term, where the soft term is `loss`:

    - kl (default): T^2 * KL(softmax(teacher/T) || softmax(student/T)) (Hinton's form); with
      kl_scale="none" the KL alone, the form alpha*CE + (1-alpha)*KL;
    - reverse_kl: KL(softmax(student/T) || softmax(teacher/T)), times T^2 unless kl_scale="none";
    - mse: the mean squared difference of the raw logits (temperature and kl_scale unused).

    Per example (classifiers) or per scored token (language models), as in task_loss; several
    teachers are averaged (teacher_targets). `cache`: the teacher targets of every training
    example, (N, num_labels), looked up by batch["index"] instead of running the teachers in every
    step (objectives/supervised/distill.py teacher_cache builds it for fixed datasets). aux holds
    `ce` and the soft term under the loss's name (kl, reverse_kl, mse). per_example=True adds each
    example's hard-label CE (`example_loss`) and the teachers' (`example_teacher_loss`: the CE of
    softmax(T * log p_T), which is the teacher's own distribution for one teacher; of the logits
    for mse).
    """
    check_distill_form(loss, kl_scale)
    targets_of = teacher_targets(teachers, weights, temperature, loss)
    scale = temperature**2 if kl_scale == "t2" else 1.0

    def soft_term(logits: mx.array, targets: mx.array) -> mx.array:
        if loss == "mse":
            return logit_mse(logits, targets)
        divergence = soft_cross_entropy_kl if loss == "kl" else reverse_kl
        return divergence(logits, targets, temperature) * scale

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        logits = forward(model, batch)
        targets = cache[batch["index"]] if cache is not None else targets_of(batch)
        ce_all = token_cross_entropy(logits, batch["labels"], label_smoothing)
        ce, ntokens = masked_mean(ce_all, batch)
        soft, _ = masked_mean(soft_term(logits, targets), batch)
        total = alpha * ce + (1.0 - alpha) * soft
        aux = {"ntokens": ntokens, "ce": ce, loss: soft}
        if per_example:
            teacher_logits_ = targets if loss == "mse" else (
                temperature * mx.log(mx.maximum(targets, 1e-12)))
            teacher = token_cross_entropy(teacher_logits_, batch["labels"])
            aux["example_loss"] = per_example_mean(mx.stop_gradient(ce_all), batch)
            aux["example_teacher_loss"] = per_example_mean(mx.stop_gradient(teacher), batch)
        return total, aux

    return loss_fn


def rows_counted(loss_mask: mx.array) -> mx.array:
    """The rows of a (B, T) mask with a position that counts (a masked padding row counts 0):
    a loss averaged over rows reports it as the step's `ntokens`. Computed apart from any count
    the loss itself reads: MLX 0.32's compiled step failed ("IndexError: _Map_base::at") on an
    output that was the same expression as one inside the differentiated loss."""
    return (loss_mask.sum(axis=-1) > 0).sum().astype(mx.float32)
