"""Scheduled model operations: grow layers, widen the MLP, change dropout, unfreeze LoRA bases.

`trainer.model_schedule` lists operations, each run once when the loop reaches its `at_step`
(after that many optimizer updates, before the next one):

    trainer.model_schedule:
      - {at_step: 1000, op: grow_layers, num_layers: 4, init: identity}   # identity | copy
      - {at_step: 500, op: set_dropout, p: 0.0}
      - {at_step: 2000, op: widen_mlp, mlp_dim: 1024}
      - {at_step: 3000, op: unfreeze_lora_base}

grow_layers with `init: identity` appends copies of the top layer whose residual projections
(attention.out, mlp.down) are zero, so each new block adds nothing and the model computes the
same function; `copy` appends copies of the top layers as they are (a stack). widen_mlp gives the
new hidden units small random input weights and zero output weights (function kept too).

The optimizer state moves by name and shape, as when resuming (checkpoint.restore_optimizer):
unchanged parameters keep their moments, new or reshaped ones start fresh, the step count (and
so the learning-rate schedule) goes on. The indices of the operations done land in every
checkpoint; a resume applies them to the freshly built model before its weights are loaded, and
`runs.load_run_model` does the same, so a grown run's checkpoints load anywhere.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.checkpoint.state import CheckpointState
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model

log = logging.getLogger("mlxlab.training")

RESIDUAL_OUTPUTS = ("attention.out", "mlp.down")  # the projections that write into the residual
OPS = {
    "grow_layers": {"num_layers", "init"},
    "widen_mlp": {"mlp_dim", "init_std"},
    "set_dropout": {"p"},
    "unfreeze_lora_base": set(),
}
STRUCTURAL = {"grow_layers", "widen_mlp"}  # change which weights exist: a new best/ after them


def _layers(model: nn.Module) -> list:
    """The model's list of blocks (`layers` on the model or a submodule, e.g. encoder.layers)."""
    for _, module in model.named_modules():
        if isinstance(module.get("layers"), list) and module["layers"]:
            return module["layers"]
    raise ValueError(f"{type(model).__name__} has no `layers` list: grow_layers cannot apply")


def _zero_residual_outputs(block: nn.Module) -> None:
    for name, module in block.named_modules():
        if name.endswith(RESIDUAL_OUTPUTS) and isinstance(module, nn.Module):
            params = {k: mx.zeros_like(v) for k, v in tree_flatten(module.parameters())
                      if not k.endswith("lora_a")}  # lora_b = 0 already silences the adapter
            module.update(tree_unflatten(list(params.items())))


def grow_layers(model: Model, num_layers: int, init: str = "identity") -> None:
    layers = _layers(model)
    old = len(layers)
    if num_layers <= old:
        raise ValueError(f"grow_layers: num_layers={num_layers} must exceed the current {old}")
    if init not in ("identity", "copy"):
        raise ValueError(f"grow_layers: init={init!r}; use identity or copy")
    extra = num_layers - old
    for k in range(extra):
        # copy: a stack of the top `extra` layers (cycling when growing by more than double)
        block = copy.deepcopy(layers[-1] if init == "identity" else layers[(old - extra + k) % old])
        if init == "identity":
            _zero_residual_outputs(block)
        layers.append(block)
    model.update_architecture(num_layers=num_layers)  # what export describes


def widen_mlp(model: Model, mlp_dim: int, init_std: float = 0.02, seed: int = 0) -> None:
    """Every MLP's hidden width -> mlp_dim; the new units' output weights are zero."""
    key = mx.random.key(seed)  # its own key: the run's RNG stream is not consumed
    found = False
    for _, module in model.named_modules():
        if not (isinstance(module.get("up"), nn.Linear) and isinstance(module.get("down"), nn.Linear)):
            continue
        found = True
        old = module["up"].weight.shape[0]
        if mlp_dim <= old:
            raise ValueError(f"widen_mlp: mlp_dim={mlp_dim} must exceed the current {old}")
        extra = mlp_dim - old
        for name in ("gate", "up"):
            if name in module:
                key, sub = mx.random.split(key)
                lin = module[name]
                new = init_std * mx.random.normal((extra, lin.weight.shape[1]), key=sub)
                lin.weight = mx.concatenate([lin.weight, new.astype(lin.weight.dtype)])
                if "bias" in lin:
                    lin.bias = mx.concatenate([lin.bias, mx.zeros((extra,), lin.bias.dtype)])
        down = module["down"]
        down.weight = mx.concatenate(
            [down.weight, mx.zeros((down.weight.shape[0], extra), down.weight.dtype)], axis=1)
    if not found:
        raise ValueError(f"{type(model).__name__} has no up/down MLP: widen_mlp cannot apply")
    model.update_architecture(mlp_dim=mlp_dim)


def set_dropout(model: nn.Module, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"set_dropout: p={p} must be in [0, 1)")
    for _, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module._p_1 = 1.0 - p  # what nn.Dropout keeps; the compiled step is rebuilt after


