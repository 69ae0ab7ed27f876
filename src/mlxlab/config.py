"""Config plumbing: resolvers, early validation, and the one instantiate helper.

Validation runs before anything heavy is built, so a typo in an override fails in milliseconds
with a one-line message that names the key and the fix.

Hydra itself is imported inside the functions that compose, instantiate or check with it: this
module is also imported for its facts alone (REMOTE_SCHEMES, check_uri, project_root) by code
that never composes a config (checkpoint uploads, the verbs), and hydra's import costs ~0.1 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.errors import ConfigError, DataMismatch, RemoteError, UserError
from mlxlab.runtime import settings
from mlxlab.validation import check_choice, check_number

__all__ = ["ConfigError", "check_choice", "check_number", "compose_config", "config_hash",
           "instantiate", "unwrapped", "validate"]

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
    if not OmegaConf.has_resolver("sweep_folder"):
        OmegaConf.register_new_resolver("sweep_folder", sweep_folder, use_cache=True)


def run_stamp(pattern: str) -> str:
    """Like Hydra's ${now:pattern}, but one time for all ranks of a data-parallel run (rank 0's,
    broadcast), so `mlx.launch -n N` ranks started apart still share one run folder."""
    from mlxlab.runtime.distributed import start_time  # MLX's distributed: when stamping

    return datetime.fromtimestamp(start_time()).strftime(pattern)


def sweep_folder(n_trials: Any, study_name: Any, pattern: str) -> str:
    """A multirun's folder under multirun/<task>/ (conf/hydra/default.yaml): a search's is its
    study's, `study_<name>`, as the hparams_search presets name it, so the same command finds
    the folder (and the killed trial's checkpoint) again, preset or not; a grid's is stamped
    with its start (a grid continued by the same command finds its folder by its identity,
    sweeps/identity.py)."""
    return f"study_{study_name}" if n_trials else run_stamp(pattern)


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
    if not (cfg.get("eval") or {}).get("tasks"):  # no tasks: hashed as before `eval` existed
        ignore = (*ignore, "eval")
    data = to_container(cfg, skip=ignore)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate with plain Python containers for every argument."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(node, _convert_="all", **kwargs)


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """A UserError raised by a constructor Hydra called (a settings record's check, a model's
    size) comes out of the block as itself, not inside Hydra's multi-line
    InstantiationException: what train.py prints as one line. Any other error is left as is."""
    from hydra.errors import InstantiationException

    try:
        yield
    except InstantiationException as wrapped:
        if isinstance(wrapped.__cause__, UserError):
            raise wrapped.__cause__ from None
        raise


# --- early validation ------------------------------------------------------------------------

# The facts the checks below need live here, so config imports nothing above runtime/.
# The object stores a checkpoint URI may name (checkpoint.remote, resume=), and the
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


# A single run's config is validated by the Hydra callback before its run folder exists
# (sweeps/checks.py): its job then needs no second pass (~0.3 s on a loaded 2-core machine).
_validated_before_run = False


def validated_before_run(done: bool | None = None) -> bool:
    """Whether the run's config was validated before Hydra's run (`done`: say so); asking
    again answers False (the flag is for the one job that follows)."""
    global _validated_before_run
    if done is not None:
        _validated_before_run = done
        return done
    was, _validated_before_run = _validated_before_run, False
    return was


def validate(cfg: DictConfig) -> None:
    """Fail fast, with one line naming the key and the fix, before anything is built."""
    _check_retired_keys(cfg)
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
    _check_settings(cfg)
    _check_replicates(cfg)


def _check_replicates(cfg: DictConfig) -> None:
    """replicates=N is a multirun of N seeds per config (sweeps/search/sweeper.py expands it)."""
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
    check = getattr(model, "check_config", None)
    if check is not None:
        with unwrapped():
            check(OmegaConf.to_container(cfg.model, resolve=True))


def _check_settings(cfg: DictConfig) -> None:
    """Build each of SETTINGS_NODES (its keys checked against its class first): the owner's
    check raises the one line for a bad value, unwrapped from Hydra's report."""
    for key in SETTINGS_NODES:
        node = OmegaConf.select(cfg, key, default=None)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue  # a missing trainer _target_ is reported above; callbacks=none has none
        _check_target(node, key, "give an importable class")
        with unwrapped():
            instantiate(node)


def _check_objective(cfg: DictConfig) -> None:
    """The objective's own checks of the composed config (Objective.check_config, asked of its
    class before anything is built): the kind of data it trains on, an optimized_metric it
    reports, its settings together (models whose tokenizers must agree). A line about
    the data adds what the data is and which objectives train on it."""
    from hydra.utils import get_class

    try:
        data, check = get_class(cfg.data._target_), get_class(cfg.objective._target_).check_config
    except Exception:  # an unknown target (or no Objective) fails at instantiation or at fit
        return
    prompts, task = getattr(data, "prompts_only", False), getattr(data, "task", None)
    try:
        check(cfg, "prompts" if prompts else task)
    except DataMismatch as err:
        raise ConfigError(f"{err}; {_data_kind_line(cfg, task, prompts)}") from None


# What each data kind is, in words (a data module's `task`; "prompts": prompts_only data)
DATA_KINDS = {"classification": "labelled rows for classification", "lm": "text or chats to "
              "learn (language-model data)", "preference": "preference pairs",
              "prompts": "prompts without completions"}


def _data_kind_line(cfg: DictConfig, task: str, prompts: bool) -> str:
    """What a mismatch line says of the data: its option and kind, the keys its rows have, and
    the objectives and experiments that train on data of that kind."""
    from hydra.core.hydra_config import HydraConfig

    kind = "prompts" if prompts else task
    option = None
    if HydraConfig.initialized():
        option = HydraConfig.get().runtime.choices.get("data")
    named = f"data={option}" if option else f"data {cfg.data._target_.rsplit('.', 1)[-1]}"
    keys = _row_keys(cfg.data)
    has = f" (its rows have {keys})" if keys else ""
    fits = [o for o in group_options("objective") if _fits(("objective", o), kind)]
    experiments = [e for e in group_options("experiment") if _data_of(e) == kind]
    return (f"{named} is {DATA_KINDS.get(kind, kind)}{has}: the objectives that train on it: "
            f"{'objective=' + '|'.join(fits) if fits else 'none shipped'}"
            + (f", as in experiment={'|'.join(experiments)}" if experiments else ""))


def _row_keys(node: DictConfig) -> list[str] | None:
    """The keys of the first row of the data's file (a jsonl's, a csv's columns), None when
    it cannot be read cheaply."""
    path = next((node.get(k) for k in ("train_file", "path") if node.get(k)), None)
    try:
        with open(str(path), encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        if str(path).endswith(".csv"):
            return [c.strip() for c in first.rstrip("\n").split(",")]
        row = json.loads(first)
        return sorted(row) if isinstance(row, dict) else None
    except Exception:  # no file yet, not text: the line goes without its keys
        return None


def _fits(option: tuple[str, str], kind: str) -> bool:
    """Whether conf/objective/<option>.yaml's class trains on data of `kind`."""
    from hydra.utils import get_class

    try:
        return bool(get_class(str(_target_of(*option))).metrics(kind).definitions)
    except Exception:
        return False


def _target_of(group: str, option: str, depth: int = 0) -> str | None:
    """conf/<group>/<option>.yaml's _target_, or that of the option it extends (chat: completions)."""
    node = _yaml(group, option) if depth < 8 else None
    if not node or node.get("_target_"):
        return (node or {}).get("_target_")
    for entry in reversed(node.get("defaults") or []):
        if isinstance(entry, str) and entry != "_self_":
            found = _target_of(group, entry, depth + 1)
            if found:
                return found
    return None


def _data_of(experiment: str) -> str | None:
    """The kind of data experiment=<option> trains on (None: it cannot be told)."""
    from hydra.utils import get_class

    train = {k: v for d in (_yaml(".", "train") or {}).get("defaults", []) if isinstance(d, dict)
             for k, v in d.items()}
    option = _experiment_choice(experiment, "data") or train.get("data")
    try:
        data = get_class(str(_target_of("data", str(option))))
    except Exception:
        return None
    return "prompts" if getattr(data, "prompts_only", False) else getattr(data, "task", None)


# Config groups whose option a user picks on the command line (group=option).
CHOICE_GROUPS = ("model", "data", "objective", "trainer", "preset", "optimizer", "callbacks",
                 "checkpoint", "tracking", "experiment", "debug", "hparams_search")
# Choices and keys of earlier versions, when `trainer` held the objective and the run length too
# (issue 55): each answers with the new spelling.
MOVED_CHOICES = {
    "trainer=distill": "objective=distill",
    "trainer=dpo": "objective=dpo",
    "trainer=orpo": "objective=orpo",
    "trainer=quick": "preset=quick (trainer=optimized preset=quick is what it was)",
    "trainer=standard": "preset=standard (trainer=optimized preset=standard is what it was)",
    "trainer=production": "preset=production (trainer=optimized preset=production "
                          "objective.label_smoothing=0.05 is what it was)",
}
MOVED_KEYS = {"trainer.distill.": "objective.", "trainer.preference.": "objective.",
              "trainer.label_smoothing": "objective.label_smoothing"}


# Keys mlxlab reads no more, on a command line or in a config file: what to write instead, and
# why. One ending in "." is a node whose keys moved: `callbacks.checkpoint.keep_last_n` ->
# `checkpoint.keep_last_n`.
RETIRED_KEYS = {
    "trainer.memory_budget_mb": ("trainer.micro_batch=auto", "the largest micro-batch whose step "
                                 "fits trainer.memory_limit; grad_accum follows"),
    "sweep.skip_finished": ("nothing", "a grid run again continues its sweep by itself; "
                            "sweep.fresh=true starts a new one"),
    "callbacks.checkpoint.": ("checkpoint.", "the checkpoint policy is a group of its own"),
}


def check_retired(key: str, value: str | None = None) -> None:
    """One line naming what replaces `key` (as typed: `value`) when RETIRED_KEYS holds it."""
    for old, (new, why) in RETIRED_KEYS.items():
        if old.endswith(".") and f"{key}.".startswith(old):
            moved = (new + key[len(old):]).rstrip(".")
            typed = f"={value}" if value is not None else ""
            raise ConfigError(f"{key} is {moved} now: write {moved}{typed} ({why})")
        if key == old:
            raise ConfigError(f"{key} is retired: write {new} ({why})")


def _check_retired_keys(cfg: DictConfig) -> None:
    """A config file that still sets a key of RETIRED_KEYS is one line, before anything is built."""
    for old in RETIRED_KEYS:
        parent, _, leaf = old.rstrip(".").rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None)
        if OmegaConf.is_dict(node) and leaf in node:
            keys = list(node[leaf]) if OmegaConf.is_dict(node[leaf]) else []
            check_retired(f"{old}{keys[0]}" if old.endswith(".") and keys else old.rstrip("."))


def check_moved(arg: str) -> None:
    """One line naming the new spelling of an old choice or key (MOVED_CHOICES, MOVED_KEYS,
    RETIRED_KEYS)."""
    key, eq, value = arg.lstrip("+~").partition("=")
    check_retired(key, value if eq else None)
    for option in value.removeprefix("[").removesuffix("]").split(","):
        new = MOVED_CHOICES.get(f"{key}={option.strip()}")
        if eq and new:
            raise ConfigError(f"{key}={option.strip()} moved: write {new} (the objective and "
                              "the run's length are groups of their own now)")
    for old, new in MOVED_KEYS.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            raise ConfigError(f"{key} moved: write {new + key[len(old):] if old.endswith('.') else new}"
                              f"{'=' + value if eq else ''} (the objective's settings are the "
                              "`objective` node now: conf/objective/)")


def check_group_choices(argv: list[str]) -> None:
    """`optimizer=adamx` fails here with one line listing the options, not with Hydra's
    multi-line "Could not find 'optimizer/adamx'" report. A user's own config folder
    (`--config-dir ./my_conf`) adds its files to the options."""
    own = _config_dirs(argv)
    for arg in argv:
        check_moved(arg)
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or key not in CHOICE_GROUPS or "(" in value or value in ("null", ""):
            continue
        options = sorted({*group_options(key), *(p.stem for d in own for p in d.glob(f"{key}/*.yaml"))})
        # a multirun sweep (a,b) or a list of options merged into one node ([mlflow,csv])
        listed = value.removeprefix("[").removesuffix("]").split(",")
        unknown = [v.strip() for v in listed if v.strip() not in options]  # Hydra allows "a, b"
        if options and unknown:
            raise ConfigError(f"{key}={unknown[0]} is not an option: choose one of {options} "
                              f"(the files in conf/{key}/)")


def _yaml(group: str, option: str) -> dict | None:
    """conf/<group>/<option>.yaml as a plain mapping (interpolations kept), None when absent."""
    path = Path(config_dir()) / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return node if isinstance(node, dict) else {}


def objective_keys(option: str) -> set[str] | None:
    """The keys `objective=<option>` takes (its file's, with those of the files it extends:
    orpo extends dpo); None for an option conf/objective/ does not hold."""
    node = _yaml("objective", option)
    if node is None:
        return None
    keys = {str(k) for k in node if k != "defaults" and not str(k).startswith("_")}
    for parent in node.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            keys |= objective_keys(parent) or set()
    return keys


def chosen_objective(argv: list[str]) -> str | None:
    """The objective option a command line runs: its objective=, else its experiment's (and
    the experiments that one extends), else conf/train.yaml's; None when it cannot be told (a
    sweep over objectives, a user's own config folder)."""
    if _config_dirs(argv):
        return None
    choices = dict(arg.lstrip("+").split("=", 1) for arg in argv if "=" in arg)
    value = choices.get("objective") or _experiment_objective(choices.get("experiment"))
    value = value or next((d["objective"] for d in (_yaml(".", "train") or {}).get("defaults", [])
                           if isinstance(d, dict) and "objective" in d), None)
    return value if value and "," not in str(value) and "(" not in str(value) else None


def _experiment_objective(name: str | None) -> str | None:
    """The objective an experiment's defaults pick (override /objective: dpo), or one of the
    experiments it extends."""
    return _experiment_choice(name, "objective")


def _experiment_choice(name: str | None, group: str, depth: int = 0) -> str | None:
    """The option of `group` an experiment's defaults pick, or one of the experiments it
    extends picks (None: train.yaml's)."""
    node = _yaml("experiment", name) if name and depth < 8 else None
    for entry in reversed((node or {}).get("defaults") or []):  # the last one says
        if isinstance(entry, dict):
            found = next((v for k, v in entry.items() if str(k).split()[-1].strip("/") ==
                          group), None)
        else:
            found = _experiment_choice(str(entry), group, depth + 1) if entry != "_self_" \
                else None
        if found:
            return str(found)
    return None


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folders Hydra's --config-dir / -cd add to the config search path."""
    dirs = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            dirs.append(Path(value).expanduser())
    return dirs
