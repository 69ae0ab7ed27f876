"""Composing the config: the resolvers, the conf/ folder, compose_config, and the one
instantiate helper.

Hydra itself is imported inside the functions that compose or instantiate with it: this package
is also imported for its records and facts alone (project_root, record, check_number) by code
that never composes a config, and hydra's import costs ~0.1 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mlxlab.errors import ConfigError, UserError
from mlxlab.runtime import settings

PACKAGE_DIR = Path(__file__).parent.parent  # src/mlxlab (or site-packages/mlxlab)
ASSETS_DIR = PACKAGE_DIR / "assets"


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
    from mlxlab.runtime.cluster.distributed import start_time  # MLX's distributed: when stamping

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
    packaged = PACKAGE_DIR / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(PACKAGE_DIR.resolve().parents[1] / "conf")


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