def unfreeze_lora_base(model: nn.Module) -> None:
    from mlxlab.models.adapters.lora import AdapterLayer

    wrapped = [m for _, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if not wrapped:
        raise ValueError("unfreeze_lora_base: the model has no LoRA layers (model.lora.rank=0)")
    for m in wrapped:
        m.linear.unfreeze()


def apply_op(model: nn.Module, spec: Mapping) -> None:
    args = {k: v for k, v in spec.items() if k not in ("op", "at_step")}
    op = spec["op"]
    if op == "grow_layers":
        grow_layers(model, int(args["num_layers"]), str(args.get("init", "identity")))
    elif op == "widen_mlp":
        widen_mlp(model, int(args["mlp_dim"]), float(args.get("init_std", 0.02)),
                  seed=int(spec["at_step"]))
    elif op == "set_dropout":
        set_dropout(model, float(args["p"]))
    else:
        unfreeze_lora_base(model)


def check_schedule(schedule: Sequence[Mapping] | None) -> list[dict]:
    """The schedule as plain dicts, sorted by step; ConfigError (a ValueError) naming a bad entry and the fix."""
    out = []
    for i, entry in enumerate(schedule or []):
        entry = dict(entry)
        op, step = entry.get("op"), entry.get("at_step")
        where = f"trainer.model_schedule[{i}]"
        if op not in OPS:
            raise ConfigError(f"{where}: op={op!r} is unknown; use one of {sorted(OPS)}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"{where}: needs at_step=<int >= 0> (the optimizer step), got {step!r}")
        extra = set(entry) - OPS[op] - {"op", "at_step"}
        if extra:
            raise ConfigError(f"{where}: {op} takes {sorted(OPS[op]) or 'no arguments'}, "
                             f"not {sorted(extra)}")
        needed = {"grow_layers": "num_layers", "widen_mlp": "mlp_dim", "set_dropout": "p"}.get(op)
        if needed and needed not in entry:
            raise ConfigError(f"{where}: {op} needs {needed}=...")
        out.append(entry)
    return sorted(out, key=lambda e: e["at_step"])  # stable: same-step ops keep their order


def apply_done(model: nn.Module, state: CheckpointState | None) -> None:
    """Rebuild the structure a checkpoint's model had: the operations its state says were done."""
    saved = (state.model_ops if state else None) or {}
    for spec in saved.get("applied", []):
        apply_op(model, spec)


class ModelSchedule:
    """The operations still to do and those done (their specs go into the checkpoint)."""

    def __init__(self, schedule: Sequence[Mapping] | None = None) -> None:
        self.ops = check_schedule(schedule)
        self.done: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    def due(self, step: int) -> list[int]:
        return [i for i, op in enumerate(self.ops) if i not in self.done and op["at_step"] <= step]

    def apply(self, model: nn.Module, index: int) -> dict:
        spec = self.ops[index]
        apply_op(model, spec)
        self.done.append(index)
        return spec

    def reshaped(self) -> bool:
        """An operation that changes which weights exist (STRUCTURAL) has been done: the frozen
        weights are no longer all the pretrained base's."""
        return any(self.ops[i]["op"] in STRUCTURAL for i in self.done)

    def state_dict(self) -> dict:
        return {"done": list(self.done), "applied": [self.ops[i] for i in self.done]}

    def run_due(self, step: int, model: nn.Module, optimizer, tracker) -> bool:
        """Apply the operations due at `step`, move the optimizer state, log each; True when one
        changed which weights exist (the caller then rebuilds its compiled step either way)."""
        before = {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
        structural = False
        for index in self.due(step):
            spec = self.apply(model, index)
            structural = structural or spec["op"] in STRUCTURAL
            args = " ".join(f"{k}={v}" for k, v in spec.items() if k not in ("op", "at_step"))
            log.info("model operation at step %d: %s %s", step, spec["op"], args)
            tracker.set_tags({f"mlxlab.model_op.{index}": f"step {step}: {spec['op']} {args}"})
        transfer_optimizer_state(optimizer, model, before)
        count = sum(v.size for _, v in tree_flatten(model.parameters()))
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        # Logged at the first step they affect: a resume rewinds the store to its checkpoint's
        # step, and the operation is redone after that step, so nothing is logged twice.
        tracker.log_metrics({"model/num_parameters": float(count),
                             "model/trainable_parameters": float(trainable),
                             "model/ops_done": float(len(self.done))}, step + 1)
        return structural

    def restore_structure(self, model: nn.Module, state: CheckpointState | None) -> None:
        """Before a checkpoint's weights load: redo the operations it had done, mark them done."""
        saved = (state.model_ops if state else None) or {}
        for index, spec in zip(saved.get("done", []), saved.get("applied", [])):
            if index >= len(self.ops) or self.ops[index] != spec:
                raise ValueError(
                    f"resume: the checkpoint applied model operation {spec} as entry {index} of "
                    "trainer.model_schedule, which now differs: keep the entries already done "
                    "(add new ones after them) or start a new run")
            apply_op(model, spec)
            self.done.append(index)


def newest_state(candidates: Sequence) -> CheckpointState | None:
    """The state of the checkpoint a resume will load (the first committed candidate); one of
    an older version is refused (CheckpointState.check_resumable)."""
    from mlxlab.checkpoint import CheckpointError, check_committed

    for path in candidates:
        if check_committed(path, full=False) is None:
            try:
                state = CheckpointState.read(path)
            except (OSError, CheckpointError):
                return None  # the loader reports it and falls back
            state.check_resumable()
            return state
    return None


def transfer_optimizer_state(optimizer, model: nn.Module, before: dict[str, tuple]) -> None:
    """After an operation: keep the moments of parameters whose name and shape did not change,
    fresh ones for the rest; the step count (learning-rate schedule) goes on."""
    from mlxlab.checkpoint import LoadReport
    from mlxlab.checkpoint.atomic import flat_arrays
    from mlxlab.checkpoint.restore import restore_optimizer

    saved = flat_arrays(optimizer.state)
    now = {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    kept = {k: k for k, shape in now.items() if before.get(k) == shape}
    report = LoadReport(path=None)
    restore_optimizer(optimizer, model, saved, kept, report)
    mx.eval(optimizer.state)
    log.info("model operation: optimizer state of %d parameters kept, %d fresh",
             len(report.optimizer_by_name), len(report.optimizer_fresh))
