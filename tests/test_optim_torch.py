"""mlxlab's optimizer and training step equal PyTorch's on shared weights and gradients.

mlx.optimizers.Adam/AdamW default to bias_correction=False, whose early updates are several times
the configured learning rate; PyTorch always corrects. mlxlab trained 0.95 nats worse than a plain
PyTorch script for that reason. These tests pin mlxlab's optimizer, schedule and the
trainer's compiled step to PyTorch (torch==2.13.0 CPU, in the dev extra) so a silent default like
that cannot come back.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from conftest import REPO
from mlxlab.config import config_dir, instantiate
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.objectives.losses import task_loss
from mlxlab.training.optim import LRSchedule, build_optimizer
from mlxlab.training.settings import TrainerSettings
from mlxlab.training.step import make_step

sys.path.insert(0, str(REPO))
from benchmarks.speed.bench_torch import torch_models, torch_warmup_cosine  # noqa: E402  (PyTorch twins of mlxlab's decoder and schedule)

LR, WD, WARMUP, TOTAL, MIN_RATIO = 1e-3, 0.01, 3, 10, 0.1


def torch_schedule(optimizer: torch.optim.Optimizer):
    """Linear warmup from lr/WARMUP, then cosine to MIN_RATIO * lr: PyTorch's own schedulers."""
    return torch_warmup_cosine(optimizer, TOTAL, WARMUP, MIN_RATIO)


SCHEDULE = LRSchedule("cosine", WARMUP, MIN_RATIO)


def optimizer_factory(name: str = "adamw", **overrides):
    """The shipped conf/optimizer/<name>.yaml node (its defaults, bias correction included), at
    LR and WD, instantiated as train.py does: a partial awaiting the schedule."""
    node = OmegaConf.load(f"{config_dir()}/optimizer/{name}.yaml")
    decay = {"weight_decay": WD} if "weight_decay" in node else {}
    return instantiate(OmegaConf.merge(node, {"learning_rate": LR, **decay, **overrides}))


def mlx_optimizer(name: str = "adamw", schedule: LRSchedule = SCHEDULE, **overrides):
    return build_optimizer(optimizer_factory(name, **overrides), schedule, TOTAL)


