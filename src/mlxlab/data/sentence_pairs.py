"""Text columns for training embedders (task="embedding"), sentence-transformers' dataset layout:
one jsonl row a training example, its text columns in order: the anchor, the positive, then any
negatives (`anchor`/`positive`/`negative`, `negative_1..n`, or any names: the order counts, as in
sentence-transformers), and optionally a `score` or `label` column (a number, or a list of
numbers: CoSENT's similarity, MarginMSE's margins, DistillKLDiv's teacher scores). Every row has
the same columns; an empty text is refused with its line. The validation pairs are `val_file`,
else the last `val_fraction` of the rows shuffled with split_seed; `eval_dir` adds a BEIR
retrieval set (data/beir.py) that every evaluation scores per query.

Texts are tokenized with the model's tokenizer.json (data.tokenizer.path, set from
model.pretrained) as sentence-transformers tokenizes them: special tokens added, cut at
max_length (null: the folder's sentence_bert_config.json max_seq_length), lower-cased where that
config says do_lower_case. The token ids are cached in `cache_dir`, keyed by the files' bytes
and the tokenizer. A batch holds each text column's `column<c>_input_ids` and
`column<c>_attention_mask` (column_keys) of shape (rows, positions), each column right-padded to
the length bucket of its own longest text (a question is not padded to its document's length, as
sentence-transformers pads each column apart), `column<c>_token_index` (the flat positions of its
real tokens, which an unpadding encoder alone computes), `labels` where the rows carry scores,
and `index`.
Files are read and checked when the module is built, before a run folder exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, normalizers

from mlxlab.config.records import check_fraction, check_number
from mlxlab.data.batching import Batch, bucket_length, real_token_index
from mlxlab.data.beir import RetrievalSet, read_beir
from mlxlab.data.completions import jsonl_lines
from mlxlab.data.fixed_rows import FixedBatchRows
from mlxlab.data.tokenizer import (
    PAD_TOKENS,
    find_token_id,
    json_or_empty,
    tokenizer_hash,
    truncation_length,
)
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

LABEL_KEYS = ("score", "label")  # sentence-transformers' label columns
ST_CONFIG = "sentence_bert_config.json"  # a folder's max_seq_length and do_lower_case


def read_columns(path: str | Path) -> tuple[list[str], list[list[str]], list | None]:
    """(text column names, each row's texts, each row's label or None) of a pairs file."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (set data.train_file= to a jsonl "
                               "of anchor/positive[/negative...] rows)")
    columns: list[str] | None = None
    texts, labels = [], []
    for number, row in jsonl_lines(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object of text columns")
        names = [k for k in row if k not in LABEL_KEYS]
        label_keys = [k for k in row if k in LABEL_KEYS]
        if columns is None:
            columns, first_labels = names, label_keys
            if len(columns) < 2:
                raise ConfigError(f"{where} has text columns {columns}: a row needs an anchor "
                                  "and a positive (anchor, positive[, negative...])")
        if names != columns or label_keys != first_labels:
            raise ConfigError(f"{where} has columns {list(row)}, line 1 has "
                              f"{columns + first_labels}: every row needs the same columns")
        for name in names:
            if not isinstance(row[name], str) or not row[name].strip():
                raise ConfigError(f"{where}: {name!r} is empty; every text of a row must be a "
                                  "non-empty string")
        texts.append([row[name] for name in names])
        if label_keys:
            labels.append(_label(row[label_keys[0]], where))
    if columns is None:
        raise ConfigError(f"{path} holds no rows")
    return columns, texts, labels if first_labels else None


def first_row_columns(path: str | Path) -> tuple[int, bool] | None:
    """(text columns, whether it carries a score) of a pairs file's first row, read alone (an
    objective's check of the config); None when the file or its first row cannot tell."""
    try:
        _, row = next(jsonl_lines(Path(str(path)).expanduser()))
    except (OSError, StopIteration, ConfigError):
        return None
    if not isinstance(row, dict):
        return None
    return sum(k not in LABEL_KEYS for k in row), any(k in LABEL_KEYS for k in row)


def _label(value: Any, where: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool)
                             for v in values):
        raise ConfigError(f"{where}: a score / label is a number or a list of numbers, not "
                          f"{value!r}")
    return [float(v) for v in values]


def column_keys(column: int) -> tuple[str, str]:
    """The batch keys of text column `column`'s token ids and attention mask."""
    return f"column{column}_input_ids", f"column{column}_attention_mask"


def token_index_key(column: int) -> str:
    """The batch key of text column `column`'s real-token positions (real_token_index)."""
    return f"column{column}_token_index"


