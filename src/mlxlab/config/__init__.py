"""The config: composed from conf/ (compose.py), checked once before anything heavy is built
(checks.py, fit.py; options.py reads conf/'s files), its nodes' records (records.py: the one way
a node is checked, for every floor) and what a run keeps of it (provenance.py). Imports nothing
of mlxlab above runtime/."""

from mlxlab.config.checks import Parts, checked_parts, hand_to_run, target_problem, validate
from mlxlab.config.compose import (
    asset_path,
    compose_config,
    config_dir,
    instantiate,
    project_root,
    unwrapped,
)
from mlxlab.config.options import group_options
from mlxlab.config.provenance import config_hash, to_container
from mlxlab.config.records import check_choice, check_fraction, check_number, record, utf8_text
from mlxlab.errors import ConfigError

__all__ = [
    "ConfigError", "Parts", "asset_path", "check_choice", "check_fraction", "check_number",
    "checked_parts", "compose_config", "config_dir", "config_hash", "group_options",
    "hand_to_run", "instantiate", "project_root", "record", "target_problem", "to_container",
    "unwrapped", "utf8_text", "validate",
]
