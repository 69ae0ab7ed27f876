"""LoRA / DoRA: low-rank adapters on frozen nn.Linear or quantized nn.QuantizedLinear layers
(Hu et al. 2021; QLoRA when the base is quantized), and on a MoE layer's stacked routed experts
(lora_experts.py: one adapter per expert); mlx-lm's layers, names and math.

Naming: wrapping `layers.0.attention.query` moves its base weight to
`layers.0.attention.query.linear.weight` and adds `...query.lora_a` / `...query.lora_b`.
`lora_base_name_map` / `load_base_weights` load a plain checkpoint into a wrapped model;
`fuse_lora` goes the other way for export. `adapters_off` runs the base model without copying
it: preference tuning's reference model (training/preference.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.adapters.adapter_layer import AdapterLayer
from mlxlab.models.adapters.lora_linear import LoRALinear, input_dims
from mlxlab.models.adapters.lora_qat import QATLoRALinear
from mlxlab.models.adapters.routed_experts import adapts_experts, is_experts, names_experts
from mlxlab.models.qat_settings import check_qat
from mlxlab.models.quantized.quantized_cpu import CpuQuantizedLinear
from mlxlab.runtime.memory.io_threads import load_arrays

LORA_KEYS = {"rank", "alpha", "dropout", "targets", "extra_trainable", "kind", "qat_bits",
             "qat_group_size"}
# Fewer distinct layer names than this reached, or a smaller share of the model's parameters
# trained, is too little LoRA for the targets to be what the user meant (check_reach)
MIN_REACHED_NAMES = 2
MIN_TRAINED_SHARE = 1e-4

log = logging.getLogger(__name__)


def _dora_class() -> type:
    """mlx-lm's DoRALinear with the adapter switch, built on first use (importing mlx-lm is
    slow; only DoRA runs pay it)."""
    global DoRALinear
    if DoRALinear is None:
        from mlx_lm.tuner.dora import DoRALinear as MLXDoRA

        def __call__(self, x: mx.array) -> mx.array:
            if not self.adapter_on:
                return self.linear(x)
            if isinstance(self.linear, CpuQuantizedLinear) and mx.default_device() == mx.cpu:
                # mlx-lm's forward on the CPU's fused quantized product (models/quantized_dora)
                from mlxlab.models.quantized.quantized_dora import quantized_dora

                return quantized_dora(self, x)
            return MLXDoRA.__call__(self, x)

        DoRALinear = type("DoRALinear", (AdapterLayer, MLXDoRA),
                          {"__call__": __call__, "kind": "dora"})
    return DoRALinear


DoRALinear: type | None = None  # DoRA (Liu et al. 2024, lora.kind=dora): see _dora_class


def dora_from_base(linear: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
    """A DoRA layer on `linear` (float or quantized): a learned magnitude `m` per output row
    over the LoRA-updated direction; starts equal to the base."""
    layer = _dora_class()(input_dims(linear), linear.weight.shape[0], r=rank, dropout=dropout,
                          scale=alpha / rank)
    layer.set_linear(linear)  # (mlx-lm's from_base builds its own class, not this one)
    layer.linear.freeze()
    return layer


# lora.kind -> how an adapter layer of that kind wraps its base (a Linear; the routed experts:
# lora_experts.EXPERT_KINDS)
LORA_KINDS = {"lora": LoRALinear.from_base, "dora": dora_from_base}
# The base layers an adapter wraps: float, or quantized (QLoRA); and mlx-lm's stacked experts
# (routed_experts.switch_types)
ADAPTABLE = (nn.Linear, nn.QuantizedLinear)


def adaptable(module: nn.Module) -> bool:
    """Whether an adapter can wrap `module`: a Linear (float or quantized) or stacked experts."""
    return type(module) in ADAPTABLE or is_experts(module)


def wrap(module: nn.Module, kind: str, rank: int, alpha: float, dropout: float,
         qat: tuple[int, int] | None = None) -> AdapterLayer:
    """A `kind` adapter on `module`: one per expert on stacked experts; `qat` (bits, group
    size): LoRA trained through the quantized grid (lora_qat.py)."""
    if qat is not None:
        if is_experts(module):
            raise ConfigError("model.lora.qat_bits: quantization-aware LoRA wraps Linear layers; "
                              "leave the routed experts out of model.lora.targets")
        return QATLoRALinear.from_base_qat(module, rank, alpha, dropout, *qat)
    if is_experts(module):
        # imports mlx-lm's tuner, at first use: a model with experts imported mlx-lm already
        from mlxlab.models.adapters.lora_experts import EXPERT_KINDS

        return EXPERT_KINDS[kind](module, rank, alpha, dropout)
    return LORA_KINDS[kind](module, rank, alpha, dropout)


def has_adapters(model: nn.Module) -> bool:
    """Whether the model holds LoRA or DoRA layers."""
    return any(isinstance(m, AdapterLayer) for m in model.modules())


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[int]:
    """Inside the block `model` computes as its base weights alone (every LoRALinear skips its
    adapter); yields how many layers were switched. The same arrays, no copy: DPO's reference
    model is the policy with its adapters off. Tracing under mx.compile sees the switch, so one
    compiled step holds both forwards."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    for layer in layers:
        layer.adapter_on = False
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.adapter_on = True


