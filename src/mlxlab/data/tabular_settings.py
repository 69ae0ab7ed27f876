"""The settings of `data=csv` (conf/data/csv.yaml), one field per `data.*` key, checked once.

The keys stay flat on the command line (`data.path=`, `data.label_column=`, `data.bins=`, ...),
as the README and every saved run have them; TabularText takes them as this one frozen record
(mlx-lm's TrainingArgs style) instead of fifteen constructor arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mlxlab.config.records import check_fraction, check_number, record
from mlxlab.data.numeric import MODES, WORDINGS
from mlxlab.errors import ConfigError

AUTO_MAX_LENGTH = 512  # max_length=null fits the longest row up to this (BERT's position table)


@dataclass(frozen=True)
class TabularSettings:
    path: str                                   # the CSV file
    label_column: str                           # the column to predict
    feature_columns: tuple[str, ...] | None = None  # None = every column but label and id
    id_column: str | None = None                # kept out of the text; written back by predict
    template: str | None = None                 # a format string over column names
    missing_value: str = "unknown"              # what a blank/NaN cell becomes
    bins: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # hand-made edges
    numeric: str = "bins"                       # bins: quantile bin words | text: as written
    numeric_bins: int = 16                      # quantile bins per numeric column
    numeric_words: str = "q"                    # how a bin is written (numeric.WORDINGS)
    val_fraction: float = 0.2                   # seeded, stratified by label
    seed: int = 0                               # the batch order
    split_seed: int | None = None               # the train/validation split; None = seed
    max_length: int | None = None               # tokens per row; None = the longest row
    tokenizer: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None                # tokenized arrays, keyed by file and settings
    curriculum: Mapping[str, Any] | None = None  # data/curriculum.py; None = off

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("path", str(self.path))
        if self.feature_columns is not None:
            put("feature_columns", tuple(self.feature_columns))
        put("bins", {str(c): tuple(float(x) for x in e) for c, e in (self.bins or {}).items()})
        for column, edges in self.bins.items():
            if len(edges) < 2 or sorted(edges) != list(edges):
                raise ConfigError(
                    f"data.bins.{column} must be >= 2 increasing edges, got {list(edges)}")
        if self.numeric not in MODES:
            raise ConfigError(f"data.numeric={self.numeric!r}: use one of {list(MODES)}")
        if self.numeric_words not in WORDINGS:
            raise ConfigError(
                f"data.numeric_words={self.numeric_words!r}: use one of {list(WORDINGS)}")
        check_number("data.numeric_bins", self.numeric_bins, int)
        if int(self.numeric_bins) < 2:
            raise ConfigError(f"data.numeric_bins must be an integer >= 2, got {self.numeric_bins!r}")
        put("numeric_bins", int(self.numeric_bins))
        check_fraction("data.val_fraction", self.val_fraction)
        put("val_fraction", float(self.val_fraction))
        put("seed", int(self.seed))
        # A fixed split seed scores every seed's run on the same rows (paired comparisons);
        # split_seed=null splits by `seed`.
        put("split_seed", int(self.seed if self.split_seed is None else self.split_seed))
        if self.max_length is not None:
            check_number("data.max_length", self.max_length, int)
            if int(self.max_length) < 3:
                raise ConfigError(f"data.max_length must be an integer >= 3 ([CLS], a token, "
                                  f"[SEP]) or null, got {self.max_length!r}")
            put("max_length", int(self.max_length))
        put("tokenizer", {"kind": "wordpiece", **dict(self.tokenizer or {})})

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any]) -> TabularSettings:
        """From the flat `data.*` keys (Hydra's node, a saved run's config); `_`-keys such as
        `_target_` are Hydra's and skipped. An unknown key is one line naming the known ones."""
        missing = [k for k in ("path", "label_column") if keys.get(k) is None]
        if missing:
            raise ConfigError(f"data=csv needs {', '.join('data.' + k for k in missing)} "
                              "(e.g. data.path=my.csv data.label_column=target)")
        return record(cls, keys, "data", owner="data=csv")

    def keys(self) -> dict[str, Any]:
        """The settings as flat JSON-able keys (the cache key hashes these)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["feature_columns"] = (
            list(self.feature_columns) if self.feature_columns is not None else None)
        out["bins"] = {c: list(e) for c, e in self.bins.items()}
        out["tokenizer"] = dict(self.tokenizer)
        return out
