"""The training step: one compiled optimizer update, and the precision it computes in.

mlx-examples style: `nn.value_and_grad` over a pure loss, one `mx.compile`d function over
`[model.state, optimizer.state, mx.random.state]` (built after any checkpoint is restored, so it
never writes to stale state), and one `mx.eval` per optimizer step. Gradient accumulation is a
compiled variant of the same step, not a second loop. The fused kernels' mode
(`trainer.fused_kernels`) is process-wide: the loop sets it once, before it builds a step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxlab import kernels
from mlxlab.models.layers.bf16_linear import bf16_products
from mlxlab.objectives import losses
from mlxlab.runtime.cluster import distributed
from mlxlab.runtime.compute import bf16, device, jit_header
from mlxlab.training.parallel.gradients import DataParallel
from mlxlab.training.settings import TrainerSettings

log = logging.getLogger(__name__)

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}  # settings.PRECISIONS


def make_step(model: nn.Module, optimizer, loss_fn: losses.LossFn, settings: TrainerSettings,
              world: distributed.World | None = None, gradients: DataParallel | None = None,
              grad_accum: int | None = None):
    """Returns step(batches) -> (loss, grad_norm, aux); one optimizer update per call.

    With grad_accum > 1 (default: the settings') the gradients of the micro-batches are summed,
    weighted by their token counts, so N micro-batches of size B give the update of one batch of
    N*B. `world` is the run's and `gradients` how its mode reduces them over ranks
    (training/parallel/gradients.py); default: one process, data parallel. `settings` gives
    grad_clip and compile.
    """
    world = world or distributed.World()
    gradients = gradients or DataParallel(world)
    grad_accum = grad_accum or settings.grad_accum
    if settings.compile:
        jit_header.ready()  # the first step's new CPU kernels read the precompiled header
    loss_and_grad = nn.value_and_grad(model, weighted(loss_fn) if gradients.weighted_in_loss
                                      else loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    compile_ = (partial(mx.compile, inputs=state, outputs=state) if settings.compile
                else (lambda f: f))
    update = partial(optimizer.update, model)
    compiled: list[bool] = []  # one entry per step taken: the first one compiles
    guarded = watchdog(world, gradients, grad_accum, compiled)
    # Data parallel runs take the accumulation path below even for one micro-batch: its
    # apply_step sums value x count over ranks, so the update is the global batch's. (With
    # MLX 0.32 on CPU, an all_sum compiled into the same graph as the backward pass hung on
    # the ring backend; in its own compiled function it does not.)
    if grad_accum == 1 and not gradients.collective:
        fused_step = compile_(one_update(model, loss_and_grad, gradients, settings.grad_clip,
                                         update))
        return single(fused_step, guarded, state, compiled)
    grad_step = compile_(weighted_gradients(model, loss_and_grad, gradients))
    apply_step = compile_(update_over_ranks(gradients, settings.grad_clip, update))
    return accumulating(grad_step, apply_step, guarded, world, state, compiled)


def watchdog(world: distributed.World, gradients: DataParallel, grad_accum: int,
             compiled: list[bool]) -> Callable[[str], AbstractContextManager]:
    """guarded(what): a context a step's work runs in. A sharded model's forward and backward
    are collectives themselves: a dead peer would block them forever, so the whole step is
    under the world's watchdog (the first, compiling, ten times as long); otherwise nothing."""

    def guarded(what: str) -> AbstractContextManager:
        scale = (1.0 if compiled else 10.0) * (grad_accum + 1 if gradients.in_model else 1)
        return world.guard(what, scale) if gradients.in_model else nullcontext()

    return guarded


def one_update(model: nn.Module, loss_and_grad, gradients: DataParallel, clip: float,
               update: Callable) -> Callable:
    """fused_step(batch) -> (loss, norm, aux): one micro-batch's gradients, clipped, applied."""

    def fused_step(batch):
        (loss, aux), grads = loss_and_grad(model, batch)
        grads, norm = gradients.clip(grads, clip)
        update(grads)
        return loss, norm, aux

    return fused_step


def single(fused_step: Callable, guarded: Callable, state: list, compiled: list[bool]):
    """step(batches) of one micro-batch: fused_step, evaluated once."""

    def step(batches):
        with guarded("a training step"):
            loss, norm, aux = fused_step(batches[0])
            mx.eval(loss, norm, aux, state)
        compiled.append(True)
        return loss, norm, aux

    return step


def weighted_gradients(model: nn.Module, loss_and_grad, gradients: DataParallel) -> Callable:
    """grad_step(batch) -> (loss x n, n, aux sums, gradients x n, per-row outputs): one
    micro-batch's share of an accumulated update, weighted by its token count n."""

    def grad_step(batch):
        (loss, aux), grads = loss_and_grad(model, batch)
        examples = losses.pop_example_outputs(aux)  # per row: concatenated, not averaged
        n = aux["ntokens"]
        sums = {k: v * n for k, v in aux.items() if k != "ntokens"}
        if gradients.weighted_in_loss:  # the loss was n x the mean: so are its gradients
            return loss, n, sums, grads, examples
        return loss * n, n, sums, tree_map(lambda g: g * n, grads), examples

    return grad_step


def update_over_ranks(gradients: DataParallel, clip: float, update: Callable
                      ) -> Callable:
    """apply_step(grads, ntokens, loss_sum, aux_sum) -> (norm, loss, aux): the summed
    gradients over every rank's tokens, clipped and applied; loss and aux as means."""

    def apply_step(grads, ntokens, loss_sum, aux_sum):
        grads, summed = gradients.sum_over_ranks(grads, {"n": ntokens, "l": loss_sum,
                                                         "a": aux_sum})
        grads, ntokens = tree_map(lambda g: g / summed["n"], grads), summed["n"]
        grads, norm = gradients.clip(grads, clip)
        update(grads)
        aux = {k: v / ntokens for k, v in summed["a"].items()} | {"ntokens": ntokens}
        return norm, summed["l"] / ntokens, aux

    return apply_step


def accumulating(grad_step, apply_step, guarded, world: distributed.World, state: list,
                 compiled: list[bool]):
    """step(batches): each micro-batch's weighted gradients summed (one micro-batch of
    activations alive at a time), then one update over the ranks (make_step's compiled parts)."""

    def step(batches):
        total_loss, total_n, total_aux, acc, examples = 0.0, 0.0, None, None, []
        with guarded("a training step's forward and backward"):
            for batch in batches:
                loss_sum, n, aux_sum, grads, per_row = grad_step(batch)
                examples.append(per_row)
                if acc is None:
                    acc, total_aux = grads, aux_sum
                else:
                    acc = tree_map(mx.add, acc, grads)
                    total_aux = tree_map(mx.add, total_aux, aux_sum)
                total_loss, total_n = total_loss + loss_sum, total_n + n
                mx.eval(acc, total_aux, total_loss, total_n)  # one micro-batch's activations
        # The first update also compiles (and a rank may still be compiling its grad step).
        with world.guard("a training step", 1.0 if compiled else 10.0):
            norm, loss, aux = apply_step(acc, total_n, total_loss, total_aux)
            for key in examples[0]:  # evaluated here: callbacks may read them on a thread
                aux[key] = mx.concatenate([e[key] for e in examples])  # with no MLX stream
            mx.eval(loss, norm, aux, state)
        compiled.append(True)
        return loss, norm, aux

    return step


def weighted(loss_fn: losses.LossFn) -> losses.LossFn:
    """`loss_fn` times its token count: under fsdp the backward sums gradients over ranks, so
    each rank's share must already carry its weight in the global batch."""

    def loss_times_count(model: nn.Module, batch):
        loss, aux = loss_fn(model, batch)
        return loss * aux["ntokens"], aux

    return loss_times_count


def compute_dtype(precision: str) -> mx.Dtype:
    """trainer.precision as a dtype: auto = what the device computes fastest (fp32 on the CPU)."""
    return device.default_compute_dtype() if precision == "auto" else DTYPES[precision]


def with_precision(loss_fn: losses.LossFn, precision: str) -> losses.LossFn:
    """`loss_fn` computing in trainer.precision (itself when that is fp32); bf16 on the CPU is
    cpu_bf16's."""
    dtype = compute_dtype(precision)
    if dtype == mx.float32:
        return loss_fn
    if dtype == mx.bfloat16 and device.backend() == "cpu":
        return cpu_bf16(loss_fn)
    return mixed_precision(loss_fn, dtype)


def cpu_bf16(loss_fn: losses.LossFn) -> losses.LossFn:
    """trainer.precision=bf16 on the CPU: where it has bf16 units and MKL (runtime/compute/bf16.py)
    and the fused kernels run, float32 weights and activations with the Linear layers' products
    in bf16 (models/layers/bf16_linear.py); elsewhere, said in one line, MLX's own bf16 compute
    (mixed_precision), whose products are slower than fp32's."""
    gemm, why = bf16.gemm_bf16()
    fused = kernels.status() if gemm is not None else "fused"
    if gemm is None or fused != "fused":
        why = why if gemm is None else f"the fused CPU kernels are {fused}"
        _say_once(logging.WARNING, f"trainer.precision=bf16 on the CPU: MLX's own bf16 products, "
                  f"slower than fp32 ({why}); trainer.precision=auto trains in fp32")
        return mixed_precision(loss_fn, mx.bfloat16)
    _say_once(logging.INFO, f"trainer.precision=bf16 on the CPU: {why}, float32 weights and "
              "activations")

    def with_bf16_products(model: nn.Module, batch):
        with bf16_products(model):
            return loss_fn(model, batch)

    return with_bf16_products


_said: set[str] = set()  # cpu_bf16's lines: once a process (the loss and the probe both ask)


def _say_once(level: int, line: str) -> None:
    if line not in _said:
        _said.add(line)
        log.log(level, line)


def mixed_precision(loss_fn: losses.LossFn, dtype: mx.Dtype) -> losses.LossFn:
    """Compute in `dtype` while gradients flow back to the fp32 master weights."""

    def wrapped(model: nn.Module, batch):
        master = model.trainable_parameters()
        model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                              master))
        loss, aux = loss_fn(model, batch)
        model.update(master)
        return loss.astype(mx.float32), aux

    return wrapped
