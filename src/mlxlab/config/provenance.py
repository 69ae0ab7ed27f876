"""What a run's config says it trains, as the run's records keep it: the resolved config as
plain Python (params, checkpoints) and its hash (the run's identity in a sweep)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf


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