def _matches(name: str, targets: Iterable[str]) -> bool:
    """A target names a run of path components: "query" and "attention.query" match
    "layers.0.attention.query"; "attention" matches all four projections under it."""
    padded = f".{name}."
    return any(f".{t}." in padded for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Iterable[str] = ("query", "value"),
    extra_trainable: Iterable[str] = (),
    kind: str = "lora",
    qat: tuple[int, int] | None = None,
) -> int:
    """Wrap every nn.Linear (or quantized nn.QuantizedLinear) named by `targets` (see _matches)
    in a `kind` adapter (lora | dora), freeze all other parameters except modules named in
    `extra_trainable` (e.g. a new "classifier" head).
    Returns the number of layers wrapped; rank 0 = LoRA off (nothing changes)."""
    check_lora({"rank": rank, "kind": kind, "dropout": dropout,
                **({"qat_bits": qat[0], "qat_group_size": qat[1]} if qat else {})})
    if rank == 0:
        return 0
    targets, extra_trainable = list(targets), list(extra_trainable)
    if has_adapters(model):
        raise ConfigError("model already has LoRA layers; fuse_lora it before applying LoRA again")
    wrapped = targeted_linears(model, targets)
    model.freeze()
    model.update_modules(
        tree_unflatten([(n, wrap(m, kind, rank, alpha, dropout, qat)) for n, m in wrapped])
    )
    modules = dict(model.named_modules())
    for name in extra_trainable:
        found = [n for n in modules if _matches(n, [name])]
        if not found:
            raise ConfigError(f"lora extra_trainable {name!r} names no module of the model")
        for n in found:
            modules[n].unfreeze()
    return len(wrapped)


def check_lora(lora: Mapping | None) -> None:
    """The lora node's keys and values, in one line each (before any model is built, and when
    one is): known keys, a rank >= 0, a kind mlxlab has."""
    if not lora:
        return
    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise ConfigError(f"unknown lora keys {sorted(unknown)}; allowed: {sorted(LORA_KEYS)}")
    rank = lora.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"model.lora.rank={rank} must be an integer >= 0 (0 turns LoRA off), "
                          "e.g. model.lora.rank=8")
    kind = lora.get("kind", "lora")
    if kind not in LORA_KINDS:
        raise ConfigError(f"model.lora.kind={kind!r}: use one of {sorted(LORA_KINDS)}")
    check_qat(lora)


def targeted_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The (name, layer) of every Linear or stacked experts `targets` names; none is one line
    listing the names there are, and so are targets that name the routed experts and reach
    none (a model built lazily, its weights never computed, is enough to ask)."""
    targets = list(targets)
    linears = [(n, m) for n, m in model.named_modules() if adaptable(m)]
    wrapped = [(n, m) for n, m in linears if _matches(n, targets)]
    if not wrapped:
        names = sorted({layer_name(n, m) for n, m in linears})
        raise ConfigError(f"lora targets {targets} match no Linear layer; available: {names}")
    named = [t for t in targets if names_experts(t)]
    if named and not any(is_experts(m) for _, m in wrapped):
        experts = sorted({layer_name(n, m) for n, m in linears if is_experts(m)})
        raise ConfigError(
            f"model.lora.targets {named} name the routed experts but reach none: "
            + (f"this model's experts are {experts}, e.g. model.lora.targets=[q_proj,v_proj,"
               "experts]" if experts else "this model has no routed experts (no MoE layers)"))
    return wrapped


def layer_name(name: str, module: nn.Module) -> str:
    """What reach reports a layer as: its own name ("o_proj"), or the stacked experts' under
    their block ("switch_mlp.gate_proj")."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if is_experts(module) or adapts_experts(module) else parts[-1]


