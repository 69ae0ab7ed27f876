"""The config a resumed run trains: the checkpoint's own settings with what this command line
names on top, made as a new config (the composed one is left as it is), and written into the
run folder with the run it goes on from. Where the checkpoint comes from is runs/resume.py's."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mlxlab.checkpoint.restore import find_run_checkpoints
from mlxlab.config import Parts, validate
from mlxlab.config.retired import with_moved_targets
from mlxlab.errors import ConfigError
from mlxlab.runs.resume import prepare_resume, remote_resume, resumed_run_folder
from mlxlab.runtime.cluster import slurm
from mlxlab.tracking.run_info import task_overrides
from mlxlab.training.model_ops import newest_state
from mlxlab.training.settings import CheckpointPolicy

log = logging.getLogger(__name__)


def resolve_resume(cfg: DictConfig, run_dir: Path, policy: CheckpointPolicy,
                   requeue: bool = False) -> tuple[Path | None, DictConfig]:
    """The run's resume source and the config it trains: `resume=` (local, remote, auto;
    `requeue`: a requeued Slurm job resumes by itself) found, and a new config made of the
    checkpoint's settings with this command line's named keys on top (resumed_config). None
    and `cfg` itself for a fresh run; `cfg` is never changed."""
    if requeue and not cfg.get("resume") and slurm.restarted():
        log.info("trainer.requeue: a requeued Slurm job: resume=auto")
        cfg = copy.deepcopy(cfg)
        cfg.resume = "auto"
    resume = remote_resume(cfg.get("resume"), run_dir, policy, lambda: prepare_resume(cfg, run_dir))
    if resume is None:
        return None, cfg
    return resume, resumed_config(cfg, resume, task_overrides())


def validate_resumed(cfg: DictConfig, source: Path, parts: Parts) -> Parts:
    """The resumed config checked as the composed one was (into `parts`); one that does not
    build with this version (a checkpoint written by an older mlxlab) is refused in one line."""
    try:
        return validate(cfg, parts)
    except ConfigError as err:
        raise ConfigError(f"resume={source}: {err} (the checkpoint's settings with this command "
                          "line on top; a checkpoint written by an older mlxlab may not build "
                          "with this one: start a new run)") from None


# What a run trained: a resume rebuilds these from the checkpoint's resolved config, and takes
# from this command line only what the user names on it (`model.num_layers=4`, `data=csv`, ...).
TRAINED = ("model", "data", "objective", "trainer", "optimizer", "seed")
# ...except what describes this launch rather than the run: these stay as composed now.
LAUNCH_KEYS = ("trainer.distributed", "data.cache_dir", "data.tokenizer.path")
# Choices that set keys across groups (`# @package _global_`): naming one the run was not trained
# with asks for the run as that file composes it today. Naming the trained one again is no
# change (a preset's task_name is where resume=auto looks: `experiment=X resume=auto`).
GLOBAL_CHOICES = ("experiment", "preset", "debug", "hparams_search")


def resumed_config(cfg: DictConfig, source: Path, overrides: list[str]) -> DictConfig:
    """A new config: the resumed checkpoint's own settings (TRAINED) with `overrides`, the
    user's command line, on top; a `_target_` whose module has moved since the checkpoint was
    written names it where it is now. A checkpoint without a config (written before it carried
    one) gives `cfg` as composed, and so does a preset named anew (GLOBAL_CHOICES)."""
    state = newest_state(find_run_checkpoints(source))
    saved = with_moved_targets((state.config if state is not None else None) or {})
    if not all(k in saved for k in TRAINED):
        log.warning("resume: %s holds no run config; the model and data are built from this "
                    "command line", source)
        return cfg
    named = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    presets = changed_presets([k for k in named if k in GLOBAL_CHOICES], source,
                              Path(cfg.paths.output_dir))
    if presets:
        log.info("resume: %s named: the run is built from this command line, not the checkpoint",
                 presets[0])
        return cfg
    base = OmegaConf.create({k: _with_new_keys(cfg, k, saved[k]) for k in TRAINED})
    _keep_interpolations(cfg, base, OmegaConf.create(saved))
    trained = [k for k in named if k.split(".", 1)[0] in TRAINED]
    for key in [*LAUNCH_KEYS, *trained]:
        _copy_key(cfg, base, key)
    resumed = copy.deepcopy(cfg)
    with open_dict(resumed):
        for key in TRAINED:
            resumed[key] = base[key]
    if trained:
        log.info("resume: the checkpoint's settings, with %s from the command line",
                 ", ".join(trained))
    return resumed


def record_resume(cfg: DictConfig, run_dir: Path, source: Path) -> None:
    """Make the run folder say what this resumed run trains. Hydra wrote .hydra/config.yaml from
    this command line's composition before the run began; `cfg` (resumed_config) is the
    checkpoint's settings with the command line's on top (a 3-layer run resumed with
    `resume=auto` trains 3 layers whatever today's default is). That is written over it, and
    .hydra/resumed_from.yaml names the run this one goes on from."""
    hydra_dir = run_dir / ".hydra"
    if not hydra_dir.is_dir():  # not launched through Hydra's app (train(cfg) from a script)
        return
    record = {"run_dir": str(resumed_run_folder(source)), "source": str(Path(source).resolve()),
              "resume": str(cfg.get("resume"))}
    for name, text in (("config.yaml", OmegaConf.to_yaml(cfg)),
                       ("resumed_from.yaml", OmegaConf.to_yaml(record))):
        staged = hydra_dir / f".{name}.{os.getpid()}"
        staged.write_text(text)
        os.replace(staged, hydra_dir / name)  # ranks sharing the folder write the same text


def changed_presets(presets: list[str], source: Path, this_run: Path) -> list[str]:
    """Of the GLOBAL_CHOICES named now, those whose option differs from the one the resumed run
    was launched with (its run folder's .hydra/hydra.yaml); all of them when that is unknown: a
    checkpoint without its run folder, or this launch's own folder, whose .hydra Hydra rewrote."""
    if not presets:
        return []
    folder = resumed_run_folder(source)
    if (not (folder / ".hydra" / "hydra.yaml").is_file() or folder == this_run.resolve()
            or not HydraConfig.initialized()):
        return presets
    trained = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.runtime.choices
    now = HydraConfig.get().runtime.choices
    return [k for k in presets if trained.get(k) != now.get(k)]


def _with_new_keys(cfg: DictConfig, group: str, saved: Any) -> Any:
    """The checkpoint's node for `group`, plus today's defaults for keys added since it was
    written (when it builds the same class: another class's keys would not fit)."""
    now = cfg.get(group)
    if not isinstance(saved, dict) or not isinstance(now, DictConfig):
        return saved
    if saved.get("_target_") != now.get("_target_"):
        return saved
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.to_container(now), saved))