def text_columns(batch: Batch) -> list[tuple[mx.array, mx.array]]:
    """Each text column's (input_ids, attention_mask) of a batch, in column order."""
    found = []
    while column_keys(len(found))[0] in batch:
        ids, mask = column_keys(len(found))
        found.append((batch[ids], batch[mask]))
    return found


def padded(texts: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, attention mask) of `texts` right-padded to `width` positions."""
    tokens = np.full((len(texts), width), pad_id, np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for r, ids in enumerate(texts):
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, 1
    return tokens, mask


def lower_cases(tokenizer_path: str | Path) -> bool:
    """Whether the sentence-transformers folder holding the tokenizer lower-cases its texts
    (sentence_bert_config.json's do_lower_case)."""
    return bool(json_or_empty(Path(tokenizer_path).parent / ST_CONFIG).get("do_lower_case"))


def folder_pad_id(tokenizer: Tokenizer, tokenizer_path: str | Path) -> int:
    """The pad token the folder's tokenizer_config.json names (a decoder embedder's
    `<|endoftext|>`), else the first of PAD_TOKENS the tokenizer knows."""
    pad = json_or_empty(Path(tokenizer_path).parent / "tokenizer_config.json").get("pad_token")
    pad_id = tokenizer.token_to_id(pad["content"] if isinstance(pad, dict) else pad or "")
    return pad_id if pad_id is not None else find_token_id(tokenizer, PAD_TOKENS, "padding")


def keep_tokenizer_files(tokenizer: Tokenizer, source: str | Path, run_dir: Path) -> None:
    """The tokenizer and its sentence_bert_config.json (the truncation length, lower-casing)
    into the run folder, as the model's folder has them."""
    tokenizer.save(str(run_dir / "tokenizer.json"))
    config = Path(source).parent / ST_CONFIG
    if config.is_file() and not (run_dir / ST_CONFIG).exists():
        shutil.copyfile(config, run_dir / ST_CONFIG)


class Tokens:
    """One split's token ids: every text of every row (rows x columns), as lists of ids."""

    def __init__(self, ids: list[list[np.ndarray]], labels: np.ndarray | None):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)


