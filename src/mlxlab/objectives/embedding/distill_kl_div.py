"""DistillKLDivLoss (`objective=distill_kl_div`), sentence-transformers' definition: the student's
softmax over dot(query, candidate) / student_temperature matched to the teacher's softmax over
its scores / teacher_temperature by KL divergence (mean over rows), times student_temperature².
Rows: query, two or more candidates (positive, negatives) and `label`: the teacher's score of
each candidate, carried in the row.
"""

from __future__ import annotations

import mlx.core as mx

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError
from mlxlab.objectives.embedding.embedding import EmbeddingObjective, pairwise_dot


def _temperature(key: str, value: float | None, default: float) -> float:
    value = default if value is None else value
    check_number(f"objective.{key}", value, float, 0.0)
    if not 0 < value < float("inf"):
        raise ConfigError(f"objective.{key}={value} must be a positive finite number")
    return float(value)


class DistillKLDivLoss(EmbeddingObjective):
    """The teacher's distribution over candidates, distilled (see the module)."""

    least_columns = 3
    needs_labels = True

    def __init__(self, temperature: float = 1.0, student_temperature: float | None = None,
                 teacher_temperature: float | None = None) -> None:
        self.temperature = _temperature("temperature", temperature, 1.0)
        self.student_temperature = _temperature("student_temperature", student_temperature,
                                                self.temperature)
        self.teacher_temperature = _temperature("teacher_temperature", teacher_temperature,
                                                self.temperature)

    def from_embeddings(self, embeddings: list[mx.array], labels: mx.array | None) -> mx.array:
        query = embeddings[0]
        student = mx.stack([pairwise_dot(query, c) for c in embeddings[1:]], axis=1)
        log_q = student / self.student_temperature
        log_q = log_q - mx.logsumexp(log_q, axis=1, keepdims=True)
        teacher = mx.stop_gradient(labels).reshape(query.shape[0], -1) / self.teacher_temperature
        p = mx.softmax(teacher, axis=1)
        # torch's kl_div: p * (log p - log q), 0 where p is 0; "batchmean": over the rows
        kl = mx.where(p > 0, p * (mx.log(mx.maximum(p, 1e-30)) - log_q), 0.0)
        return kl.sum() / query.shape[0] * self.student_temperature ** 2
