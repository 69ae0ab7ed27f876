"""The config checked before anything heavy is built, once: a typo in an override fails in
milliseconds with a one-line message that names the key and the fix.

`validate(cfg)` answers with the nodes it built to check them (`Parts`: the trainer settings,
the objective, the data, the evaluation, the checkpoint policy): the run trains with those, so
each is built once. A node the run changes after validation (the tokenizer path a resume or a
pretrained folder sets) is built again from what it says then.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlxlab.config.compose import instantiate, unwrapped
from mlxlab.config.fit import (
    _check_compile,
    _check_objective,
    _check_packing,
    _check_tensor_parallel,
)
from mlxlab.config.options import group_options
from mlxlab.config.records import check_choice, check_number
from mlxlab.config.retired import check_retired_keys, moved_target
from mlxlab.errors import ConfigError


class Parts:
    """Config nodes built once: by validate to check them, then by the run that trains them.
    A node is known by what it says (its resolved keys), so a node changed in between is built
    again rather than handed over stale."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def build(self, node: Any) -> Any:
        """`node` built (its constructor's UserError as itself), or the object built from a
        node that said the same."""
        said = node_text(node)
        if said not in self._built:
            with unwrapped():
                self._built[said] = instantiate(node)
        return self._built[said]


def node_text(node: Any) -> str:
    """What a config node says, resolved, as one string (the key a built part is kept under);
    a node that does not resolve is its own (building it reports why)."""
    try:
        plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception:  # noqa: BLE001 (instantiate raises it, as Hydra words it)
        return f"unresolved {id(node)}"
    return json.dumps(plain, sort_keys=True, default=str)


# A single run's config is validated by the Hydra callback before its run folder exists
# (sweeps/checks.py): its job takes the parts built then instead of a second pass.
_checked: list[Parts] = []


def hand_to_run(parts: Parts) -> None:
    """Keep `parts` for the one job that follows (the Hydra callback's validation)."""
    _checked[:] = [parts]


def checked_parts() -> Parts | None:
    """The parts the callback validated for this job, once (None: validate here)."""
    return _checked.pop() if _checked else None


@dataclass(frozen=True)
class TopKeys:
    """The top-level keys of conf/train.yaml that a value can get wrong (task_name, resume, tags,
    sweep and paths are read where they are used). A number left null is not checked."""

    seed: int | None = None              # weights, dropout and batch order
    split_seed: int | None = None        # the validation rows (null: seed)
    replicates: int | None = None        # --multirun: seeds per config
    optimized_mode: str = "max"          # max | min

    def __post_init__(self) -> None:
        for key, low in (("seed", 0), ("split_seed", 0), ("replicates", 1)):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), int, low)
        if self.optimized_mode not in ("max", "min"):
            raise ConfigError(f"optimized_mode must be 'max' or 'min', got {self.optimized_mode!r}")

    @classmethod
    def of(cls, cfg: DictConfig) -> TopKeys:
        """The keys as `cfg` has them (an absent one: its default here)."""
        return cls(**{f.name: cfg.get(f.name, f.default) for f in fields(cls)})


# The optimizer node's keys mlxlab checks (conf/optimizer/*.yaml; which keys a class takes is
# checked against its signature): (key, type, lower bound).
OPTIMIZER_NUMBERS = (("learning_rate", float, 0.0), ("weight_decay", float, 0.0),
                     ("eps", float, 0.0), ("momentum", float, 0.0))
# The keys of the two shipped callbacks that do not check their own yet (training/callbacks.py
# EarlyStopping and MemoryMonitor; every other callback and record checks its keys itself):
# (callback, key, type, lower bound).
CALLBACK_NUMBERS = (("early_stopping", "patience", int, 0), ("memory", "every", int, 0))
# Config nodes built by validate() so that their classes check their own keys (settings records'
# __post_init__, the data modules' settings) before anything heavy is built: one line naming the
# key, from the owner. The model is checked by its constructor when it is built (its sizes need
# the data's vocabulary).
SETTINGS_NODES = ("trainer", "objective", "checkpoint", "data", "eval")


