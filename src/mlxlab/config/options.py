"""The options conf/ holds, read from its yaml files without composing: a group's options, an
option's keys and class, the option an experiment picks for a group."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from mlxlab.config.compose import config_dir


def group_options(group: str) -> list[str]:
    """The options of a config group: the yaml files in conf/<group>/."""
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def conf_yaml(group: str, option: str) -> dict | None:
    """conf/<group>/<option>.yaml as a plain mapping (interpolations kept), None when absent."""
    path = Path(config_dir()) / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return node if isinstance(node, dict) else {}


def objective_keys(option: str) -> set[str] | None:
    """The keys `objective=<option>` takes (its file's, with those of the files it extends:
    orpo extends dpo); None for an option conf/objective/ does not hold."""
    node = conf_yaml("objective", option)
    if node is None:
        return None
    keys = {str(k) for k in node if k != "defaults" and not str(k).startswith("_")}
    for parent in node.get("defaults") or []:
        if isinstance(parent, str) and parent != "_self_":
            keys |= objective_keys(parent) or set()
    return keys


def target_of(group: str, option: str, depth: int = 0) -> str | None:
    """conf/<group>/<option>.yaml's _target_, or that of the option it extends (chat: completions)."""
    node = conf_yaml(group, option) if depth < 8 else None
    if not node or node.get("_target_"):
        return (node or {}).get("_target_")
    for entry in reversed(node.get("defaults") or []):
        if isinstance(entry, str) and entry != "_self_":
            found = target_of(group, entry, depth + 1)
            if found:
                return found
    return None


def experiment_choice(name: str | None, group: str, depth: int = 0) -> str | None:
    """The option of `group` an experiment's defaults pick, or one of the experiments it
    extends picks (None: train.yaml's)."""
    node = conf_yaml("experiment", name) if name and depth < 8 else None
    for entry in reversed((node or {}).get("defaults") or []):  # the last one says
        if isinstance(entry, dict):
            found = next((v for k, v in entry.items() if str(k).split()[-1].strip("/") ==
                          group), None)
        else:
            found = experiment_choice(str(entry), group, depth + 1) if entry != "_self_" \
                else None
        if found:
            return str(found)
    return None


