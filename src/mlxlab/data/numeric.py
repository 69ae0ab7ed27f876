"""Numeric CSV columns for a text model trained from scratch: which columns are numbers, and the
ordinal bin words they are written as (`data.numeric`).

A small BERT trained on a few hundred rows cannot read "length: 39.1." as a number: the
tokenizer splits it into "39", ".", "1" and the model sees unrelated tokens. So by default a
numeric column is cut into quantile bins learnt from the training rows, and each value is written
as its bin's words (see WORDINGS). What counts as numeric, decided once per column from the
training file (column kinds use no labels, so reading them from every row leaks nothing; bin
edges use the training rows only):

- every non-blank cell parses as a finite number (ints, floats, numeric strings; blanks and NaN
  are missing values and become data.missing_value) and the column is not boolean;
- at most MAX_EXACT_VALUES distinct values: a count or a code (Pclass, SibSp): written as the
  value itself, as with data.numeric=text (binning could only merge values);
- distinct integers 0..n-1 or 1..n in some order, one per row (a row number or running id
  nobody named data.id_column): left out of the text, it says nothing about the label; name it
  in data.feature_columns to keep it (then it is binned);
- anything else is binned.

The fitted encoding (the edges per column) is part of the run's encoding_state, so predict, eval
and serve write new rows exactly as training did, without the training file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mlxlab.errors import ConfigError

MAX_EXACT_VALUES = 10  # a column with at most this many distinct numbers is written as is


def _tree_words(index: int, count: int) -> str:
    """The bin's path in the binary tree of quantile splits: "lo hi hi" = below the median, above
    the lower quartile, ... Adjacent bins share their leading words."""
    depth = max(1, int(np.ceil(np.log2(max(count, 2)))))
    return " ".join("hi" if index >> (depth - 1 - level) & 1 else "lo" for level in range(depth))


# How bin k (0-based) of a column with `count` bins is written.
WORDINGS = {
    "q": lambda index, count: f"q{index + 1}",     # one word per bin: q1 .. q<bins>
    "tree": _tree_words,                            # log2(bins) words shared by adjacent bins
}
MODES = ("bins", "text")


def numeric_values(values: pd.Series) -> np.ndarray | None:
    """The column as floats (NaN where blank or missing) when every other cell is a finite
    number; None for a text or boolean column, or one with no values at all."""
    if pd.api.types.is_bool_dtype(values) or values.isna().all():
        return None
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(dtype=float)
    else:
        cells = values.astype("string").str.strip()
        blank = cells.isna() | (cells == "")
        numbers = pd.to_numeric(cells.mask(blank), errors="coerce").to_numpy(dtype=float)
        if np.isnan(numbers[~blank.to_numpy()]).any():
            return None  # some non-blank cell is not a number
        if blank.all():
            return None
    given = numbers[~np.isnan(numbers)]
    return numbers if np.isfinite(given).all() else None


def is_row_number(numbers: np.ndarray) -> bool:
    """Distinct integers 0..n-1 or 1..n, one per row, none missing: a row number or running id."""
    if len(numbers) <= MAX_EXACT_VALUES or np.isnan(numbers).any():
        return False
    if not (numbers == np.round(numbers)).all() or len(np.unique(numbers)) != len(numbers):
        return False
    return numbers.min() in (0, 1) and numbers.max() - numbers.min() == len(numbers) - 1


def quantile_edges(numbers: np.ndarray, bins: int) -> list[float]:
    """Increasing edges cutting the non-missing values into `bins` equal-count bins; tied
    quantiles merge, so a skewed column may get fewer."""
    given = numbers[~np.isnan(numbers)]
    if len(given) == 0:
        return []
    return [float(e) for e in np.unique(np.quantile(given, np.linspace(0.0, 1.0, bins + 1)))]


@dataclass(frozen=True)
class NumericEncoding:
    """The learnt bins of a run: column -> edges (from the training rows), and how bins are
    written. Columns not in `edges` are written as they are."""

    edges: Mapping[str, Sequence[float]] = field(default_factory=dict)
    wording: str = "q"

    def __post_init__(self) -> None:
        if self.wording not in WORDINGS:
            raise ConfigError(f"data.numeric_words={self.wording!r}: use one of {list(WORDINGS)}")

    def words(self, column: str, values: pd.Series, missing_value: str) -> list[str]:
        """One string per cell of `column`: its bin's words, or `missing_value` for a blank or
        NaN cell. Values outside the training range fall into the first or last bin."""
        edges = np.asarray(self.edges[column], dtype=float)
        numbers = numeric_values(values)
        if numbers is None:
            bad = [v for v in values if _not_a_number(v)][:3]
            if bad:
                raise ConfigError(f"column {column!r} was numeric in training but has {bad}: "
                                  "give numbers (or blanks for missing values) in that column")
            numbers = np.full(len(values), np.nan)  # every cell missing
        count = max(len(edges) - 1, 1)
        index = np.searchsorted(edges[1:-1], numbers, side="right")
        write = WORDINGS[self.wording]
        return [missing_value if np.isnan(x) else write(int(k), count)
                for x, k in zip(numbers, index)]

    def state(self) -> dict:
        return {"edges": {c: list(e) for c, e in self.edges.items()}, "wording": self.wording}

    @classmethod
    def from_state(cls, state: Mapping) -> NumericEncoding:
        return cls({c: [float(x) for x in e] for c, e in state["edges"].items()},
                   str(state["wording"]))


def _not_a_number(value) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    text = str(value).strip()
    return bool(text) and numeric_values(pd.Series([text])) is None


def row_number_columns(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns among `columns` that are row numbers (see is_row_number)."""
    out = []
    for column in columns:
        numbers = numeric_values(df[column])
        if numbers is not None and is_row_number(numbers):
            out.append(column)
    return out


def fit_bins(
    df: pd.DataFrame, train_rows: np.ndarray, columns: Sequence[str], bins: int, wording: str
) -> NumericEncoding:
    """Quantile edges for the numeric columns among `columns` with more than MAX_EXACT_VALUES
    distinct values in the file, each computed on the training rows only."""
    edges = {}
    for column in columns:
        numbers = numeric_values(df[column])
        if numbers is None:
            continue
        given = numbers[~np.isnan(numbers)]
        if len(np.unique(given)) <= MAX_EXACT_VALUES:
            continue
        column_edges = quantile_edges(numbers[train_rows], bins)
        if len(column_edges) >= 2:
            edges[column] = column_edges
    return NumericEncoding(edges, wording)
