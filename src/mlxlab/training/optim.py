"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim


def warmup_cosine(
    learning_rate: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1
):
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate`."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0
    decay = optim.cosine_decay(learning_rate, total_steps - warmup_steps, learning_rate * min_lr_ratio)
    if warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    min_lr_ratio: float = 0.1,
    eps: float = 1e-8,
    bias_correction: bool = True,
) -> optim.Optimizer:
    """The optimizer with the LR schedule applied.

    Adam/AdamW correct the bias of their moment estimates by default, as PyTorch always does:
    mlx.optimizers defaults to bias_correction=False, whose first few hundred updates are
    several times the configured learning rate (v starts near zero). See CHANGELOG.md.
    """
    if schedule == "cosine":
        lr = warmup_cosine(learning_rate, total_steps, warmup_steps, min_lr_ratio)
    elif schedule == "constant":
        lr = learning_rate
    else:
        raise ValueError(f"unknown trainer.schedule {schedule!r}: use 'cosine' or 'constant'")
    name = name.lower()
    adam = {"betas": [float(b) for b in betas], "eps": float(eps),
            "bias_correction": bool(bias_correction)}
    if name == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=weight_decay, **adam)
    if name == "adam":
        return optim.Adam(learning_rate=lr, **adam)
    if name == "sgd":
        return optim.SGD(learning_rate=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown trainer.optimizer {name!r}: use adamw, adam or sgd")


def clip_by_global_norm(grads, max_norm: float):
    """optim.clip_grad_norm, skipped when max_norm <= 0 (the norm is still returned for logging)."""
    if max_norm and max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    from mlx.utils import tree_flatten

    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
    return grads, norm
