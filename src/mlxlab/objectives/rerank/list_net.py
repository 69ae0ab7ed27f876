"""sentence-transformers' ListNetLoss (Cao et al. 2007): the cross-entropy between the softmax of
a query's labels over its passages and the softmax of the model's logits, mean over queries; a
shorter list's padding takes no part (its logits are -1e16 and its labels -inf, as there). Its
activation_fn default, Identity, is the only one."""

from __future__ import annotations

import mlx.core as mx

PAD_LOGIT = -1e16  # sentence-transformers' fill for a padded passage's logit


def list_net(logits: mx.array, labels: mx.array, doc_mask: mx.array) -> mx.array:
    """Per-list ListNet loss (no reduction) of (B, K) logits and labels; doc_mask 0 = padding."""
    valid = doc_mask > 0
    logits = mx.where(valid, logits.astype(mx.float32), PAD_LOGIT)
    target = mx.softmax(mx.where(valid, labels.astype(mx.float32), -mx.inf), axis=-1)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(target * log_probs).sum(axis=-1)
