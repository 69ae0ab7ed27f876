"""Config plumbing: resolvers, early validation, and the one instantiate helper.

Validation runs before anything heavy is built, so a typo in an override fails in milliseconds
with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.errors import ConfigError, RemoteError
from mlxlab.runtime import settings

__all__ = ["ConfigError", "compose_config", "config_hash", "instantiate", "validate"]

ASSETS_DIR = Path(__file__).parent / "assets"


def project_root(start: Path | None = None) -> Path:
    """$MLXLAB_ROOT, else the nearest folder at or above `start` holding pyproject.toml or .git."""
    given = settings.current().root
    if given is not None:
        return given.resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() or (folder / ".git").exists():
            return folder
    return here


def asset_path(relative: str) -> str:
    """Absolute path of a data file shipped inside the package (src/mlxlab/assets)."""
    path = ASSETS_DIR / relative
    if not path.exists():
        raise ConfigError(f"no shipped asset '{relative}' in {ASSETS_DIR}")
    return str(path)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mlxlab_root"):
        OmegaConf.register_new_resolver("mlxlab_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def run_stamp(pattern: str) -> str:
    """Like Hydra's ${now:pattern}, but one time for all ranks of a data-parallel run (rank 0's,
    broadcast), so `mlx.launch -n N` ranks started apart still share one run folder."""
    from datetime import datetime

    from mlxlab.runtime.distributed import start_time

    return datetime.fromtimestamp(start_time()).strftime(pattern)


register_resolvers()


def config_dir() -> str:
    """The conf/ folder: inside the installed wheel, or at the repository root (editable)."""
    packaged = Path(__file__).parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[2] / "conf")


def compose_config(
    root: str | Path, overrides: list[str] | tuple[str, ...] = (), output_dir: str | Path | None = None
) -> DictConfig:
    """The real train.yaml composed outside a Hydra app (tests, benchmarks, notebooks).

    Rooted in `root` (store, caches, outputs), with Hydra's runtime config set so that train(cfg)
    reads the config-group choices as in a CLI run; the run folder is `output_dir`
    (default <root>/outputs/run).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={root}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or Path(root) / "outputs" / "run")
    return cfg


def to_container(cfg: DictConfig | Mapping, skip: tuple[str, ...] = ()) -> dict:
    """The resolved config as plain Python, without Hydra's own `hydra` node."""
    if not isinstance(cfg, DictConfig):
        return {k: v for k, v in cfg.items() if k not in skip}
    out = {}
    for key in cfg:
        if key == "hydra" or key in skip:
            continue
        node = cfg[key]
        out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return out


def config_hash(
    cfg: DictConfig,
    ignore: tuple[str, ...] = ("resume", "sweep", "tags", "paths", "tracking", "replicates"),
) -> str:
    """Stable hash of the resolved config minus keys that don't change what is trained."""
    data = to_container(cfg, skip=ignore)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate with plain Python containers for every argument."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(node, _convert_="all", **kwargs)


# --- early validation ------------------------------------------------------------------------

# The facts the checks below need live here, so config imports nothing above runtime/.
# What evaluation (training/metrics.py) reports for each data task (prefix "val/"): the names
# optimized_metric may use.
METRICS = {"classification": ("loss", "accuracy", "f1", "roc_auc"), "lm": ("loss", "perplexity")}
# The object stores a checkpoint URI may name (callbacks.checkpoint.remote, resume=), and the
# fsspec package that opens each (checkpoint/remote.py).
REMOTE_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                  "abfss": "adlfs"}


def is_remote(uri: Any) -> bool:
    return isinstance(uri, str) and uri.split("://", 1)[0].lower() in REMOTE_SCHEMES and "://" in uri


def check_uri(uri: str) -> tuple[str, str]:
    """(scheme, rest) of a usable remote URI; RemoteError naming the fix otherwise."""
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme not in REMOTE_SCHEMES or not rest.strip("/"):
        raise RemoteError(
            f"remote checkpoint URI {uri!r} is not s3://bucket/prefix, gs://bucket/prefix or "
            "az://container/prefix"
        )
    if re.match(r"^[^/]*@", rest) and scheme in ("s3", "gs", "gcs"):
        raise RemoteError(
            f"the remote URI for {scheme}:// must not carry credentials: use the provider's "
            "standard credential chain (environment variables, config files, instance roles)"
        )
    return scheme, rest


# key -> (type, lower bound or None). Only keys present in the config are checked. The keys of
# settings that are typed dataclasses (trainer.*: training/settings.py; callbacks.checkpoint.*:
# training/settings.py CheckpointPolicy) are checked by their owners, built below.
_NUMERIC_RULES: dict[str, tuple[type, float | None]] = {
    "seed": (int, 0),
    "split_seed": (int, 0),
    "replicates": (int, 1),
    "optimizer.learning_rate": (float, 0.0),
    "optimizer.weight_decay": (float, 0.0),
    "optimizer.eps": (float, 0.0),
    "optimizer.momentum": (float, 0.0),
    "callbacks.early_stopping.patience": (int, 0),
    "callbacks.memory.every": (int, 0),
    "model.hidden_size": (int, 1),
    "model.num_layers": (int, 1),
    "model.num_heads": (int, 1),
    "model.dim": (int, 1),
    "model.dropout": (float, 0.0),
    "data.val_fraction": (float, 0.0),
    "data.max_length": (int, 1),
    "data.packing.seq_len": (int, 1),
}
# Config nodes built by validate() so that their classes check their own fields (__post_init__)
# before anything heavy is built: one line naming the key, from the owner.
SETTINGS_NODES = ("trainer", "callbacks.checkpoint")