def reached(model: nn.Module) -> Counter:
    """How many adapter layers the model has under each layer name ("o_proj": 61)."""
    return Counter(layer_name(n, m) for n, m in model.named_modules()
                   if isinstance(m, AdapterLayer))


def layer_kinds(model: nn.Module) -> dict[str, list[str]]:
    """The adapter layers by what they are: routed experts, shared experts, router, a hybrid's
    gated delta or state space mixer, attention, dense MLP or other (a MoE block is a module holding stacked experts; a Linear directly in
    one, beside them, is its router)."""
    modules = dict(model.named_modules())
    blocks = {n.rsplit(".", 2)[0] for n, m in modules.items()
              if is_experts(m) or adapts_experts(m)}
    kinds: dict[str, list[str]] = {}
    for name, m in modules.items():
        if not isinstance(m, AdapterLayer):
            continue
        parts = name.split(".")
        if is_experts(m.linear):
            kind = "routed experts"
        elif any("shared_expert" in p for p in parts):
            kind = "shared experts"
        elif any(name.startswith(f"{b}.") for b in blocks):
            kind = "router"
        elif kind := _mixer_kind(modules.get(name.rsplit(".", 1)[0])):
            pass
        elif any("attn" in p or "attention" in p for p in parts):
            kind = "attention"
        elif any(p in ("mlp", "feed_forward", "ffn") for p in parts):
            kind = "dense MLP"
        else:
            kind = "other"
        kinds.setdefault(kind, []).append(name)
    return kinds


def _mixer_kind(parent: nn.Module | None) -> str | None:
    """A hybrid's recurrent sequence mixer, by its class (the layer names say attention, e.g.
    Qwen3.5's linear_attn, Kimi's self_attn): a gated delta net (GatedDeltaNet,
    KimiDeltaAttention, BailingKDA) or a state space (Mamba) layer; None for anything else."""
    name = type(parent).__name__ if parent is not None else ""
    if "Delta" in name or "KDA" in name:
        return "gated delta"
    return "state space (Mamba)" if "Mamba" in name else None


def _kinds_said(model: nn.Module, kinds: Mapping[str, list[str]]) -> str:
    """"attention 4, routed experts 6 (8 experts each, 98,304 parameters)"."""
    modules = dict(model.named_modules())
    said = []
    for kind, names in sorted(kinds.items()):
        if kind != "routed experts":
            said.append(f"{kind} {len(names)}")
            continue
        experts = sorted({modules[n].lora_a.shape[0] for n in names})
        size = sum(v.size for n in names
                   for _, v in tree_flatten(modules[n].trainable_parameters()))
        said.append(f"{kind} {len(names)} ({'/'.join(map(str, experts))} experts each, "
                    f"{size:,} parameters)")
    return ", ".join(said)


def check_reach(model: nn.Module, targets: Iterable[str],
                aliases: Mapping[str, Iterable[str]] | None = None) -> Counter:
    """Say which layers LoRA's `targets` reached (each name, how many, the share of parameters
    trained, the kinds of layer: attention, routed experts with their parameters, ...); a
    warning naming model.lora.targets when they reached too little (fewer than
    MIN_REACHED_NAMES layer names, or under MIN_TRAINED_SHARE of the parameters): an
    architecture whose projections have other names (deepseek_v3's q_a_proj, kv_b_proj, ...)
    than the targets (with `aliases`: each target's other spellings) expect."""
    counts = reached(model)
    if not counts:
        return counts
    aliases = aliases or {}
    names = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    missed = [t for t in targets if not any(_matches(n, [t, *aliases.get(t, ())])
                                            for n in names)]
    trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters())) or 1
    where = ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
    log.info("LoRA adapters on %d layers: %s (%s trainable parameters, %.3g%% of %s); "
             "kinds: %s", sum(counts.values()), where, f"{trained:,}", 100 * trained / total,
             f"{total:,}", _kinds_said(model, layer_kinds(model)))
    if len(counts) >= MIN_REACHED_NAMES and trained / total >= MIN_TRAINED_SHARE:
        return counts
    inside = {f"{n}.linear" for n in names}  # an adapter's own base layer
    linears = sorted({layer_name(n, m) for n, m in model.named_modules()
                      if (adaptable(m) and n not in inside) or isinstance(m, AdapterLayer)})
    log.warning(
        "model.lora.targets %s reached only %s (%s trainable parameters, %.2g%% of the model)%s: "
        "too little for LoRA to learn much. This model's Linear layers are %s: name its "
        "attention projections in model.lora.targets, e.g. model.lora.targets=[%s]",
        list(targets), where, f"{trained:,}", 100 * trained / total,
        f"; {', '.join(missed)} reached no layer" if missed else "", linears,
        ",".join(n for n in linears if "proj" in n and "expert" not in n and "." not in n
                 and not n.startswith(("gate", "up", "down"))) or ",".join(linears))
    return counts


