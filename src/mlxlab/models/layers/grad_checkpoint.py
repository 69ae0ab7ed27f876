"""Gradient checkpointing (trainer.grad_checkpoint): each decoder block (true), or each recurrent
sequence mixer (mixers), keeps only its input for the backward and recomputes its activations
there, trading one more forward of it for the memory of its activations (long rows). A hybrid's
gated-delta and Mamba mixers hold most of its activations (a gated-delta layer's projections are
4-8x the hidden width, each kept for the backward): recomputing them alone brings its step's
memory to the plain model's and leaves its attention layers and MLPs as they are; with cores,
all of them but their projections and rule (replay.py). mlx-lm's recipe (a checkpoint over the
block's call), applied to these instances only (blocks or mixers): each gets a subclass whose
call is checkpointed, so its parameter names, other models and other blocks of the same class
(a teacher's, an evaluation copy's) stay as they were.

`checkpoint` is mx.checkpoint with the recompute ordered after the part's cotangent arrives
rather than after its outputs, which mx.checkpoint keeps alive until the part's backward for that
(a chain of checkpointed parts then holds every part's output at its peak). `recomputed` is the
checkpoint every recomputing part uses (these blocks, CachedMNRL's mini-batches, FSDP's units):
the recompute draws the forward's dropout masks (a key drawn once per call, split in the same
order both times: kernels.same_draws), so the gradient is that of the loss the forward computed,
with dropout on as with it off."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlxlab import kernels
from mlxlab.errors import ConfigError
from mlxlab.models.base import Model
from mlxlab.models.layers import packed_rows, replay
from mlxlab.models.layers.blocks import Dropout

# (a block or mixer class, taped) -> its checkpointed subclass
_CHECKPOINTED: dict[tuple[type, bool], type] = {}


def checkpoint(fn: Callable) -> Callable:
    """mx.checkpoint(fn), its recompute ordered after the cotangents arrive rather than after the
    forward's outputs: MLX's keeps a part's outputs alive until the part's backward (a mixer's,
    a block's: the hidden width a token each), and so reached a hybrid's peak with them."""
    slot = object()

    def call(*args, **kwargs):
        arrays: list[mx.array] = []

        def take(leaf):
            if isinstance(leaf, mx.array):
                arrays.append(leaf)
                return slot
            return leaf

        template = tree_map(take, (list(args), kwargs))  # empty lists and dicts kept

        returned: list[type] = []  # what fn returned: an array, or a tuple or list of them
        rows = packed_rows.current()  # a packed pass's rows, for the recompute after it

        def flat_fn(*xs: mx.array) -> list[mx.array]:
            given = iter(xs)
            a, k = tree_map(lambda leaf: next(given) if leaf is slot else leaf, template)
            with packed_rows.rows(positions=rows):
                out = fn(*a, **k)
            returned.append(type(out))
            return [out] if isinstance(out, mx.array) else list(out)

        @mx.custom_function
        def forward(*xs: mx.array) -> list[mx.array]:
            return flat_fn(*xs)

        @forward.vjp
        def backward(primals, cotangents, _):
            # MLX passes a function of one input its primal alone, of one output its cotangent
            primals = list(primals) if isinstance(primals, tuple) else [primals]
            cotangents = list(cotangents) if isinstance(cotangents, (tuple, list)) else [
                cotangents]
            return mx.vjp(flat_fn, mx.depends(primals, cotangents), cotangents)[1]

        out = forward(*arrays)
        kind = returned[0]
        return out[0] if issubclass(kind, mx.array) else kind(out)

    return call


def recomputed(fn: Callable, module: nn.Module) -> Callable:
    """checkpoint(fn), `module` the part it runs: while a dropout of it is on, each call
    draws one key (from the global state, or the enclosing recompute's) and runs `fn` under it,
    in the forward and in the backward's recompute alike. MLX's own nn.Dropout layers of
    `module` become mlxlab's (the same masks, drawn through kernels.dropout)."""
    dropouts = []
    for _, layer in module.named_modules():
        if type(layer) is nn.Dropout:
            layer.__class__ = Dropout
        if isinstance(layer, nn.Dropout):
            dropouts.append(layer)

    def call(*args, **kwargs):
        if not any(d.training and d._p_1 < 1 for d in dropouts):
            return checkpoint(fn)(*args, **kwargs)
        key = kernels.next_key()

        def keyed(*args, **kwargs):
            with kernels.same_draws(key):
                return fn(*args, **kwargs)

        return checkpoint(keyed)(*args, **kwargs)

    return call


def _checkpointed(cls: type, taped: bool = False) -> type:
    """`cls` whose call is recomputed in the backward. `taped` (a recurrent mixer, cores): with a
    tape (replay.py), its forward keeps its projections' and rule's outputs and the recompute
    replays them; in eval mode (evaluation, generation: no backward) it runs as `cls`."""
    if cls in _CHECKPOINTED.values():
        return cls
    if (cls, taped) not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            if taped and not self.training:  # nothing to keep for a backward that never comes
                return cls.__call__(self, *args, **kwargs)
            tape = replay.Tape() if taped else None

            def inner(params, *args, **kwargs):
                self.update(params)
                if tape is None:
                    return cls.__call__(self, *args, **kwargs)
                tape.at = 0
                with replay.taping(tape):
                    out = cls.__call__(self, *args, **kwargs)
                if not tape.replaying:  # the forward; the next run is the recompute
                    tape.drop_output(out)
                    tape.replaying = True
                return out

            return recomputed(inner, self)(self.trainable_parameters(), *args, **kwargs)

        name = f"{'Replayed' if taped else 'Checkpointed'}{cls.__name__}"
        _CHECKPOINTED[cls, taped] = type(name, (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls, taped]


def checkpoint_blocks(model: Model) -> int:
    """Recompute each of the model's decoder blocks in the backward; returns how many. A model
    without blocks is one line: the setting would do nothing."""
    blocks: list[nn.Module] = model.blocks()
    if not blocks:
        raise ConfigError(f"trainer.grad_checkpoint=true: a {type(model).__name__} has no decoder "
                          "blocks to recompute; leave it false")
    for block in blocks:
        block.__class__ = _checkpointed(type(block))
    return len(blocks)


def _outermost_first(named: tuple[str, nn.Module]) -> tuple[bool, int]:
    return named[0] != "", named[0].count(".")


def recurrent_mixers(model: Model) -> list[nn.Module]:
    """The sequence mixers of the model's blocks that carry a recurrent state: gated delta nets
    (Qwen3.5/3-Next, Kimi-Linear, OLMo-Hybrid, Ling) and Mamba mixers (Nemotron-H, Falcon-H1,
    Granite-4.0-H, Mamba, Jamba), which all learn their state's decay as `A_log`."""
    found: list[nn.Module] = []
    for block in model.blocks():
        taken: list[str] = []  # a mixer's own submodules are not mixers again
        for name, module in sorted(block.named_modules(), key=_outermost_first):
            if "A_log" in module and not any(t == "" or name.startswith(f"{t}.") for t in taken):
                taken.append(name)
                found.append(module)
    return found


def checkpoint_mixers(model: Model, cores: bool = False) -> int:
    """Recompute each of the model's recurrent mixers (recurrent_mixers) in the backward: all
    of it, or with `cores` (grad_checkpoint=cores) all but its projections and rule, whose
    outputs the forward keeps (replay.py). Returns how many. A model without one is one line:
    the setting would do nothing."""
    setting = "cores" if cores else "mixers"
    mixers = recurrent_mixers(model)
    if not mixers:
        raise ConfigError(f"trainer.grad_checkpoint={setting}: a {type(model).__name__} has no "
                          "recurrent (gated delta or Mamba) mixers to recompute; use true to "
                          "recompute its blocks, or false")
    for mixer in mixers:
        if cores:
            replay.replay_projections(mixer)
        mixer.__class__ = _checkpointed(type(mixer), taped=cores)
    return len(mixers)
