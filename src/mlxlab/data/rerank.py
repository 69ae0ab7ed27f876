"""Reranker training rows from jsonl: (query, passage, label) pairs or (query, [passages],
[labels]) lists, each pair tokenized as the model's tokenizer pairs two texts.

    {"query": "what are pandas?", "passage": "Pandas are bears.", "label": 1}       rerank_pairs
    {"query": "what are pandas?", "passages": ["...", "..."], "labels": [1, 0]}     rerank_lists

A pair is `tokenizer.encode(query, passage)`: [CLS] query [SEP] passage [SEP] with token types 0
then 1 (the tokenizer's own pair template), cut longest-first to the truncation length, as
sentence-transformers' CrossEncoder tokenizes it (transformers' `truncation=True`). That length
is data.max_length, else the model folder's (sentence_bert_config.json's max_seq_length, else
tokenizer_config.json's model_max_length), never above its config.json's max_position_embeddings.
A pair batch holds input_ids, attention_mask and token_type_ids (B, T), float `labels` (B,) and
`index`; a list batch the same arrays as (B, K, T) and labels (B, K), K the longest list of the
file, and `doc_mask` (B, K): 1 for a passage, 0 for the padding of a shorter list. Rows are read
and checked when the module is built (config validation): a row without its label, labels that
are not numbers or a list whose labels do not match its passages is one line naming file:line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxlab.config.records import check_fraction, check_number
from mlxlab.data.batching import Batch, bucket_length, real_token_index
from mlxlab.data.completions import jsonl_lines
from mlxlab.data.fixed_rows import FixedBatchRows
from mlxlab.data.tokenizer import json_or_empty, tokenizer_hash, truncation_length
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

KEYS = {"query": "query", "passage": "passage", "label": "label", "passages": "passages",
        "labels": "labels"}


def pair_tokenizer(tokenizer_json: str | Path, max_length: int | None = None) -> Tokenizer:
    """The folder's tokenizer.json cutting pairs longest-first at truncation_length, without
    padding (batches pad to their bucket)."""
    path = Path(tokenizer_json)
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: a reranker's folder has its fast tokenizer's "
                               "tokenizer.json (save the model again with transformers)")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(truncation_length(path.parent, max_length), strategy="longest_first")
    return tok


def encode_pairs(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[Any]:
    """The tokenizers Encodings of (query, passage) pairs (ids, type_ids)."""
    return tok.encode_batch([(q, p) for q, p in pairs])


def pad_encodings(encodings: list[Any], pad_id: int, width: int) -> tuple[np.ndarray, ...]:
    """(input_ids, attention_mask, token_type_ids) int32 arrays of (len(encodings), width)."""
    ids = np.full((len(encodings), width), pad_id, np.int32)
    mask = np.zeros((len(encodings), width), np.int32)
    types = np.zeros((len(encodings), width), np.int32)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids, 1, e.type_ids
    return ids, mask, types


def _label(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key!r} must be a number (1 relevant, 0 not, or a score), "
                          f"not {value!r}")
    return float(value)


def read_rerank_rows(path: str | Path, keys: dict[str, str], form: str) -> list[tuple]:
    """(query, passage, label) rows (form "pairs") or (query, passages, labels) rows ("lists")
    of a jsonl file; a row without what its form needs is one line naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (set data.train_file= to a jsonl of "
                               f"{keys['query']!r} rows)")
    need = ("query", "passage", "label") if form == "pairs" else ("query", "passages", "labels")
    rows = []
    for number, row in jsonl_lines(path):
        where = f"{path}:{number}"
        missing = [keys[k] for k in need if not isinstance(row, dict) or keys[k] not in row]
        if missing:
            raise ConfigError(f"{where} has no {', '.join(map(repr, missing))}: each "
                              f"rerank_{form} row needs {', '.join(repr(keys[k]) for k in need)} "
                              "(data.keys renames them)")
        query, texts, labels = (row[keys[k]] for k in need)
        if form == "pairs":
            rows.append((str(query), str(texts), _label(labels, where, keys["label"])))
            continue
        if not isinstance(texts, list) or not isinstance(labels, list) or not texts \
                or len(texts) != len(labels):
            raise ConfigError(f"{where}: {keys['passages']!r} and {keys['labels']!r} must be "
                              "lists of the same, non-zero length")
        rows.append((str(query), [str(t) for t in texts],
                     [_label(v, where, keys["labels"]) for v in labels]))
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


