"""Raw text streamed with Hugging Face `datasets`, tokenized just in time and packed (task="lm").

Documents are tokenized a few at a time in a background thread, each followed by the end-of-text
token, and the running token stream is cut into windows of seq_len + 1 tokens. Only a bounded
queue of ready batches, the shuffle buffer and less than one batch of leftover tokens are ever
held, so memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batch, Batching
from mlxlab.data.curriculum import Curriculum
from mlxlab.data.vocab_remap import VocabMap
from mlxlab.errors import ConfigError, MissingFileError

# One background thread tokenizes at ~0.5M tokens/s, far above what training consumes; the
# tokenizers thread pool would only compete with the BLAS threads of the training step.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from mlxlab.data.tokenizer import (
    EOT_TOKENS,
    PAD_TOKENS,
    build_tokenizer,
    find_token_id,
    start_ids,
    tokenizer_hash,
)

log = logging.getLogger(__name__)

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
READ_CHUNK = 1 << 20
# A corpus with no more documents than val_examples cannot give whole documents to validation
# and keep any for training: the end of its text (this fraction of the characters) is held out.
VAL_TEXT_FRACTION = 0.1
_DONE = object()


def _builder_for(data_files) -> str:
    files = data_files if isinstance(data_files, list) else [data_files]
    if isinstance(data_files, dict):
        files = [f for v in data_files.values() for f in (v if isinstance(v, list) else [v])]
    kinds = {BUILDERS.get(Path(str(f)).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"data.data_files={data_files}: use files of one kind, "
            f"ending in one of {sorted(BUILDERS)}"
        )
    for f in files:
        if not glob.glob(str(f)):
            raise MissingFileError(
                f"data file not found: {f} (set data.data_files= to a local file)"
            )
    return kinds.pop()


def _threaded(produce: Iterator, prefetch: int) -> Iterator:
    """Run a generator in a daemon thread, handing items over through a bounded queue."""
    items: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in produce:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # re-raised in the consumer, with its traceback
            put(e)

    thread = threading.Thread(target=work, daemon=True, name="mlxlab-data")
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer left early (break, exception): let the producer exit
        thread.join(timeout=5)


class StreamingText(DataModule):
    """Packed language-modelling batches from a hub dataset or local txt/jsonl/parquet files.

    Source: `dataset_id` (+ `dataset_config`) streams from the Hugging Face hub and then
    `data_files` is ignored; otherwise `data_files` (txt, jsonl/json, parquet, csv) are read
    locally.
    Splits: `val_split` names a separate split; otherwise the first `val_examples` examples of
    `split` are held out for validation and training starts after them (a fraction cannot be
    taken from a stream of unknown length). `max_examples` caps the training examples per epoch.
    `val_examples=0` (without `val_split`) means no validation at all (`has_validation`). A source
    with no more documents than val_examples (one long document, say) holds out the last
    VAL_TEXT_FRACTION of its text instead of whole documents.
    Documents: each is followed by the end-of-text token, and windows run across them. A txt file's
    documents are chosen by `sample_by`: its blank-line-separated paragraphs (default), its lines,
    or the whole file (`document`: no end-of-text inside the file, so a model learns to continue
    across paragraphs, e.g. the speeches of a dialogue); a jsonl/parquet/csv row is one document.
    Documents are stripped; empty ones are skipped. `encoding` is the text encoding of local txt,
    jsonl and csv files. `stride` < seq_len overlaps windows; positions already scored by the
    previous window get loss_mask 0, so every token is counted once.
    Data parallel (`shard_by_rank`): see `use_world`; without it every rank packs the whole stream
    into global batches and keeps its rows (what one process with the global batch sees).
    """

    task = "lm"
    num_labels = None

    def __init__(
        self,
        dataset_id: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        data_files: str | list | dict | None = None,
        text_column: str = "text",
        sample_by: str = "paragraph",
        val_split: str | None = None,
        val_examples: int = 200,
        max_examples: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        seq_len: int = 256,
        stride: int | None = None,
        tokenizer: dict | None = None,
        tokenizer_sample: int = 5000,
        tokenize_batch: int = 64,
        prefetch: int = 4,
        cache_dir: str | None = None,
        encoding: str = "utf-8",
        curriculum: dict | None = None,
        vocab_remap: str | None = None,
        vocab_remap_k: int | None = None,
        shard_by_rank: bool = False,
    ):
        if not dataset_id and not data_files:
            raise ConfigError(
                "set data.dataset_id= (a hub dataset) or data.data_files= (local files)"
            )
        self.stride = int(stride or seq_len)
        if not 1 <= self.stride <= seq_len:
            raise ConfigError(f"data.stride must be in [1, seq_len={seq_len}], got {stride}")
        self.dataset_id, self.dataset_config, self.split = dataset_id, dataset_config, split
        self.data_files = data_files
        # A hub id wins, so `data.dataset_id=...` alone switches away from the local default.
        self.builder = None if dataset_id else _builder_for(data_files)
        self.text_column, self.sample_by = text_column, sample_by
        self.val_split, self.val_examples = val_split, int(val_examples or 0)
        self.max_examples = max_examples
        self.shuffle_buffer, self.seed = int(shuffle_buffer or 0), int(seed)
        self.seq_len = int(seq_len)
        self.tokenizer_cfg = {"kind": "bytelevel_bpe", "min_vocab": 512, **dict(tokenizer or {})}
        self.tokenizer_sample, self.tokenize_batch = int(tokenizer_sample), int(tokenize_batch)
        self.prefetch = int(prefetch)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.encoding = str(encoding)
        self._held_text: dict[str, list[str]] | None = None  # the token hold-out's two splits
        self.tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        self.shard_by_rank = bool(shard_by_rank)
        self.world = None  # set by use_world when this rank reads a lane of its own
        self.lane, self.lanes = 0, 1  # whole stream = one lane
        self._state = self._fresh_state(0)
        self._val_cache: dict[int, list[dict]] = {}
        # data/curriculum.py: the training documents are then read once and kept in memory
        self.curriculum = Curriculum.from_config(curriculum, seed)
        self._docs: list[str] = []
        self._docs_per_batch = 1.0
        self.vocab_remap, self.vocab_remap_k = vocab_remap, vocab_remap_k  # data/vocab_remap.py
        self.vocab_map: VocabMap | None = None

    # --------------------------------------------------------------- source
    def source_name(self) -> str:
        return (
            str(self.data_files)
            if self.builder
            else f"{self.dataset_id}:{self.dataset_config or ''}"
        )

    @property
    def has_validation(self) -> bool:
        return self.val_split is not None or self.val_examples > 0

    no_validation_reason = "data.val_examples=0 and no data.val_split"

    def _files(self) -> list[str]:
        files = self.data_files if isinstance(self.data_files, (list, dict)) else [self.data_files]
        if isinstance(files, dict):
            files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
        return sorted({m for f in files for m in glob.glob(str(f))})

    def _load(self, split: str):
        from datasets import Dataset, load_dataset  # slow import: only when a stream is opened

        if self._held_text is not None:
            texts = self._held_text["val" if split == "_held_out" else "train"]
            return Dataset.from_dict({self.text_column: texts}).to_iterable_dataset()
        if self.builder is not None:
            # Read 1 MB at a time (the default is 10 MB) so memory stays small and flat.
            kwargs = {
                "text": {"sample_by": self.sample_by, "chunksize": READ_CHUNK},
                "json": {"chunksize": READ_CHUNK},
            }.get(self.builder, {})
            if self.builder in ("text", "json", "csv"):
                kwargs["encoding"] = self.encoding
            try:
                return load_dataset(
                    self.builder, data_files=self.data_files, split=split, streaming=True,
                    **kwargs,
                )
            except StopIteration:  # the json reader infers its schema from a first record
                empty = [f for f in self._files() if os.path.getsize(f) == 0] or self._files()
                raise ConfigError(
                    f"no records in {', '.join(empty)}: the file is empty; give data.data_files= "
                    "files with text"
                ) from None
            except UnicodeDecodeError as e:
                raise self._decode_error(e) from None
        return load_dataset(self.dataset_id, self.dataset_config, split=split, streaming=True)

    def _decode_error(self, error: UnicodeDecodeError) -> ValueError:
        """The error names the file that does not decode (the reader's own message does not)."""
        bad = []
        for f in self._files() if self.builder else []:
            try:
                with open(f, encoding=self.encoding) as handle:
                    while handle.read(READ_CHUNK):
                        pass
            except UnicodeDecodeError:
                bad.append(f)
            except OSError:
                continue
        where = ", ".join(bad) or self.source_name()
        return ValueError(
            f"{where} is not {self.encoding} text ({error.reason}: byte {error.object[error.start]:#x}"
            f" at position {error.start}): set data.encoding= to the file's encoding, e.g. "
            "data.encoding=latin-1 (or cp1252)"
        )

    def _read(self, stream) -> Iterator[dict]:
        """The examples of a stream; a file that does not decode is named in the error."""
        try:
            yield from stream
        except UnicodeDecodeError as e:
            raise self._decode_error(e) from None

    def _holds_out_documents(self) -> bool:
        return self.val_split is None and self.val_examples > 0 and self._held_text is None

    def use_world(self, world) -> bool:
        """Data parallel with `shard_by_rank`: rank r of N reads lane r of the (shuffled) stream,
        the documents base + r, base + r + N, ... of the epoch, and tokenizes and packs only those
        into batches of its own batch_size (the trainer then neither scales the batch nor splits
        it: the global batch is the N lanes' batches side by side). All ranks still read the raw
        stream (reading is cheap; tokenizing is not). An epoch ends for all ranks when any lane
        runs dry (one small all-reduce per batch); the rest of the other lanes is skipped.
        True when this data now yields per-rank batches."""
        if not self.shard_by_rank or not world.enabled:
            return False
        self.world, self.lane, self.lanes = world, world.rank, world.size
        self._state = self._fresh_state(self._state["epoch"])
        return True

    def _train_stream(self, epoch: int, skip: int = 0):
        if self.curriculum is not None:  # the documents in the curriculum's order
            order = self.curriculum.document_order(epoch, self._docs_per_batch)
            return ({self.text_column: self._docs[i], DOC_ID: i} for i in order[skip:])
        ds = self._load(self.split)
        if self._holds_out_documents():
            ds = ds.skip(self.val_examples)
        if self.max_examples:
            ds = ds.take(int(self.max_examples))
        # each document's position in the training split, before shuffling: the id its windows
        # carry (batch["index"]) for per-example losses
        ds = ds.map(_with_doc_id, with_indices=True)
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if skip:
            ds = ds.skip(skip)  # resume: pass over consumed examples without tokenizing them
        ds.set_epoch(epoch)  # shuffle seed = seed + epoch; set last: skip/take do not carry it
        return ds

    def _val_stream(self):
        if self._held_text is not None:
            return self._load("_held_out")
        if self.val_split is not None:
            ds = self._load(self.val_split)
            return ds.take(self.val_examples) if self.val_examples else ds
        return self._load(self.split).take(self.val_examples) if self.val_examples else None

    def _text(self, example: dict) -> str:
        if self.text_column not in example:
            raise ConfigError(
                f"text column {self.text_column!r} not in {self.source_name()}; "
                # not DOC_ID: _train_stream adds it, the file has no such column
                f"available columns: {[c for c in example if c != DOC_ID]} (set data.text_column=)"
            )
        return str(example[self.text_column] or "").strip()

    def documents(self, stream) -> Iterator[str]:
        """The non-empty documents of a stream, in order (what gets tokenized)."""
        for example in self._read(stream):
            text = self._text(example)
            if text:
                yield text

    # ---------------------------------------------------------------- setup
    def setup(self, run_dir: str | Path | None = None) -> None:
        save_to = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
        if self.val_split is None and self.val_examples > 0:
            self._hold_out_text_if_few_documents()
        cfg = dict(self.tokenizer_cfg)
        reuse = bool(cfg.get("path")) or (
            save_to is not None and save_to.is_file() and not cfg.get("retrain")
        )
        # The tokenizer sample; with a tokenizer given, one document just to check the source.
        wanted = 1 if reuse else self.tokenizer_sample
        sample = list(islice(self.documents(self._unshuffled_train()), wanted))
        if not sample:
            held = "" if self.val_split else f" after holding out val_examples={self.val_examples}"
            raise ConfigError(
                f"no text in {self.source_name()}{held}: the source is empty "
                "(check data.data_files= / data.dataset_id=)"
            )
        if not reuse and self.cache_dir is not None and not cfg.get("retrain"):
            # Trained tokenizers are cached by sample + settings, so new runs skip training.
            key = hashlib.sha256(json.dumps([sample, cfg], sort_keys=True).encode()).hexdigest()
            cached = self.cache_dir / "tokenizers" / f"{key[:24]}.json"
            if cached.is_file():
                log.info("cache hit: tokenizer %s", cached)
            else:
                build_tokenizer(sample, save_to=cached, **cfg)
            cfg["path"] = str(cached)
        self.tokenizer = build_tokenizer(sample, save_to=save_to, **cfg)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # documents are packed, never cut short
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)  # recorded in checkpoints
        self.eot_id = find_token_id(self.tokenizer, EOT_TOKENS, "end-of-text")
        self.bos_ids = start_ids(self.tokenizer)  # a pretrained tokenizer's BOS starts documents
        self.pad_id = find_token_id(self.tokenizer, PAD_TOKENS + EOT_TOKENS, "padding")
        log.info("%s: vocab %d, seq_len %d", self.source_name(), self.vocab_size, self.seq_len)
        if self.curriculum is None and not self.vocab_remap:
            return
        # Both read the training documents once: the curriculum keeps them, the map counts them.
        docs = self.documents(self._unshuffled_train())
        self._docs = list(islice(docs, self.max_examples) if self.max_examples else docs)
        ids = [np.asarray([*self.bos_ids, *e.ids, self.eot_id], np.int32) for e in
               self.tokenizer.encode_batch(self._docs, add_special_tokens=False)]
        if self.curriculum is not None:
            self.curriculum.fit(ids, self.vocab_size)
        else:
            self._docs = []
        if self.vocab_remap:
            counts = np.bincount(np.concatenate(ids), minlength=self.vocab_size)
            self.vocab_map = VocabMap.build(self.vocab_remap, counts, self.vocab_remap_k,
                                            [self.eot_id, self.pad_id, *self.bos_ids])
            log.info("vocab_remap=%s: %d of %d tokens kept (+1 UNK): the model's vocabulary is %d",
                     self.vocab_remap, self.vocab_map.size - 1, self.vocab_size, self.vocab_map.size)
            self.full_vocab_size, self.vocab_size = self.vocab_size, self.vocab_map.size

    def _unshuffled_train(self):
        """Training split before shuffling: the tokenizer sample is the same for every seed."""
        ds = self._load(self.split)
        return ds.skip(self.val_examples) if self._holds_out_documents() else ds

    def _hold_out_text_if_few_documents(self) -> None:
        """With no more documents than val_examples, split the text instead: the last
        VAL_TEXT_FRACTION of the characters (cut at a space) is the validation document."""
        self._held_text = None
        docs = list(islice(self.documents(self._load(self.split)), self.val_examples + 1))
        if len(docs) > self.val_examples or not docs:
            return
        total = sum(len(d) for d in docs)
        keep = total - max(1, int(total * VAL_TEXT_FRACTION))  # characters left for training
        train: list[str] = []
        val: list[str] = []
        for i, doc in enumerate(docs):
            if keep >= len(doc):
                train.append(doc)
                keep -= len(doc)
                continue
            cut = doc.rfind(" ", 0, keep + 1)
            cut = keep if cut <= 0 else cut
            head, tail = doc[:cut].strip(), doc[cut:].strip()
            train += [head] if head else []
            val = ([tail] if tail else []) + docs[i + 1 :]
            break
        if not train or not val:
            raise ConfigError(
                f"{self.source_name()} is too short to hold out validation text: add text or set "
                "data.val_examples=0 (no validation)"
            )
        self._held_text = {"train": train, "val": val}
        log.warning(
            "%s has %d document(s), not more than data.val_examples=%d: holding out its last "
            "%d%% of text (%d characters) for validation instead of whole documents",
            self.source_name(), len(docs), self.val_examples, round(VAL_TEXT_FRACTION * 100),
            sum(len(v) for v in val),
        )

    # -------------------------------------------------------------- packing
    @staticmethod
    def _fresh_state(epoch: int, base: int = 0) -> dict:
        # base: documents of the epoch before the lanes start (set by a resume at another world
        # size); examples_consumed counts this lane's documents after base.
        return {
            "epoch": epoch,
            "examples_consumed": 0,
            "carry": [],
            "carry_docs": [],  # the document id of each carried token
            "windows_done": 0,
            "batches_done": 0,
            "base": base,
        }

    def _pack(self, stream, batch_size: int, state: dict) -> Iterator[tuple[dict, dict]]:
        """(numpy batch, state after it) pairs; the state lets a resume continue exactly here."""
        seq_len, stride, overlap = self.seq_len, self.stride, self.seq_len - self.stride
        examples = self._read(stream)
        consumed, windows_done, batches_done = (
            state["examples_consumed"],
            state["windows_done"],
            state["batches_done"],
        )
        buf = np.asarray(state["carry"], dtype=np.int32)
        docs = np.asarray(state.get("carry_docs") or [-1] * len(buf), dtype=np.int64)
        if len(docs) != len(buf):  # a checkpoint from before document ids: unknown
            docs = np.full(len(buf), -1, np.int64)
        need = seq_len + 1 + (batch_size - 1) * stride  # tokens for one full batch of windows
        exhausted = False
        while True:
            while len(buf) < need and not exhausted:
                chunk = list(islice(examples, self.tokenize_batch))
                exhausted = len(chunk) < self.tokenize_batch
                consumed += len(chunk)
                kept = [(t, e.get(DOC_ID, -1)) for e, t in zip(chunk, map(self._text, chunk)) if t]
                if kept:
                    encodings = self.tokenizer.encode_batch([t for t, _ in kept],
                                                            add_special_tokens=False)
                    ids = [[*self.bos_ids, *e.ids, self.eot_id] for e in encodings]
                    buf = np.concatenate([buf, np.asarray([i for d in ids for i in d], np.int32)])
                    docs = np.concatenate([docs, np.repeat(np.asarray([d for _, d in kept], np.int64),
                                                           [len(d) for d in ids])])
            rows, masks, row_docs = [], [], []
            while len(rows) < batch_size and len(buf) >= seq_len + 1:
                mask = np.ones(seq_len, np.float32)
                first = overlap if windows_done else 0
                mask[:first] = 0.0
                rows.append(buf[: seq_len + 1])
                masks.append(mask)
                row_docs.append(docs[first + 1])  # the document of the first scored label
                buf, docs = buf[stride:], docs[stride:]
                windows_done += 1
            scored_from = overlap if windows_done else 0
            if exhausted and len(rows) < batch_size and len(buf) - 1 > scored_from:
                # The tail: pad to a full window, score only its real, not-yet-scored labels.
                mask = np.zeros(seq_len, np.float32)
                mask[scored_from : len(buf) - 1] = 1.0
                rows.append(
                    np.concatenate([buf, np.full(seq_len + 1 - len(buf), self.pad_id, np.int32)])
                )
                masks.append(mask)
                row_docs.append(docs[scored_from + 1])
                buf, docs = buf[:0], docs[:0]
                windows_done += 1
            if not rows:
                return
            while len(rows) < batch_size:  # keep one batch shape: pad with rows that score nothing
                rows.append(np.full(seq_len + 1, self.pad_id, np.int32))
                masks.append(np.zeros(seq_len, np.float32))
                row_docs.append(-1)
            windows = np.stack(rows)
            batches_done += 1
            batch = {
                "input_ids": windows[:, :-1],
                "labels": windows[:, 1:],
                "loss_mask": np.stack(masks),
                "index": np.asarray(row_docs, np.int64),  # -1: a padding row, or no id known
            }
            yield (
                batch,
                {
                    "epoch": state["epoch"],
                    "examples_consumed": consumed,
                    "carry": buf.tolist(),
                    "carry_docs": docs.tolist(),
                    "windows_done": windows_done,
                    "batches_done": batches_done,
                },
            )

    def rows_per_batch(self, batching: Batching) -> int:
        """batch_size windows; with dynamic=True as many as fit max_tokens (all are seq_len)."""
        if batching.dynamic and batching.max_tokens:
            return max(1, batching.max_tokens // self.seq_len)
        return batching.batch_size

    def _to_mx(self, batch: dict) -> Batch:
        if self.vocab_map is not None:  # the model's ids (data/vocab_remap.py)
            batch = self.vocab_map.remap(batch)
        return {k: mx.array(v) for k, v in batch.items()}

    # -------------------------------------------------------------- batches
    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One epoch of packed (batch_size, seq_len) batches; resumes at the loaded state."""
        state = self._state if self._state["epoch"] == epoch else self._fresh_state(epoch)
        if self.curriculum is not None:  # how many documents a batch holds, for the pacing
            per_doc = self.curriculum.lengths.mean() if len(self._docs) else 1.0
            self._docs_per_batch = self.rows_per_batch(batching) * self.stride / per_doc
        base = state.get("base", 0)
        stream = self._train_stream(epoch, skip=base + state["examples_consumed"] * self.lanes)
        lane = islice(stream, self.lane, None, self.lanes) if self.lanes > 1 else stream
        packed = _threaded(self._pack(lane, self.rows_per_batch(batching), state), self.prefetch)
        for batch, after in packed:
            if self.world is not None and not self._all_lanes_have_a_batch():
                break
            self._state = {**after, "base": base}  # counted when handed out, like TabularText
            if self.curriculum is not None:
                self.curriculum.observe(batch["labels"], batch["loss_mask"])
            yield self._to_mx(batch)
        else:  # this lane ran dry: the others learn it from its vote
            if self.world is not None:
                self._all_lanes_have_a_batch(False)
        packed.close()  # stops the producer of a lane that still had batches
        self._state = self._fresh_state(epoch + 1)

    def _all_lanes_have_a_batch(self, mine: bool = True) -> bool:
        """The agreed end of an epoch: every rank votes each batch, so all stop at the same one."""
        votes = self.world.sum_numbers([float(mine)], "the end-of-epoch check of the data lanes")
        return votes[0] == self.world.size

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        """Held-out batches, never shuffled; packed once and kept (bounded by val_examples)."""
        rows = self.rows_per_batch(batching)
        if rows not in self._val_cache:
            stream = self._val_stream()
            packed = (
                []
                if stream is None
                else [b for b, _ in self._pack(stream, rows, self._fresh_state(0))]
            )
            self._val_cache[rows] = packed
        for batch in self._val_cache[rows]:
            yield self._to_mx(batch)

    def num_train_batches(self, batching: Batching) -> None:
        return None  # unknown for a stream

    def state_dict(self) -> dict:
        """This rank's position (its lane's, with shard_by_rank); `gathered_state` for a
        checkpoint."""
        return {**self._state, "lane": self.lane, "lanes": self.lanes, **self._policy_state()}

    def _policy_state(self) -> dict:
        """The curriculum's token counts and the vocabulary map (a checkpoint's generation maps
        back with it), beside the position."""
        state = {}
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        if self.vocab_map is not None:
            state["vocab_map"] = self.vocab_map.state_dict()
        return state

    def _load_policy_state(self, state: dict) -> dict:
        """Restore what _policy_state saved; returns the position part of `state`."""
        state = dict(state)
        if self.curriculum is not None:
            self.curriculum.load_state_dict(state.get("curriculum"))
        saved = state.pop("vocab_map", None)
        mine = self.vocab_map.state_dict() if self.vocab_map is not None else None
        if saved != mine:
            raise ValueError("resume: the checkpoint's data.vocab_remap map differs from this "
                             "data's (other documents or settings): resume with the same data")
        state.pop("curriculum", None)
        return state

    def gathered_state(self) -> dict:
        """The position of every lane (called by every rank; rank 0 writes it): one checkpoint
        holds all lanes, so any rank count can resume from it."""
        if self.world is None:
            return self.state_dict()
        mine = {k: v for k, v in self._state.items() if k not in ("epoch", "base")}
        text = np.frombuffer(json.dumps(mine).encode() + b"\0", np.uint8).astype(np.int32)
        joined = self.world.gather_rows(text, "gathering the data lanes' positions")
        parts = bytes(joined.astype(np.uint8)).split(b"\0")[:-1]  # rank order
        return {"epoch": self._state["epoch"], "base": self._state.get("base", 0),
                "lanes": self.lanes, "lane_states": [json.loads(p) for p in parts],
                **self._policy_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. Same lane count: every lane continues exactly. Another
        count (another world size with shard_by_rank, or switching it): the new lanes start at the
        first document that no old lane had read yet, base + r + consumed_r x N minimised over the
        old lanes; documents a faster lane had read past it are read again, and the tokens the old
        lanes held but had not yet put into a batch are skipped."""
        state = self._load_policy_state(state)
        epoch, base = int(state["epoch"]), int(state.get("base", 0))
        lanes = int(state.get("lanes", 1))
        own = state.get("lane_states")
        if own is None:  # one lane's own state (a plain process, or state_dict on this rank)
            if lanes == self.lanes and int(state.get("lane", 0)) == self.lane:
                self._state = {**self._fresh_state(epoch, base), **state}
                for key in ("lane", "lanes"):
                    self._state.pop(key, None)
                return
            if lanes != 1:
                raise ValueError(f"a state of lane {state.get('lane')} of {lanes} alone cannot "
                                 "be resumed: checkpoints hold every lane (gathered_state)")
            own = [state]
        if len(own) == self.lanes:
            self._state = {**self._fresh_state(epoch, base), **own[self.lane]}
            return
        start = min(base + r + int(s["examples_consumed"]) * len(own) for r, s in enumerate(own))
        log.warning(
            "data: %d lane(s) saved, %d now: the lanes restart at document %d of epoch %d (the "
            "first one no saved lane had read; up to a batch per old lane is read again or "
            "skipped)", len(own), self.lanes, start, epoch)
        self._state = self._fresh_state(epoch, start)


DOC_ID = "_mlxlab_doc"  # the column _train_stream adds: a document's position in the split


def _with_doc_id(example: dict, index: int) -> dict:
    return {DOC_ID: index}


def token_throughput(
    data: StreamingText, batching: Batching, max_batches: int = 50, epoch: int = 0
) -> dict:
    """Tokenizer + packing speed: scored tokens per second over up to `max_batches` batches."""
    saved = data.state_dict()
    tokens, batches = 0.0, 0
    start = time.perf_counter()
    stream = data.train_batches(batching, epoch)
    for batch in stream:
        tokens += float(batch["loss_mask"].sum().item())
        batches += 1
        if batches >= max_batches:
            break
    stream.close()  # stops the producer thread now, not at garbage collection
    seconds = time.perf_counter() - start
    data.load_state_dict(saved)
    return {
        "tokens": tokens,
        "batches": batches,
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
    }