def validate(cfg: DictConfig, parts: Parts | None = None) -> Parts:
    """Fail fast, with one line naming the key and the fix, before anything heavy is built;
    the nodes built to check them come back (`parts`: kept from an earlier validation of the
    same run, a node that says the same is not built again)."""
    parts = parts or Parts()
    check_retired_keys(cfg)
    _check_required(cfg)
    TopKeys.of(cfg)
    for group in ("model", "data", "objective", "trainer", "tracking", "optimizer"):
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            raise ConfigError(f"config group '{group}' has no _target_: pick an option, e.g. "
                              f"{group}={'|'.join(group_options(group)) or '...'}")
    _check_optimizer(cfg)
    _check_callbacks(cfg)
    _check_targets(cfg)
    _check_objective(cfg)
    _check_model(cfg)
    _check_packing(cfg)
    _check_tensor_parallel(cfg)
    _check_compile(cfg)
    _check_settings(cfg, parts)
    _check_replicates(cfg)
    return parts


def _check_replicates(cfg: DictConfig) -> None:
    """replicates=N is a multirun of N seeds per config (sweeps/search/sweeper.py expands it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    n = cfg.get("replicates", 1) or 1
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if n > 1 and not multirun:
        raise ConfigError(f"replicates={n} runs each config on {n} seeds: add --multirun (-m), "
                          f"e.g. mlxlab-train -m replicates={n}")


def _check_optimizer(cfg: DictConfig) -> None:
    """The optimizer node: an importable mlx optimizer taking its keys (which option names it is
    Hydra's and train.py's: an unknown `optimizer=` never composes), partial, with a learning
    rate, and the values of the keys OPTIMIZER_NUMBERS names, bias_correction and betas."""
    node = cfg.optimizer
    options = group_options("optimizer")
    _check_target(node, "optimizer", f"choose optimizer={'|'.join(options)} or a class "
                  "such as mlx.optimizers.AdamW")
    if not node.get("_partial_", False):
        raise ConfigError("the optimizer node needs _partial_: true (the trainer adds the "
                          "learning-rate schedule): add optimizer._partial_=true")
    if "learning_rate" not in node:
        raise ConfigError("the optimizer node needs a learning_rate: add +optimizer.learning_rate=1e-3")
    for key, kind, low in OPTIMIZER_NUMBERS:
        if node.get(key) is not None:
            check_number(f"optimizer.{key}", node.get(key), kind, low)
    check_choice("optimizer.bias_correction", node.get("bias_correction"), (None, True, False))
    betas = node.get("betas")
    if betas is not None and (
        len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got {betas}")


def _check_callbacks(cfg: DictConfig) -> None:
    """Every entry of callbacks is a `_target_` node (a key set on callbacks=none is not)."""
    node = cfg.get("callbacks")
    if node is None:
        return
    if not OmegaConf.is_dict(node):
        raise ConfigError("callbacks must be a mapping of name -> {_target_: ...}: use callbacks="
                          f"{'|'.join(group_options('callbacks'))}")
    for name, entry in node.items():
        if entry is None:
            continue
        if not OmegaConf.is_dict(entry) or "_target_" not in entry:
            raise ConfigError(
                f"callbacks.{name} has no _target_: give the class, e.g. "
                f"'+callbacks.{name}={{_target_: my_pkg.MyCallback}}', or drop it with ~callbacks.{name}")
        _check_target(entry, f"callbacks.{name}", "give an importable class (is its module on "
                      "PYTHONPATH?)")
    for name, key, kind, low in CALLBACK_NUMBERS:
        value = OmegaConf.select(node, f"{name}.{key}", default=None)
        if value is not None:
            check_number(f"callbacks.{name}.{key}", value, kind, low)


def _check_target(node: DictConfig, key: str, fix: str) -> None:
    """node._target_ imports and takes node's keys as arguments; else one line naming the key."""
    target = str(node._target_)
    module, _, name = target.rpartition(".")
    try:  # (hydra.utils.get_object would also log its own multi-line report)
        factory = getattr(importlib.import_module(module), name)
    except Exception:
        raise ConfigError(f"{key}._target_={target} is not importable: {fix}") from None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: the call will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in node if not str(k).startswith("_") and k not in params]
    if unknown:
        allowed = [p for p in params if p != "self"]
        raise ConfigError(f"{key}.{unknown[0]} is not an argument of {target}: it takes {allowed}")


# The group nodes whose class is imported when it is built, not here: tracking's would import
# MLflow in a process that tracks in a child (tracking/mlflow/background.py); its module's
# presence is checked all the same.
IMPORTED_LATER = ("tracking",)


