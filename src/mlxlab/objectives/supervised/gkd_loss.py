"""GKD's divergence as a pure function (MLX, inside the compiled step): the generalized
Jensen-Shannon divergence of Agarwal et al. ("On-Policy Distillation of Language Models",
2024) between the teacher's and the student's token distributions at temperature T.

The formula is TRL's `GKDTrainer.generalized_jsd_loss` (trl 1.16), so a run moving from TRL
trains the same objective: with s = log softmax(student / T), t = log softmax(teacher / T),
- beta = 0: KL(teacher || student) (forward KL, mean-seeking), sum_v e^t (t - s);
- beta = 1: KL(student || teacher) (reverse KL, mode-seeking), sum_v e^s (s - t);
- 0 < beta < 1: with the mixture m = log((1 - beta) e^s + beta e^t),
  beta KL(teacher || m) + (1 - beta) KL(student || m);
summed over the vocabulary at each position and averaged over the completion tokens (TRL's
"batchmean" over the positions its labels do not mask). tests/test_gkd.py holds the value and
its gradient equal to TRL's own function.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def log_probs(logits: mx.array, temperature: float) -> mx.array:
    """log softmax(logits / T) in float32."""
    logits = logits.astype(mx.float32)
    return nn.log_softmax(logits / temperature if temperature != 1.0 else logits, axis=-1)


def token_jsd(student: mx.array, teacher: mx.array, beta: float) -> mx.array:
    """The generalized JSD at each position (summed over the vocabulary, no reduction) of the
    student's and the teacher's log-probabilities (module docstring)."""
    if beta == 0.0:
        return (mx.exp(teacher) * (teacher - student)).sum(axis=-1)
    if beta == 1.0:
        return (mx.exp(student) * (student - teacher)).sum(axis=-1)
    mixture = mx.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
    to_teacher = (mx.exp(teacher) * (teacher - mixture)).sum(axis=-1)
    to_student = (mx.exp(student) * (student - mixture)).sum(axis=-1)
    return beta * to_teacher + (1.0 - beta) * to_student


def generalized_jsd(student_logits: mx.array, teacher_logps: mx.array, mask: mx.array,
                    beta: float, temperature: float) -> tuple[mx.array, mx.array, mx.array]:
    """(the mean over `mask`'s tokens, the per-token divergence, the count of tokens) of
    student logits against the teacher's log-probabilities at `temperature` (the teacher's
    already at it: teacher_log_probs). A row whose mask is all 0 adds 0 to both sums."""
    per_token = token_jsd(log_probs(student_logits, temperature), teacher_logps, beta)
    tokens = mask.sum()
    return (per_token * mask).sum() / mx.maximum(tokens, 1.0), per_token, tokens