class RerankRows(FixedBatchRows):
    """Pairs or lists for a cross-encoder (the module docstring), as its subclasses' `form`
    says; `train_file`, `val_file` (else the last `val_fraction` of the shuffled rows,
    split_seed); `tokenizer.path` is model.pretrained's tokenizer.json (set by the run)."""

    num_labels = 1  # one relevance score a pair
    form = "pairs"
    task = "rerank_pairs"

    def __init__(self, train_file: str, val_file: str | None = None,
                 val_fraction: float = 0.1, keys: dict | None = None,
                 max_length: int | None = None, seed: int = 0, split_seed: int | None = None,
                 tokenizer: dict | None = None):
        super().__init__()
        check_fraction("data.val_fraction", val_fraction)
        if max_length is not None:
            check_number("data.max_length", max_length, int, 4)
        form = self.form
        self.keys = {**KEYS, **dict(keys or {})}
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.max_length, self.seed = max_length, int(seed)
        self.split_seed = int(seed if split_seed is None else split_seed)
        self.tokenizer_path = (tokenizer or {}).get("path")
        # read and checked now: a bad row is refused before the run folder exists
        self.rows = read_rerank_rows(train_file, self.keys, form)
        self.val_rows = read_rerank_rows(val_file, self.keys, form) if val_file else None
        self.path = str(train_file)
        self.tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None

    def setup(self, run_dir: str | Path | None = None) -> None:
        if not self.tokenizer_path:
            raise ConfigError("rerank data is tokenized by the model's tokenizer: set "
                              "model.pretrained=<cross-encoder folder> (or data.tokenizer.path=)")
        self.tokenizer = pair_tokenizer(self.tokenizer_path, self.max_length)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        pad = self.tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        train, val = self._split()
        self.train, self.val = self._encode(train), self._encode(val)
        # every list batch is padded to the file's longest list: one shape for the step
        self.max_docs = max(len(encodings) for encodings, _ in self.train + self.val)
        self.examples = [json.dumps(r) for r in train]
        self.train_idx = np.arange(len(train))
        if run_dir is not None:
            self._write_tokenizer(Path(run_dir))
        log.info("%s: %d %s rows train / %d val, pairs cut at %d tokens", self.train_file,
                 len(train), self.form, len(val), self.tokenizer.truncation["max_length"])

    def _write_tokenizer(self, run_dir: Path) -> None:
        """tokenizer.json and a tokenizer_config.json whose model_max_length is the truncation
        trained with, so an export's CrossEncoder cuts pairs where training did."""
        source = Path(self.tokenizer_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tokenizer.json").write_bytes(source.read_bytes())
        settings = json_or_empty(source.parent / "tokenizer_config.json")
        # transformers hands token types to the model only for a tokenizer class that makes
        # them (BertTokenizer's); a folder without a config gets BERT's
        settings.setdefault("tokenizer_class", "BertTokenizer")
        for key, token in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
                           ("unk_token", "[UNK]"), ("mask_token", "[MASK]")):
            if self.tokenizer.token_to_id(token) is not None:
                settings.setdefault(key, token)
        settings["model_max_length"] = self.tokenizer.truncation["max_length"]
        (run_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")

    def _split(self) -> tuple[list, list]:
        if self.val_rows is not None:
            return self.rows, self.val_rows
        order = np.random.default_rng(self.split_seed).permutation(len(self.rows))
        n_val = int(round(len(self.rows) * self.val_fraction))
        if n_val >= len(self.rows):
            raise ConfigError(f"data.val_fraction={self.val_fraction} leaves no training rows")
        return [self.rows[i] for i in order[n_val:]], [self.rows[i] for i in order[:n_val]]

    def _encode(self, rows: list[tuple]) -> list[tuple[list[Any], np.ndarray]]:
        """Each row's pair encodings and labels (one pair a pairs row)."""
        out = []
        for query, texts, labels in rows:
            texts, labels = ([texts], [labels]) if self.form == "pairs" else (texts, labels)
            out.append((encode_pairs(self.tokenizer, [(query, t) for t in texts]),
                        np.asarray(labels, np.float32)))
        return out

    def encoding_state(self) -> dict[str, Any]:
        """A reranker's one output, named as transformers names a lone label."""
        return {"label_values": ["LABEL_0"]}

    def _real_tokens(self, split: list, index: np.ndarray) -> list[int]:
        """The pairs' tokens, and a list's padding passages' one token each."""
        rows = [split[i] for i in index]
        padding = (self.max_docs * len(rows) - sum(len(e) for e, _ in rows)
                   if self.form == "lists" else 0)
        return [sum(len(e.ids) for encodings, _ in rows for e in encodings) + padding]

    def _collate(self, split: list, index: np.ndarray, multiple: int,
                 least: list[int] | None = None) -> Batch:
        rows = [split[i] for i in index]
        docs = self.max_docs
        longest = max(len(e.ids) for encodings, _ in rows for e in encodings)
        width = bucket_length(longest, multiple, self.tokenizer.truncation["max_length"])
        shape = (len(rows), docs, width)
        ids, mask, types = (np.zeros(shape, np.int32) for _ in range(3))
        ids[:] = self.pad_id
        mask[:, :, 0] = 1  # a padding passage attends to one token (its loss weight is 0)
        labels, doc_mask = np.zeros(shape[:2], np.float32), np.zeros(shape[:2], np.float32)
        for r, (encodings, values) in enumerate(rows):
            ids[r, :len(encodings)], mask[r, :len(encodings)], types[r, :len(encodings)] = \
                pad_encodings(encodings, self.pad_id, width)
            labels[r, :len(values)], doc_mask[r, :len(values)] = values, 1.0
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                 "labels": labels}
        if self.form == "pairs":
            batch = {k: v[:, 0] for k, v in batch.items()}
        else:
            batch["doc_mask"] = doc_mask
        batch["index"] = index.astype(np.int32)
        # the real tokens of the pairs, flattened as the model reads them
        # (models/layers/unpadding.py)
        batch["token_index"] = real_token_index(batch["attention_mask"],
                                                least=least[0] if least else 0)
        return {k: mx.array(v) for k, v in batch.items()}

    @property
    def has_validation(self) -> bool:
        return bool(self.val_rows if self.val_rows is not None else
                    int(round(len(self.rows) * self.val_fraction)))


class RerankPairs(RerankRows):
    """(query, passage, label) rows: pointwise training (BinaryCrossEntropyLoss)."""


class RerankLists(RerankRows):
    """(query, [passages], [labels]) rows: listwise training (ListNetLoss)."""

    form = "lists"
    task = "rerank_lists"
