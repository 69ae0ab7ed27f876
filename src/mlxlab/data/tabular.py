"""Any CSV classification file as text: rows -> template text -> tokens (cached) -> batches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlxlab.data.base import DataModule
from mlxlab.data.batching import (
    Batch,
    Batching,
    EpochPosition,
    collate_classification,
    fixed_batches,
    make_batches,
)
from mlxlab.data.curriculum import Curriculum
from mlxlab.data.numeric import NumericEncoding, fit_bins, row_number_columns
from mlxlab.data.tabular_settings import AUTO_MAX_LENGTH, TabularSettings
from mlxlab.data.tokenizer import PAD_TOKENS, build_tokenizer, find_token_id, tokenizer_hash
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV, naming the path and the override to fix it when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (point data.path= at a CSV file)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path} as CSV: {e} (check data.path=)") from e
    if df.empty:
        raise ConfigError(f"{path} has no data rows (check data.path=)")
    return df


def _check_columns(
    df: pd.DataFrame, columns: Sequence[str], what: str, override: str, source
) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{what} {missing} not in {source}; "
            f"available columns: {list(df.columns)} (set {override})"
        )


def _format_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).strip()


def _column_strings(
    values: pd.Series, missing_value: str, edges: Sequence[float] | None
) -> list[str]:
    """One string per value: "lo-hi" when binned by `edges`, `missing_value` for NaN/blank."""
    out = []
    for v in values.tolist():
        if (
            v is None
            or (isinstance(v, float) and np.isnan(v))
            or (isinstance(v, str) and not v.strip())
        ):
            out.append(missing_value)
        elif edges is not None:
            # Out-of-range values fall into the first/last bin.
            i = int(np.clip(np.searchsorted(edges, float(v), side="right") - 1, 0, len(edges) - 2))
            out.append(f"{_format_value(float(edges[i]))}-{_format_value(float(edges[i + 1]))}")
        else:
            out.append(_format_value(v))
    return out


def template_fields(template: str) -> list[str]:
    """Column names a format string refers to: "class {Pclass}. {Sex}" -> ["Pclass", "Sex"]."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def row_texts(
    df: pd.DataFrame,
    columns: Sequence[str],
    template: str | None = None,
    missing_value: str = "unknown",
    bins: dict[str, Sequence[float]] | None = None,
    numeric: NumericEncoding | None = None,
) -> list[str]:
    """Serialize each row to text.

    With a template (a Python format string over column names) every field is a string, already
    binned and with missing values replaced. Without one: "col: value. col: value. ..." over
    `columns`. A column in `bins` (hand-made edges) is written as its "lo-hi" range; one in the
    learnt `numeric` bins as its bin's words (numeric.py); any other as its value.
    """
    bins = bins or {}
    learnt = numeric.edges if numeric is not None else {}
    used = template_fields(template) if template else list(columns)
    cells = {}
    for c in dict.fromkeys(used):
        if c in learnt and c not in bins:
            cells[c] = numeric.words(c, df[c], missing_value)
        else:
            cells[c] = _column_strings(df[c], missing_value, bins.get(c))
    if template:
        return [template.format(**{c: cells[c][i] for c in cells}) for i in range(len(df))]
    return [". ".join(f"{c}: {cells[c][i]}" for c in used) for i in range(len(df))]


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: each class contributes round(n_class * val_fraction) rows to val.

    Returns sorted (train_idx, val_idx). Benchmarks reuse it so baselines see the same split.
    (`data.val_fraction` is checked by its owner, TabularSettings.)
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[: int(round(len(members) * val_fraction))])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def encode_texts(
    tok, texts: Sequence[str], max_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize to a (N, max_length) int32 matrix padded with `pad_id`, and the true lengths."""
    tok.enable_truncation(max_length)  # keeps [SEP]: the post-processor runs after truncation
    tok.no_padding()  # a given tokenizer.json may pad; padding to buckets happens at collate
    encodings = tok.encode_batch(list(texts))
    tokens = np.full((len(encodings), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(encodings), dtype=np.int32)
    truncated = sum(1 for enc in encodings if enc.overflowing)
    if truncated:
        log.warning(
            "%d of %d texts cut to %d tokens: raise data.max_length",
            truncated,
            len(encodings),
            max_length,
        )
    for i, enc in enumerate(encodings):
        ids = enc.ids
        tokens[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


class TabularText(DataModule):
    """CSV classification data as text (task="classification"), see conf/data/csv.yaml."""

    task = "classification"

    def __init__(self, settings: TabularSettings | None = None, /, **keys: Any) -> None:
        """`settings`, or its fields as keyword arguments (Hydra passes the flat data.* keys)."""
        if settings is not None and keys:
            raise ConfigError(f"give TabularText settings or keys, not both (got {sorted(keys)})")
        self.settings = settings if settings is not None else TabularSettings.from_keys(keys)
        s = self.settings
        self.curriculum = Curriculum.from_config(s.curriculum, s.seed)  # data/curriculum.py
        self.cache_dir = Path(s.cache_dir) if s.cache_dir else None
        self.max_length: int | None = s.max_length  # None until setup() fits the longest row
        self.numeric: NumericEncoding | None = None  # quantile bins learnt by setup()
        self.tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        self.num_labels: int | None = None
        self.label_names: list[str] = []
        self.columns: list[str] = []
        self.cache_hit = False
        self._position = EpochPosition()

    @property
    def path(self) -> str:
        return self.settings.path

    @property
    def label_column(self) -> str:
        return self.settings.label_column

    @property
    def id_column(self) -> str | None:
        return self.settings.id_column

    # ---------------------------------------------------------------- setup
    def _columns(self, df: pd.DataFrame) -> list[str]:
        """What a row's text is built from: the template's fields, the given feature columns, or
        every column but the label, the id and (numeric=bins) row numbers nobody named."""
        s = self.settings
        if s.template:
            columns = list(dict.fromkeys(template_fields(s.template)))
            _check_columns(df, columns, "template columns", "data.template=", s.path)
        elif s.feature_columns is not None:
            columns = list(s.feature_columns)
            _check_columns(df, columns, "feature columns", "data.feature_columns=[...]", s.path)
        else:
            columns = [c for c in df.columns if c not in (s.label_column, s.id_column)]
            if s.numeric == "bins":
                left_out = row_number_columns(df, columns)
                if left_out:
                    log.info("left out of the text: %s (distinct running numbers, one per row); "
                             "list them in data.feature_columns to keep them", left_out)
                columns = [c for c in columns if c not in left_out]
        if s.label_column in columns:
            raise ConfigError(
                f"the text would contain the label column {s.label_column!r}: "
                "remove it from data.template / data.feature_columns"
            )
        _check_columns(df, list(s.bins), "binned columns", "data.bins=", s.path)
        return columns

    def texts(self, df: pd.DataFrame) -> list[str]:
        """The text each row of `df` is serialized to (train, val or a test CSV without labels);
        after setup() or from_encoding_state()."""
        s = self.settings
        _check_columns(df, self.columns, "columns", "data.path=", "the CSV")
        return row_texts(df, self.columns, s.template, s.missing_value, s.bins, self.numeric)

    def setup(self, run_dir: str | Path | None = None) -> None:
        s = self.settings
        df = read_csv(s.path)
        _check_columns(df, [s.label_column], "label column", "data.label_column=", s.path)
        if s.id_column is not None:
            _check_columns(df, [s.id_column], "id column", "data.id_column= (or null)", s.path)
        if df[s.label_column].isna().any():
            n = int(df[s.label_column].isna().sum())
            log.warning("dropping %d rows with no %s", n, s.label_column)
            df = df[df[s.label_column].notna()].reset_index(drop=True)
        values = sorted(df[s.label_column].unique().tolist())
        self._set_labels(values)
        if self.num_labels < 2:
            raise ConfigError(
                f"label column {s.label_column!r} has {self.num_labels} distinct value(s); "
                "need >= 2 (check data.label_column=)"
            )
        labels = df[s.label_column].map({v: i for i, v in enumerate(values)}).to_numpy(np.int32)
        train_idx, val_idx = stratified_split(labels, s.val_fraction, s.split_seed)
        self.columns = self._columns(df)  # a CSV to predict needs these
        if s.numeric == "bins":  # edges from the training rows only: validation rows unseen
            unbinned = [c for c in self.columns if c not in s.bins]
            self.numeric = fit_bins(df, train_idx, unbinned, s.numeric_bins, s.numeric_words)
            if self.numeric.edges:
                log.info("numeric columns in %d quantile bins: %s", s.numeric_bins,
                         list(self.numeric.edges))
        texts = self.texts(df)

        save_to = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
        self.tokenizer = build_tokenizer(
            [texts[i] for i in train_idx], save_to=save_to,
            cache_dir=self.cache_dir / "tokenizers" if self.cache_dir else None, **s.tokenizer
        )
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)  # recorded in checkpoints
        self.pad_id = find_token_id(self.tokenizer, PAD_TOKENS, "padding")

        tokens, lengths = self._tokenize_cached(texts)
        self.examples = texts
        self.train = (tokens[train_idx], lengths[train_idx], labels[train_idx])
        self.val = (tokens[val_idx], lengths[val_idx], labels[val_idx])
        self.train_idx, self.val_idx = train_idx, val_idx
        if self.curriculum is not None:
            self.curriculum.fit([tokens[i, : lengths[i]] for i in train_idx], self.vocab_size)
        log.info(
            "%s: %d train / %d val rows, %d labels, vocab %d, longest %d tokens",
            s.path,
            len(train_idx),
            len(val_idx),
            self.num_labels,
            self.vocab_size,
            lengths.max(),
        )

    def _set_labels(self, values: list) -> None:
        self.label_values = values  # original values, for writing predictions back
        self.label_names = [_format_value(v) for v in values]
        self.num_labels = len(values)

    def encoding_state(self) -> dict:
        """What setup() learnt from the training CSV that encoding new rows and naming predictions
        needs: label values, columns, the numeric bins (edges from the training rows) and the
        row length. Saved in every checkpoint's state.json, so prediction and serving need only
        the run folder (see from_encoding_state)."""
        return {
            "label_values": [v.item() if hasattr(v, "item") else v for v in self.label_values],
            "columns": list(self.columns),
            "pad_id": int(self.pad_id),
            "numeric": self.numeric.state() if self.numeric is not None else None,
            "max_length": self.max_length,
        }

    @classmethod
    def from_encoding_state(cls, settings: dict, tokenizer, state: dict) -> TabularText:
        """A module that encodes rows like the run did (encode_frame, submission) from the run's
        data config, its tokenizer and encoding_state(), without the training CSV. A run saved
        before numeric bins has no "numeric" entry: its numbers stay text, as it trained."""
        data = cls(**settings)
        data.tokenizer, data.tokenizer_hash = tokenizer, tokenizer_hash(tokenizer)
        data.vocab_size, data.pad_id = tokenizer.get_vocab_size(), int(state["pad_id"])
        data.columns = list(state["columns"])
        numeric = state.get("numeric")
        data.numeric = NumericEncoding.from_state(numeric) if numeric else None
        data.max_length = int(state.get("max_length") or data.max_length or AUTO_MAX_LENGTH)
        data._set_labels(list(state["label_values"]))
        return data

    def cache_key(self) -> str:
        """Hash of the file bytes, the tokenizer and everything that changes the token arrays
        (the settings, the columns, the learnt bins)."""
        h = hashlib.sha256(Path(self.path).read_bytes())
        settings = {
            **{k: v for k, v in self.settings.keys().items()
               if k not in ("path", "cache_dir", "curriculum", "val_fraction", "seed", "split_seed")},
            "columns": self.columns,
            "numeric_edges": self.numeric.state() if self.numeric is not None else None,
            "tokenizer": self.tokenizer_hash,
        }
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()[:24]

    def _tokenize_cached(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token arrays of every row, from the cache when the same file and settings were
        tokenized before; max_length=null becomes the longest row (up to AUTO_MAX_LENGTH)."""
        cache = self.cache_dir / "tabular" / f"{self.cache_key()}.npz" if self.cache_dir else None
        self.cache_hit = False
        if cache is not None and cache.is_file():
            with np.load(cache) as f:
                tokens, lengths = f["tokens"], f["lengths"]
            self.cache_hit = len(tokens) == len(texts)
        if self.cache_hit:
            log.info("cache hit: %s", cache)
        else:
            width = self.max_length or AUTO_MAX_LENGTH
            tokens, lengths = encode_texts(self.tokenizer, texts, width, self.pad_id)
            if self.max_length is None:
                tokens = tokens[:, : int(lengths.max())]
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, tokens=tokens, lengths=lengths)
                os.replace(tmp, cache)  # atomic: parallel jobs never read half a file
                log.info("cached tokens: %s", cache)
        self.max_length = int(tokens.shape[1])
        return tokens, lengths

    # -------------------------------------------------------------- batches
    def num_train_batches(self, batching: Batching) -> int:
        return len(make_batches(self.train[1], batching, self.max_length))

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One shuffled epoch (seed + epoch); after load_state_dict it skips the batches done."""
        tokens, lengths, labels = self.train
        rng = np.random.default_rng(self.settings.seed + epoch)
        batches = make_batches(lengths, batching, self.max_length, rng)
        if self.curriculum is not None:
            if batching.dynamic and self.curriculum.active:
                raise ConfigError("data.curriculum draws fixed-size batches: set "
                                  "trainer.batching.dynamic=false or data.curriculum=null")
            batches = self.curriculum.epoch_batches(batches, epoch)
        for index in self._position.remaining(batches, epoch):
            if self.curriculum is not None:
                self.curriculum.observe(tokens[index], tokens[index] != self.pad_id)
            yield collate_classification(tokens, lengths, labels, index, batching.bucket_multiple)

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        return self._in_order(self.val, batching)

    def train_batches_in_order(self, batching: Batching) -> Iterator[Batch]:
        """Every training example once, unshuffled, leaving the training position alone: for
        values computed once per example (distillation's teacher cache)."""
        return self._in_order(self.train, batching)

    def _in_order(self, split: tuple, batching: Batching) -> Iterator[Batch]:
        tokens, lengths, labels = split
        for index in make_batches(lengths, batching, self.max_length):
            yield collate_classification(tokens, lengths, labels, index, batching.bucket_multiple)

    def state_dict(self) -> dict:
        state = self._position.state_dict()
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._position.load_state_dict(state)
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state.get("curriculum"))

    # ------------------------------------------------------------ prediction
    def encode_frame(
        self, df: pd.DataFrame, batch_size: int = 64, bucket_multiple: int = 16
    ) -> Iterator[Batch]:
        """Batches (input_ids, attention_mask; no labels) for the rows of `df`, in row order.

        For a test CSV without the label column; call setup() first (tokenizer, template).
        """
        tokens, lengths = encode_texts(self.tokenizer, self.texts(df), self.max_length, self.pad_id)
        for index in fixed_batches(len(df), batch_size):
            yield collate_classification(tokens, lengths, None, index, bucket_multiple)

    def submission(self, df: pd.DataFrame, predictions: Sequence[int]) -> pd.DataFrame:
        """Kaggle-style frame: id column (if any) and the label column with the original values."""
        out = {}
        if self.id_column is not None:
            _check_columns(
                df, [self.id_column], "id column", "data.id_column=", "the prediction CSV"
            )
            out[self.id_column] = df[self.id_column].to_numpy()
        out[self.label_column] = [self.label_values[int(p)] for p in predictions]
        return pd.DataFrame(out)
