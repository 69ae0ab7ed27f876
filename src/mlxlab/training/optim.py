"""Learning-rate schedules, and the optimizer built from a config partial under one.

The optimizer itself is a Hydra node (`conf/optimizer/*.yaml`: `_target_: mlx.optimizers.X`,
`_partial_: true`): train.py instantiates it to a partial whose `learning_rate` is the peak rate,
and the trainer calls it with `learning_rate=<schedule>` once it knows the run's length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim

from mlxlab import kernels
from mlxlab.config import check_choice, check_number
from mlxlab.errors import ConfigError

OptimizerFactory = Callable[..., optim.Optimizer]

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """`trainer.schedule`: linear warmup then cosine decay to min_lr_ratio x the peak, or
    linear warmup then constant (no warmup with warmup_steps 0)."""

    name: str = "cosine"      # cosine | constant
    warmup_steps: int = 0     # linear warmup from peak / warmup_steps to the peak
    min_lr_ratio: float = 0.1  # cosine ends at this fraction of the peak

    def __post_init__(self) -> None:
        check_choice("trainer.schedule.name", self.name, SCHEDULES)
        check_number("trainer.schedule.warmup_steps", self.warmup_steps, int, 0)
        check_number("trainer.schedule.min_lr_ratio", self.min_lr_ratio, float, 0.0)

    def __call__(self, learning_rate: float, total_steps: int):
        if self.name == "constant":
            warmup = min(int(self.warmup_steps), max(int(total_steps), 1) - 1)
            if warmup <= 0:
                return learning_rate
            return optim.join_schedules(
                [optim.linear_schedule(learning_rate / warmup, learning_rate, warmup),
                 lambda _: mx.array(learning_rate)], [warmup])
        return warmup_cosine(learning_rate, total_steps, self.warmup_steps, self.min_lr_ratio)


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


class Adam(optim.Adam):
    """mlx's Adam with PyTorch's `weight_decay` (torch.optim.Adam's: `weight_decay * parameter`
    added to the gradient before the moments, an L2 penalty; AdamW decouples it instead), so
    `optimizer=adam` takes every key an experiment sets. 0 is mlx's Adam exactly."""

    def __init__(self, learning_rate: float | Callable, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, bias_correction: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(learning_rate, list(betas), eps, bias_correction)
        self.weight_decay = weight_decay

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if self.weight_decay:
            gradient = gradient + self.weight_decay * parameter
        return super().apply_single(gradient, parameter, state)


def default_optimizer() -> OptimizerFactory:
    """What `optimizer=adamw` composes to, for a Trainer built in code without one.

    Adam/AdamW correct the bias of their moment estimates, as PyTorch always does:
    mlx.optimizers defaults to bias_correction=False, whose first few hundred updates are
    several times the configured learning rate (v starts near zero). See CHANGELOG.md.
    """
    return partial(optim.AdamW, learning_rate=1e-3, weight_decay=0.01, betas=[0.9, 0.999],
                   eps=1e-8, bias_correction=True)


def peak_learning_rate(factory: OptimizerFactory) -> float:
    keywords = getattr(factory, "keywords", {}) or {}
    if "learning_rate" not in keywords:
        raise ConfigError("the optimizer config needs a learning_rate: add +optimizer.learning_rate=3e-4")
    return float(keywords["learning_rate"])


def build_optimizer(
    factory: OptimizerFactory, schedule: LRSchedule, total_steps: int
) -> optim.Optimizer:
    """The configured optimizer with `learning_rate` replaced by the schedule over total_steps.
    mlx.optimizers.AdamW becomes mlxlab.kernels.AdamW: the same update and state, one fused
    CPU kernel per parameter when trainer.fused_kernels lets the kernels run."""
    if isinstance(factory, partial) and factory.func is optim.AdamW:
        factory = partial(kernels.AdamW, *factory.args, **factory.keywords)
    return factory(learning_rate=schedule(peak_learning_rate(factory), total_steps))