def check_number(key: str, value: Any, kind: type, low: float | None = None) -> None:
    """`value` of config key `key` is a `kind` (int or float) >= `low`; else one ConfigError line
    naming the key and the fix. The settings dataclasses call it for their numeric fields."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(
            f"{key} must be a number, got {value!r}: fix the override, e.g. {key}=3e-4"
            if kind is float
            else f"{key} must be an integer, got {value!r}: fix the override, e.g. {key}=4"
        )
    if kind is int and float(value) != int(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and float(value) < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """`value` of config key `key` is one of `allowed`; else one ConfigError line listing them."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Fail fast, with one line naming the key and the fix, before anything is built."""
    _check_required(cfg)
    for key, (kind, low) in _NUMERIC_RULES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is not None:
            check_number(key, value, kind, low)
    fraction = OmegaConf.select(cfg, "data.val_fraction", default=None)
    if fraction is not None and not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {fraction}")
    mode = cfg.get("optimized_mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"optimized_mode must be 'max' or 'min', got {mode!r}")
    for group in ("model", "data", "trainer", "tracking", "optimizer"):
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            raise ConfigError(f"config group '{group}' has no _target_: pick an option, e.g. "
                              f"{group}={'|'.join(group_options(group)) or '...'}")
    _check_optimizer(cfg)
    _check_callbacks(cfg)
    _check_settings(cfg)
    # model.mlp is checked by its owner when the model is built (models/layers.py make_mlp).
    _check_choice(cfg, "optimizer.bias_correction", (None, True, False))
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None)
    if betas is not None and (
        len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9,0.999], got {betas}")
    _check_optimized_metric(cfg)
    _check_replicates(cfg)


def _check_replicates(cfg: DictConfig) -> None:
    """replicates=N is a multirun of N seeds per config (search/sweeper.py expands it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    n = cfg.get("replicates", 1) or 1
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if n > 1 and not multirun:
        raise ConfigError(f"replicates={n} runs each config on {n} seeds: add --multirun (-m), "
                          f"e.g. mlxlab-train -m replicates={n}")


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files in conf/<group>/."""
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _check_optimizer(cfg: DictConfig) -> None:
    """optimizer=<name> must name a conf/optimizer/ option whose target is an mlx optimizer."""
    from hydra.core.hydra_config import HydraConfig

    options = group_options("optimizer")
    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices.get("optimizer")
        if chosen is not None and chosen not in options:  # a custom node given in full is fine
            raise ConfigError(f"optimizer={chosen} is not an option: choose one of {options}")
    _check_target(cfg.optimizer, "optimizer", f"choose optimizer={'|'.join(options)} or a class "
                  "such as mlx.optimizers.AdamW")
    if not cfg.optimizer.get("_partial_", False):
        raise ConfigError("the optimizer node needs _partial_: true (the trainer adds the "
                          "learning-rate schedule): add optimizer._partial_=true")
    if "learning_rate" not in cfg.optimizer:
        raise ConfigError("the optimizer node needs a learning_rate: add +optimizer.learning_rate=1e-3")


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


def _check_target(node: DictConfig, key: str, fix: str) -> None:
    """node._target_ imports and takes node's keys as arguments; else one line naming the key."""
    import importlib
    import inspect

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


def _check_required(cfg: DictConfig) -> None:
    """Keys left `???` in the config (data=csv's path and label column) must be given."""
    missing = []
    for group in ("model", "data", "trainer", "tracking", "optimizer"):
        node = cfg.get(group)
        if OmegaConf.is_config(node):
            keys = OmegaConf.missing_keys(node)  # full keys, e.g. "data.path"
            missing += [f"{group}.{k}" for k in node if f"{group}.{k}" in keys]
    if not missing:
        return
    example = {"data.path": "data.path=my.csv", "data.label_column": "data.label_column=target",
               "model.pretrained": "model.pretrained=/path/to/hf_model_folder"}
    fixes = " ".join(example.get(k, f"{k}=...") for k in missing)
    raise ConfigError(f"{', '.join(missing)} must be set: add {fixes} to the command line")


def _check_choice(cfg: DictConfig, key: str, allowed: tuple) -> None:
    check_choice(key, OmegaConf.select(cfg, key, default=None), allowed)


def _check_settings(cfg: DictConfig) -> None:
    """Build each of SETTINGS_NODES (its keys checked against its class first): the owner's
    __post_init__ raises the one line for a bad value, unwrapped from Hydra's report."""
    from hydra.errors import InstantiationException

    from mlxlab.errors import UserError

    for key in SETTINGS_NODES:
        node = OmegaConf.select(cfg, key, default=None)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue  # a missing trainer _target_ is reported above; callbacks=none has none
        _check_target(node, key, "give an importable class")
        try:
            instantiate(node)
        except InstantiationException as wrapped:
            if isinstance(wrapped.__cause__, UserError):
                raise wrapped.__cause__ from None
            raise


def _check_optimized_metric(cfg: DictConfig) -> None:
    """optimized_metric must be something evaluation computes for this data's task."""
    from hydra.utils import get_class

    try:
        task = getattr(get_class(cfg.data._target_), "task", None)
    except Exception:  # an unknown target fails at instantiation with Hydra's own message
        return
    if task not in METRICS:
        return
    names = [f"val/{m}" for m in METRICS[task]]
    if cfg.get("optimized_metric") not in names:
        raise ConfigError(
            f"optimized_metric={cfg.get('optimized_metric')!r} is not computed for {task} data: "
            f"choose one of {names}"
        )
