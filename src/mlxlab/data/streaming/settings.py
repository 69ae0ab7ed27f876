"""The grouped settings of `data=streaming` built from their config nodes, and the flat layout
runs saved before the settings were grouped.

Hydra hands each group (`data.source`, `data.splits`, `data.packing`, `data.vocab_remap`) over
as a plain dict; `settings` makes the group's dataclass of it. Runs trained before the grouping
keep a flat `data` node (`data.seq_len`, `data.val_examples`, ...) in their checkpoints;
`regroup_flat_config` gives such a node today's layout, so they still load for eval and export.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from mlxlab.config.records import record

S = TypeVar("S")

# flat key of the old layout -> (group, key in the group)
FLAT_KEYS = {
    "dataset_id": ("source", "dataset_id"),
    "dataset_config": ("source", "dataset_config"),
    "split": ("source", "split"),
    "data_files": ("source", "data_files"),
    "text_column": ("source", "text_column"),
    "sample_by": ("source", "sample_by"),
    "encoding": ("source", "encoding"),
    "val_split": ("splits", "val_split"),
    "val_examples": ("splits", "val_examples"),
    "max_examples": ("splits", "max_examples"),
    "seq_len": ("packing", "seq_len"),
    "stride": ("packing", "stride"),
    "tokenize_batch": ("packing", "tokenize_batch"),
    "vocab_remap": ("vocab_remap", "mode"),
    "vocab_remap_k": ("vocab_remap", "k"),
}


def settings(kind: type[S], value: S | Mapping[str, Any] | None, group: str) -> S:
    """The `data.<group>` settings: `value` itself when it is one, the record built from a
    mapping of its fields (validation.record: a key it does not have is one ConfigError naming
    it and the keys the group takes), or its defaults for None."""
    return record(kind, {} if value is None else value, f"data.{group}")


def regroup_flat_config(node: Mapping[str, Any]) -> dict[str, Any]:
    """A `data=streaming` node with the old flat keys (a run saved before the grouping, or a
    script's flat arguments) in today's layout; a node without them, or of another data module
    (another `_target_`), comes back as it was."""
    out = dict(node)
    if not str(out.get("_target_", "StreamingText")).endswith("StreamingText"):
        return out
    for key, (group, name) in FLAT_KEYS.items():
        if key not in out or (key == "vocab_remap" and isinstance(out[key], Mapping)):
            continue  # vocab_remap is both a flat key (a mode) and today's group (a mapping)
        value = out.pop(key)
        out[group] = {**dict(out.get(group) or {}), name: value}
    return out