def _check_targets(cfg: DictConfig) -> None:
    """Every `_target_` in the config (a group's class, a reward, a callback) names something
    that imports: one line naming the key, the target and what is missing
    (`objective.rewards[0]._target_=my_rewards.brevity: no module 'my_rewards'`), not Hydra's
    report of the import's traceback when it is built."""
    tree = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    for key, target in _targets(tree, ""):
        problem = target_problem(target, imported=key.split(".")[0] not in IMPORTED_LATER)
        if problem and (now := moved_target(target)):
            raise ConfigError(f"{key}={target} is {now} now: write {now}")
        if problem:
            raise ConfigError(f"{key}={target}: {problem}; fix the name, or put its module on "
                              "PYTHONPATH")


def _targets(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """(config key of a `_target_`, its value) for every target under `node` (Hydra's own
    node aside); interpolated targets are resolved when built, not here."""
    if isinstance(node, dict):
        for name, value in node.items():
            where = f"{key}.{name}" if key else str(name)
            if name == "_target_" and isinstance(value, str) and "${" not in value:
                yield where, value
            elif where != "hydra":
                yield from _targets(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def target_problem(target: str, imported: bool = True) -> str | None:
    """Why `target` cannot be had (no such module, a module that fails to run, a name it lacks),
    or None; not `imported`: only whether its top-level module is there (nothing runs)."""
    from importlib.util import find_spec

    from hydra._internal.utils import _locate  # what instantiate uses, without its logging

    top = target.split(".")[0]
    if "." not in target:
        return f"{target!r} is not module.name"
    if find_spec(top) is None:
        return f"no module {top!r}"
    if not imported:
        return None
    try:
        _locate(target)
    except ImportError as e:
        cause = e.__cause__ or e
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            parent, _, name = cause.name.rpartition(".")
            if parent and target.startswith(f"{cause.name}") and parent in sys.modules:
                return f"module {parent!r} has no {name!r}"  # a name looked up as a module
            return f"no module {cause.name!r}"
        if isinstance(cause, AttributeError):
            module, _, name = target.rpartition(".")
            return f"{module!r} has no {name!r}"
        return f"its module does not import ({type(cause).__name__}: {str(cause)[:200]})"
    except Exception as e:  # the module's own code failed
        return f"its module does not import ({type(e).__name__}: {str(e)[:200]})"
    return None


def _check_required(cfg: DictConfig) -> None:
    """Keys left `???` in the config (data=csv's path and label column) must be given."""
    missing = []
    for group in ("model", "data", "objective", "trainer", "tracking", "optimizer"):
        node = cfg.get(group)
        if OmegaConf.is_config(node):
            keys = OmegaConf.missing_keys(node)  # full keys, e.g. "data.path"
            missing += [f"{group}.{k}" for k in node if f"{group}.{k}" in keys]
    if not missing:
        return
    example = {"data.path": "data.path=my.csv", "data.label_column": "data.label_column=target",
               "model.pretrained": "model.pretrained=/path/to/hf_model_folder",
               "data.train_file": "data.train_file=train.jsonl"}
    fixes = " ".join(example.get(k, f"{k}=...") for k in missing)
    raise ConfigError(f"{', '.join(missing)} must be set: add {fixes} to the command line")


def _check_model(cfg: DictConfig) -> None:
    """The model class checks its node before anything is created (Model.check_config: a
    pretrained decoder's folder and type, quantize, the lora node and its targets)."""
    from hydra.utils import get_class

    try:
        model = get_class(cfg.model._target_)
    except Exception:  # _check_targets named it
        return
    check = getattr(model, "check_node", None) or getattr(model, "check_config", None)
    if check is not None:
        with unwrapped():
            check(OmegaConf.to_container(cfg.model, resolve=True))


def _check_settings(cfg: DictConfig, parts: Parts) -> None:
    """Build each of SETTINGS_NODES into `parts` (its keys checked against its class first):
    the owner's check raises the one line for a bad value, unwrapped from Hydra's report."""
    for key in SETTINGS_NODES:
        node = OmegaConf.select(cfg, key, default=None)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue  # a missing trainer _target_ is reported above; callbacks=none has none
        _check_target(node, key, "give an importable class")
        parts.build(node)