class SentencePairs(FixedBatchRows):
    """Text columns for an embedding objective (see the module)."""

    task = "embedding"
    num_labels = None

    def __init__(self, train_file: str, val_file: str | None = None, val_fraction: float = 0.1,
                 eval_dir: str | None = None, eval_split: str = "test",
                 max_length: int | None = None, seed: int = 0, split_seed: int | None = None,
                 tokenizer: dict | None = None, cache_dir: str | None = None) -> None:
        super().__init__()
        check_fraction("data.val_fraction", val_fraction)
        if max_length is not None:
            check_number("data.max_length", max_length, int, 2)
        self.train_file, self.val_file, self.path = train_file, val_file, str(train_file)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.split_seed = int(seed if split_seed is None else split_seed)
        self.max_length, self.cache_dir = max_length, cache_dir
        self.tokenizer_path = (tokenizer or {}).get("path")
        # read and checked now: bad rows or qrels fail before anything is created
        self.column_names, rows, labels = read_columns(train_file)
        self._rows = self._split(rows, labels)
        self.retrieval: RetrievalSet | None = read_beir(eval_dir, eval_split) if eval_dir else None
        self.columns, self.has_labels = len(self.column_names), labels is not None
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None

    def _split(self, rows: list, labels: list | None) -> dict[str, tuple[list, list | None]]:
        """{"train": (rows, labels), "val": ...}: val_file's rows, else a held-out share."""
        if self.val_file:
            names, val_rows, val_labels = read_columns(self.val_file)
            if len(names) != len(self.column_names) or (val_labels is None) != (labels is None):
                raise ConfigError(f"{self.val_file} has columns {names}, {self.train_file} has "
                                  f"{self.column_names}: give both files the same columns")
            return {"train": (rows, labels), "val": (val_rows, val_labels)}
        order = np.random.default_rng(self.split_seed).permutation(len(rows))
        n_val = int(round(len(rows) * self.val_fraction))
        if n_val < 1 or n_val >= len(rows):
            raise ConfigError(f"data.val_fraction={self.val_fraction} of {len(rows)} rows holds "
                              f"out {n_val}: give data.val_file= or another fraction")

        def take(index: np.ndarray) -> tuple[list, list | None]:
            return [rows[i] for i in index], None if labels is None else [labels[i] for i in index]

        return {"train": take(order[n_val:]), "val": take(order[:n_val])}

    # ------------------------------------------------------------------ setup
    def setup(self, run_dir: str | Path | None = None) -> None:
        if not self.tokenizer_path:
            raise ConfigError("data=sentence_pairs tokenizes with the model's tokenizer: set "
                              "model.pretrained=<a sentence-transformers folder> (or "
                              "data.tokenizer.path=<its tokenizer.json>)")
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        if run_dir is not None:  # as the folder has them: a resume reads them as this run did
            keep_tokenizer_files(self.tokenizer, self.tokenizer_path, Path(run_dir))
        # sentence-transformers lower-cases before the tokenizer's own normalizer
        if lower_cases(self.tokenizer_path):
            own = self.tokenizer.normalizer
            self.tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Lowercase()] + ([own] if own is not None else []))
        folder = Path(self.tokenizer_path).parent
        self.max_length = int(self.max_length or truncation_length(folder))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = folder_pad_id(self.tokenizer, self.tokenizer_path)
        self.train, self.val = (self._tokens(*self._rows[s]) for s in ("train", "val"))
        if self.retrieval is not None:
            self.query_tokens = self._encode_cached(self.retrieval.queries)
            self.corpus_tokens = self._encode_cached(self.retrieval.corpus)
        log.info("%s: %d train / %d val rows of %d text columns %s%s, max_length %d",
                 self.train_file, len(self.train), len(self.val), self.columns,
                 self.column_names, " with scores" if self.has_labels else "", self.max_length)

    def _tokens(self, rows: list[list[str]], labels: list | None) -> Tokens:
        flat = self._encode_cached([t for row in rows for t in row])
        ids = [flat[i * self.columns:(i + 1) * self.columns] for i in range(len(rows))]
        if labels is not None and len({len(v) for v in labels}) > 1:
            raise ConfigError(f"{self.train_file}: the rows' scores have different lengths "
                              f"({sorted({len(v) for v in labels})}); give each row as many")
        return Tokens(ids, None if labels is None else np.asarray(labels, np.float32))

    def _encode_cached(self, texts: list[str]) -> list[np.ndarray]:
        """Every text's token ids, from the cache when these texts were tokenized before."""
        digest = hashlib.sha256(json.dumps([self.tokenizer_hash, self.max_length]).encode())
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        cache = (Path(self.cache_dir) / "sentence_pairs" / f"{digest.hexdigest()[:24]}.npz"
                 if self.cache_dir else None)
        if cache is not None and cache.is_file():
            with np.load(cache) as f:
                flat, ends = f["ids"], f["ends"]
        else:
            encoded = [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts)]
            flat = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
            ends = np.cumsum([len(e) for e in encoded])
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
                np.savez(tmp, ids=flat, ends=ends)
                os.replace(tmp, cache)  # atomic: parallel jobs never read half a file
        return np.split(flat, ends[:-1]) if len(ends) else []

    # ---------------------------------------------------------------- batches
    def _collate(self, split: Tokens, index: np.ndarray, multiple: int,
                 least: list[int] | None = None) -> Batch:
        batch = {"index": mx.array(np.asarray(index, np.int32))}
        for c in range(self.columns):
            texts = [split.ids[i][c] for i in index]
            width = bucket_length(max(len(ids) for ids in texts), multiple, self.max_length)
            tokens, mask = padded(texts, width, self.pad_id)
            ids_key, mask_key = column_keys(c)
            batch[ids_key], batch[mask_key] = mx.array(tokens), mx.array(mask)
            batch[token_index_key(c)] = mx.array(
                real_token_index(mask, least=least[c] if least else 0))
        if split.labels is not None:
            labels = split.labels[index]
            batch["labels"] = mx.array(labels[:, 0] if labels.shape[1] == 1 else labels)
        return batch

    def _real_tokens(self, split: Tokens, index: np.ndarray) -> list[int]:
        return [sum(len(split.ids[i][c]) for i in index) for c in range(self.columns)]

    def text_batches(self, which: str, batch_size: int
                     ) -> Iterator[tuple[np.ndarray, mx.array, mx.array]]:
        """(positions, input_ids, attention_mask) of the retrieval set's `which` texts (queries |
        corpus): batches of texts of like length, longest first, each padded to its longest
        (sentence-transformers' encode orders them so too), with each text's place in the set."""
        texts = self.query_tokens if which == "queries" else self.corpus_tokens
        order = np.argsort([-len(ids) for ids in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            chunk = order[start:start + batch_size]
            tokens, mask = padded([texts[i] for i in chunk],
                                  max(len(texts[i]) for i in chunk), self.pad_id)
            yield chunk, mx.array(tokens), mx.array(mask)