def maybe_apply_lora(
    model: nn.Module,
    lora: Mapping | None,
    default_targets: Iterable[str] = ("query", "value"),
    default_extra_trainable: Iterable[str] = (),
) -> int:
    """Apply a model's `lora={"rank": ..}` constructor argument (None or rank 0 = off)."""
    if not lora:
        return 0
    check_lora(lora)
    return apply_lora(
        model,
        rank=int(lora.get("rank", 0)),
        alpha=float(lora.get("alpha", 16.0)),
        dropout=float(lora.get("dropout", 0.0)),
        targets=lora.get("targets") or default_targets,
        extra_trainable=lora.get("extra_trainable", default_extra_trainable) or (),
        kind=str(lora.get("kind", "lora")),
        qat=(int(lora["qat_bits"]), int(lora.get("qat_group_size", 64)))
        if lora.get("qat_bits") else None,
    )


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter layer into its base (in place) and unfreeze: the result has the plain
    parameter names and loads into a model built with lora rank 0. A quantized base is
    dequantized, merged and quantized again as it was (mlx-lm's fuse), or left float with
    `dequantize`."""
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules()
             if isinstance(m, AdapterLayer)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model.unfreeze()
    return model


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its base layer (in place), dropping the adapters, and
    unfreeze: the base model an adapter file is applied to."""
    base = [(n, m.linear) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if base:
        model.update_modules(tree_unflatten(base))
    model.unfreeze()
    return model


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """Flat name -> array of what LoRA training changes: the trainable parameters (adapters plus
    any extra_trainable head). Small; save with mx.save_safetensors."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, path: str | Path) -> None:
    mx.save_safetensors(str(path), adapter_parameters(model))


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load an adapter file written by save_adapters onto a model built with the same lora config."""
    if not has_adapters(model):
        raise ConfigError("model has no LoRA adapters; build it with lora.rank > 0 first")
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"adapter file {path} does not exist; save it with save_adapters")
    weights = load_arrays(path)
    expected = adapter_parameters(model)
    _check_subset(weights, dict(tree_flatten(model.parameters())), what="adapter")
    if missing := sorted(expected.keys() - weights.keys()):
        raise ConfigError(
            f"adapter file {path} lacks {missing[:5]}; was it saved with other targets?"
        )
    model.load_weights(list(weights.items()), strict=False)


def lora_base_name_map(model: nn.Module) -> dict[str, str]:
    """Plain parameter name -> its name in this LoRA-wrapped model, for every wrapped layer.
    E.g. "layers.0.attention.query.weight" -> "layers.0.attention.query.linear.weight"."""
    mapping = {}
    for name, m in model.named_modules():
        if isinstance(m, AdapterLayer):
            for p in m.linear.parameters():
                mapping[f"{name}.{p}"] = f"{name}.linear.{p}"
    return mapping


def load_base_weights(model: nn.Module, weights: str | Path | Mapping[str, mx.array]) -> None:
    """Load plain (un-wrapped) weights into a model that may have LoRA layers: every base
    parameter must be present; adapters keep their init (B = 0, so outputs match the base)."""
    if isinstance(weights, (str, Path)):
        weights = load_arrays(weights)
    mapping = lora_base_name_map(model)
    renamed = {mapping.get(k, k): v for k, v in weights.items()}
    params = dict(tree_flatten(model.parameters()))
    _check_subset(renamed, params, what="checkpoint")
    adapters = {n for n in params if n.endswith((".lora_a", ".lora_b"))}
    if missing := sorted(params.keys() - renamed.keys() - adapters):
        raise ConfigError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:5]}")
    model.load_weights(list(renamed.items()), strict=False)


def _check_subset(weights: Mapping, params: Mapping, what: str) -> None:
    if extra := sorted(weights.keys() - params.keys()):
        raise ConfigError(f"{what} has {len(extra)} names the model lacks, e.g. {extra[:5]}")
    for k, v in weights.items():
        if v.shape != params[k].shape:
            raise ConfigError(f"{what} {k} has shape {v.shape}, model expects {params[k].shape}")