def test_schedule_matches_pytorch():
    opt = mlx_optimizer()
    opt.init({"w": mx.zeros((1,))})
    ref_param = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.AdamW([ref_param], lr=LR)
    sched = torch_schedule(ref)
    for step in range(TOTAL):  # (past TOTAL, CosineAnnealingLR climbs again; mlx holds the floor)
        torch_lr = ref.param_groups[0]["lr"]  # the rate PyTorch's next step uses
        opt.update({"w": mx.zeros((1,))}, {"w": mx.zeros((1,))})
        mx.eval(opt.state)
        # mlx evaluates the schedule inside update(): the state holds the rate that update used
        assert opt.learning_rate.item() == pytest.approx(torch_lr, rel=1e-5), step
        ref.step()
        sched.step()


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_steps_match_pytorch(name):
    """Ten updates with fresh gradients each: weights equal after every one (bias correction,
    eps, betas and weight decay included: AdamW's decoupled, Adam's L2 in the gradient as
    torch.optim.Adam's; the schedule too)."""
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    betas, eps = (0.85, 0.99), 1e-6
    opt = mlx_optimizer(name, betas=betas, eps=eps)
    params = {k: mx.array(v) for k, v in weights.items()}
    opt.init(params)
    ref_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()}
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref = kind(ref_params.values(), lr=LR, betas=betas, eps=eps, weight_decay=WD)
    sched = torch_schedule(ref)
    for step in range(TOTAL):
        grads = {k: rng.normal(scale=1e-2 * (step + 1), size=v.shape).astype(np.float32) for k, v in weights.items()}
        params = opt.apply_gradients({k: mx.array(g) for k, g in grads.items()}, params)
        mx.eval(params, opt.state)
        for k, g in grads.items():
            ref_params[k].grad = torch.tensor(g)
        ref.step()
        sched.step()
        for k in weights:
            np.testing.assert_allclose(np.array(params[k]), ref_params[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_uncorrected_adam_differs_from_pytorch():
    """The knob works, and the test above would catch the old default: without bias correction
    the first update is far from PyTorch's (m / sqrt(v) is (1 - b1) / sqrt(1 - b2) ~ 3x larger)."""
    w = np.ones(4, np.float32)
    g = np.full(4, 0.5, np.float32)
    out = {}
    for corrected in (True, False):
        opt = mlx_optimizer("adamw", LRSchedule("constant"), weight_decay=0.0,
                            bias_correction=corrected)
        params = {"w": mx.array(w)}
        opt.init(params)
        out[corrected] = np.array(opt.apply_gradients({"w": mx.array(g)}, params)["w"])
    np.testing.assert_allclose(w - out[True], LR, rtol=1e-4)  # Adam's first step is lr * sign(g)
    assert (w - out[False]).min() > 3 * LR


def shared_decoder():
    """mlxlab's decoder and its PyTorch twin holding the same (mlxlab-initialized) weights."""
    mx.random.seed(0)
    cfg = {"dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
    model = Transformer(vocab_size=50, max_seq_len=16, **cfg)
    twin = torch_models()[0](50, **cfg)
    weights = {k: torch.tensor(np.array(v)) for k, v in tree_flatten(model.parameters())}
    missing = set(twin.state_dict()) ^ set(weights)
    assert not missing, f"parameter names differ: {missing}"
    twin.load_state_dict(weights)
    return model, twin


def torch_lm_loss(twin, batch):
    logits = twin(batch["input_ids"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    return (ce * mask).sum() / mask.sum()


def test_training_steps_match_pytorch():
    """make_step (the compiled step fit runs) against loss.backward, clip_grad_norm_ and
    AdamW.step with PyTorch's warmup-cosine schedule: loss, gradients, norm and weights agree."""
    model, twin = shared_decoder()
    clip = 0.5  # below the gradient norm of this model, so every step clips
    settings = TrainerSettings(schedule=SCHEDULE, max_steps=TOTAL, grad_clip=clip)
    loss_fn = task_loss("lm")
    optimizer = build_optimizer(optimizer_factory("adamw"), settings.schedule, TOTAL)
    optimizer.init(model.trainable_parameters())
    step = make_step(model, optimizer, loss_fn, settings)
    ref = torch.optim.AdamW(twin.parameters(), lr=LR, weight_decay=WD)
    sched = torch_schedule(ref)
    rng = np.random.default_rng(1)
    for k in range(6):
        tokens = rng.integers(0, 50, size=(3, 17))
        mask = np.ones((3, 16), np.float32)
        mask[0, 10:] = 0.0  # a padded tail: masked tokens count in neither loss
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}
        tb = {k: torch.tensor(v) for k, v in batch.items()}

        if k == 0:  # gradients before clipping, same loss function the step differentiates
            (_, _), grads = nn.value_and_grad(model, loss_fn)(model, {k: mx.array(v) for k, v in batch.items()})
        loss, norm, _ = step([{k: mx.array(v) for k, v in batch.items()}])

        ref.zero_grad()
        ref_loss = torch_lm_loss(twin, tb)
        ref_loss.backward()
        if k == 0:
            ref_grads = {n: p.grad.numpy() for n, p in twin.named_parameters()}
            for name, g in tree_flatten(grads):
                np.testing.assert_allclose(np.array(g), ref_grads[name], rtol=1e-3, atol=1e-6, err_msg=name)
        ref_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
        ref.step()
        sched.step()

        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), k
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-4), k
        assert norm.item() > clip  # the clip was active
        ours = dict(tree_flatten(model.parameters()))
        for name, p in twin.named_parameters():
            np.testing.assert_allclose(np.array(ours[name]), p.detach().numpy(), rtol=1e-4, atol=2e-6,
                                       err_msg=f"step {k + 1}: {name}")


def test_constant_schedule_warms_up_as_pytorch_then_holds_the_peak():
    """trainer.schedule.name=constant with warmup_steps: PyTorch's LinearLR warmup (from
    lr / warmup) then the peak held, step for step; with 0 warmup steps, the peak throughout."""
    from mlxlab.training.optim import LRSchedule

    warmup = 4
    schedule = LRSchedule("constant", warmup_steps=warmup)(LR, TOTAL)
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = torch.optim.lr_scheduler.LinearLR(ref, start_factor=1 / warmup, total_iters=warmup)
    for step in range(TOTAL):
        assert float(schedule(mx.array(step))) == pytest.approx(ref.param_groups[0]["lr"],
                                                                rel=1e-6), step
        ref.step()
        sched.step()
    assert LRSchedule("constant")(LR, TOTAL) == LR