def _copy_key(src: DictConfig, dst: DictConfig, key: str) -> None:
    """dst[key] = src[key] (a whole node for `model`, a leaf for `model.num_layers`); removed
    from dst when src no longer has it (`~key`)."""
    parent, _, leaf = key.rpartition(".")
    if OmegaConf.select(src, key, default=_MISSING) is _MISSING:
        node = OmegaConf.select(dst, parent) if parent else dst
        if isinstance(node, DictConfig) and leaf in node:
            with open_dict(node):
                node.pop(leaf)
        return
    value = OmegaConf.select(src, key)
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=False)
    with open_dict(dst):
        OmegaConf.update(dst, key, value, merge=False, force_add=True)


_MISSING = object()


def _keep_interpolations(cfg: DictConfig, base: DictConfig, saved: DictConfig) -> None:
    """The checkpoint's config is resolved: `data.seed: ${seed}` came back as 42. Where today's
    config links a key to another and the checkpoint's value is what that link gave then, keep
    the link, so that `seed=7` on the resume moves data.seed with it."""
    links = [found for group in TRAINED if isinstance(cfg.get(group), DictConfig)
             for found in _links(cfg[group], f"{group}.")]
    links += [(k, cfg._get_node(k)._value()) for k in TRAINED
              if k in cfg and OmegaConf.is_interpolation(cfg, k)]
    for key, link in links:
        if OmegaConf.select(saved, key) is None:
            continue
        probe = saved.copy()
        with open_dict(probe):
            OmegaConf.update(probe, key, link, merge=False, force_add=True)
        try:
            then = OmegaConf.select(probe, key, throw_on_resolution_failure=True)
        except Exception:  # noqa: BLE001 (a link to a key the old config lacks)
            continue
        if then == OmegaConf.select(saved, key):
            with open_dict(base):
                OmegaConf.update(base, key, link, merge=False)


def _links(node: DictConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, "${...}") of every interpolated leaf under `node`."""
    found = []
    for key in node:
        dotted = f"{prefix}{key}"
        if OmegaConf.is_interpolation(node, key):
            found.append((dotted, node._get_node(key)._value()))
        elif isinstance(node._get_node(key), DictConfig) and node[key] is not None:
            found += _links(node[key], f"{dotted}.")
    return found
