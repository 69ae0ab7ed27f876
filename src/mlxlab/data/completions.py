"""Supervised fine-tuning rows from jsonl (task="lm"): chats, prompt/completion pairs or text,
the loss on what the model should learn to write.

Three row formats, mlx-lm's (and TRL's): the format is detected per file, one format a file.
- chat: {"messages": [{"role": ..., "content": ...}, ...], "tools": [...] (optional)}, rendered
  with the model's own chat template (data/chat.py: as transformers' apply_chat_template renders
  it) and scored on every assistant turn with its end-of-turn token;
- completions: {"prompt": ..., "completion": ...}: [BOS] prompt completion EOS (BOS only where
  the tokenizer adds one, as a pretrained Llama's does), scored on the completion and its EOS;
- text: {"text": ...}: [BOS] text EOS, scored on every token after BOS.
Every row becomes token ids and a per-token target mask; labels are the inputs shifted by one and
`loss_mask` is the target mask of the token each position predicts. A row longer than
max_length + 1 tokens is cut or dropped (data.too_long), counted in the log; a row left with no
target token is dropped, counted too. Rows are right-padded: with causal attention the padding
after a sequence never changes what comes before it, so batches need no attention mask.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.config.records import check_choice, check_fraction, check_number, utf8_text
from mlxlab.data.base import DataModule
from mlxlab.data.batching import (
    Batch,
    Batching,
    EpochPosition,
    bucket_length,
    make_batches,
    pack_rows,
)
from mlxlab.data.chat import TEMPLATE_FILE, ChatError, encode_chats, load_chat_template
from mlxlab.data.tokenizer import build_tokenizer, special_ids, tokenizer_hash
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

TOO_LONG = ("truncate", "drop")
Row = tuple[int, dict]  # (line number in its file, the JSON object)


class Rows:
    """The rows of one jsonl file and their format ("chat", "completions" or "text")."""

    def __init__(self, path: str | Path, fmt: str, rows: list[Row]):
        self.path, self.format, self.rows = str(path), fmt, rows

    def take(self, index: Sequence[int]) -> Rows:
        return Rows(self.path, self.format, [self.rows[i] for i in index])

    def texts(self, keys: dict[str, str]) -> list[str]:
        """The rows' text, for training a tokenizer when no model gives one."""
        if self.format == "completions":
            return [r[keys["prompt"]] + r[keys["completion"]] for _, r in self.rows]
        return [r[keys["text"]] for _, r in self.rows]


def row_format(row: dict, keys: dict[str, str]) -> str | None:
    """Which format a JSON object is in (None: none of them)."""
    if keys["messages"] in row:
        return "chat"
    if keys["prompt"] in row and keys["completion"] in row:
        return "completions"
    if keys["text"] in row:
        return "text"
    return None


def jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-empty line; a line that is not JSON is named."""
    for number, line in enumerate(utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number} is not JSON ({e}); fix the line") from None


def read_rows(path: str | Path, keys: dict[str, str]) -> Rows:
    """Every line of a jsonl file, its format detected from the keys; a bad line, or a line in
    another format than the first, is named with its number."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (set data.train_file= to a jsonl)")
    expected = (f"{keys['messages']!r} (chat), {keys['prompt']!r} and {keys['completion']!r}, "
                f"or {keys['text']!r}")
    rows: list[Row] = []
    first: tuple[int, str] | None = None
    for number, row in jsonl_lines(path):
        fmt = row_format(row, keys) if isinstance(row, dict) else None
        if fmt is None:
            raise ConfigError(f"{path}:{number} is not a JSON object with {expected}; fix the "
                              "line or set data.messages_key= / prompt_key= / completion_key= / "
                              "text_key=")
        if first is None:
            first = (number, fmt)
        elif fmt != first[1]:
            raise ConfigError(f"{path} mixes formats: line {first[0]} is {first[1]}, line "
                              f"{number} is {fmt}; keep one format per file")
        _check_row(path, number, fmt, row, keys)
        rows.append((number, row))
    if first is None:
        raise ConfigError(f"{path} holds no rows")
    return Rows(path, first[1], rows)


def _check_row(path: Path, number: int, fmt: str, row: dict, keys: dict[str, str]) -> None:
    where = f"{path}:{number}"
    if fmt == "chat":
        messages = row[keys["messages"]]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise ConfigError(f"{where}: {keys['messages']!r} must be a non-empty list of "
                              "{\"role\": ..., \"content\": ...} objects")
        if not isinstance(row.get("tools", []), list | type(None)):
            raise ConfigError(f"{where}: 'tools' must be a list of JSON schemas")
        return
    for key in (("prompt", "completion") if fmt == "completions" else ("text",)):
        if not isinstance(row[keys[key]], str):
            raise ConfigError(f"{where}: {keys[key]!r} must be a string")


# Why a row of each format has no token to learn (the log's count of dropped rows)
NOTHING_TO_LEARN = {"chat": "no assistant turn", "completions": "an empty completion",
                    "text": "an empty text"}


class PromptCompletion(DataModule):
    """Batches of fine-tuning rows from `train_file` (and `val_file`, else the last
    `val_fraction` of the shuffled training rows), each file chat, prompt/completion or text
    (module docstring). `tokenizer.path` is the pretrained model's tokenizer.json (train.py sets
    it from model.pretrained); its folder gives chat rows their template unless
    `chat_template` names a .jinja file (`chat_template_name`: one of the model's named
    templates). Without a tokenizer a byte-level BPE is trained on the texts (not for chats:
    they need the model's template and tokens)."""

    task = "lm"
    num_labels = None

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        prompt_key: str = "prompt",
        completion_key: str = "completion",
        max_length: int = 512,
        seed: int = 0,
        tokenizer: dict | None = None,
        split_seed: int | None = None,
        messages_key: str = "messages",
        text_key: str = "text",
        too_long: str = "truncate",
        chat_template: str | None = None,
        chat_template_name: str | None = None,
        pack: bool = False,
        pack_length: int | None = None,
    ):
        check_number("data.max_length", max_length, int, 2)
        if not isinstance(pack, bool):
            raise ConfigError(f"data.pack={pack!r}: use true or false")
        if pack_length is not None:
            check_number("data.pack_length", pack_length, int, 2)
        self.pack, self.pack_length = pack, pack_length
        check_fraction("data.val_fraction", val_fraction)
        check_choice("data.too_long", too_long, TOO_LONG)
        self.train_file, self.val_file = train_file, val_file
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.split_seed = int(seed if split_seed is None else split_seed)  # None: as before
        self.keys = {"prompt": prompt_key, "completion": completion_key,
                     "messages": messages_key, "text": text_key}
        self.max_length, self.too_long = int(max_length), too_long
        self.chat_template, self.chat_template_name = chat_template, chat_template_name
        self.tokenizer_cfg = {"kind": "bytelevel_bpe", "min_vocab": 512, **dict(tokenizer or {})}
        self.tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        self.template = None
        self._packs: list[np.ndarray] | None = None  # pack: the training rows' sequences
        self._pack_width = 0  # pack: the positions of each packed sequence
        self._position = EpochPosition()

    def setup(self, run_dir: str | Path | None = None) -> None:
        train, val = self._split(read_rows(self.train_file, self.keys),
                                 lambda path: read_rows(path, self.keys))
        self._setup_tokenizer(train, run_dir)
        self.train, self.val = self._encode(train), self._encode(val)
        if self.template is not None and self.chat_template and run_dir is not None:
            self._keep_template(Path(run_dir) / TEMPLATE_FILE)
        for split, (kept, _), source in (("training", self.train, train),
                                         ("validation", self.val, val)):
            if not kept and source.rows:  # (an empty held-out split is as before)
                raise ConfigError(f"{source.path}: no {split} row is left to learn from (see "
                                  "the counts above); raise data.max_length or set "
                                  "data.too_long=truncate")
        log.info("%s: %s rows, %d train / %d val, vocab %d", self.train_file, train.format,
                 len(self.train[0]), len(self.val[0]), self.vocab_size)

    def _split(self, train: Rows, read: Callable[[str], Rows]) -> tuple[Rows, Rows]:
        """(training, validation) rows: val_file read with `read`, else the last val_fraction
        of the training rows shuffled with split_seed."""
        if self.val_file:
            return train, read(self.val_file)
        order = np.random.default_rng(self.split_seed).permutation(len(train.rows))
        n_val = int(round(len(train.rows) * self.val_fraction))
        if n_val >= len(train.rows):
            raise ConfigError(f"val_fraction={self.val_fraction} leaves no training rows")
        return train.take(order[n_val:]), train.take(order[:n_val])

    def _setup_tokenizer(self, train: Rows, run_dir: str | Path | None) -> None:
        if train.format == "chat" and not self.tokenizer_cfg.get("path"):
            raise ConfigError(f"{train.path} holds chats, which are rendered with a model's chat "
                              "template and tokenizer: set model.pretrained=<model folder> (or "
                              "data.tokenizer.path=<its tokenizer.json>)")
        save_to = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
        texts = None if self.tokenizer_cfg.get("path") else train.texts(self.keys)
        self.tokenizer = build_tokenizer(texts, save_to=save_to, **self.tokenizer_cfg)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        # a pretrained tokenizer's folder names its end of text (config.json, tokenizer_config)
        folder = Path(self.tokenizer_cfg["path"]).parent if self.tokenizer_cfg.get("path") else None
        self.eot_id, self.pad_id, self.bos_ids = special_ids(self.tokenizer, folder)

    def _chat_template(self):
        if self.template is None:
            source = self.tokenizer_cfg.get("path")
            if not source:  # a val file of chats beside a train file of another format
                raise ConfigError("chat rows need the model's tokenizer and chat template: set "
                                  "model.pretrained=<model folder>")
            self.template = load_chat_template(source, self.chat_template,
                                               self.chat_template_name)
        return self.template

    def _keep_template(self, kept: Path) -> None:
        """The run folder's chat template is the one it trained with (data.chat_template): an
        export hands that one on (the pretrained folder's is copied only where none is)."""
        if not (kept.exists() and kept.samefile(self.chat_template)):
            shutil.copyfile(self.chat_template, kept)

    def _encode(self, rows: Rows) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Token arrays (at most max_length + 1) and their target masks, for the rows kept; the
        rows cut or dropped are counted in the log, per reason, with the first one's line."""
        ids, targets = self._tokenize(rows)
        kept_ids, kept_targets, long = [], [], []
        empty: dict[str, list[int]] = {}  # why a row has no token to learn -> its lines
        for (number, _), tokens, target in zip(rows.rows, ids, targets):
            why = NOTHING_TO_LEARN[rows.format]
            if len(tokens) > self.max_length + 1:
                long.append(number)
                if self.too_long == "drop":
                    continue
                if target[1:].any():
                    why = f"all of its learnt tokens past max_length={self.max_length}"
                tokens, target = tokens[: self.max_length + 1], target[: self.max_length + 1]
            if not target[1:].any():  # nothing to predict: no assistant turn (left)
                empty.setdefault(why, []).append(number)
                continue
            kept_ids.append(tokens)
            kept_targets.append(target)
        if long:
            log.warning("%s: %d of %d rows are longer than max_length=%d tokens and were %s "
                        "(data.too_long=%s; first: line %d)", rows.path, len(long), len(ids),
                        self.max_length, "cut" if self.too_long == "truncate" else "dropped",
                        self.too_long, long[0])
        if empty:
            counts = "; ".join(f"{len(lines)} with {why} (first: line {lines[0]})"
                               for why, lines in empty.items())
            log.warning("%s: %d of %d rows have no token to learn and were dropped: %s",
                        rows.path, sum(map(len, empty.values())), len(ids), counts)
        return kept_ids, kept_targets

    def _tokenize(self, rows: Rows) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every row's token ids and its target mask (True: a token the model learns)."""
        if not rows.rows:
            return [], []
        if rows.format == "chat":
            chats = [{"messages": r[self.keys["messages"]], "tools": r.get("tools")}
                     for _, r in rows.rows]
            try:
                encoded = encode_chats(self.tokenizer, self._chat_template(), chats)
            except ChatError as e:
                raise ConfigError(f"{rows.path}:{rows.rows[e.index][0]}: {e.reason}") from None
            return [c.ids for c in encoded], [c.assistant_mask for c in encoded]
        if rows.format == "completions":
            heads = [r[self.keys["prompt"]] for _, r in rows.rows]
            tails = [r[self.keys["completion"]] for _, r in rows.rows]
        else:  # text: every token after BOS is learnt
            heads, tails = [""] * len(rows.rows), [r[self.keys["text"]] for _, r in rows.rows]
        encode = self.tokenizer.encode_batch
        ids, targets = [], []
        for head, tail in zip(encode(heads, add_special_tokens=False),
                              encode(tails, add_special_tokens=False)):
            start = len(self.bos_ids) + len(head.ids)
            tokens = np.asarray([*self.bos_ids, *head.ids, *tail.ids, self.eot_id], np.int32)
            target = np.zeros(len(tokens), bool)
            target[start:] = True
            ids.append(tokens)
            targets.append(target)
        return ids, targets

    def _collate(self, split: tuple, index: np.ndarray, multiple: int) -> Batch:
        rows, targets = split
        width = bucket_length(max(len(rows[i]) - 1 for i in index), multiple, self.max_length)
        tokens = np.full((len(index), width + 1), self.pad_id, np.int32)
        mask = np.zeros((len(index), width), np.float32)
        for r, i in enumerate(index):
            ids = rows[i]
            tokens[r, : len(ids)] = ids
            mask[r, : len(ids) - 1] = targets[i][1:]  # label position t predicts token t + 1
        return {
            "input_ids": mx.array(tokens[:, :-1]),
            "labels": mx.array(tokens[:, 1:]),
            "loss_mask": mx.array(mask),
            "index": mx.array(np.asarray(index, np.int32)),  # position in the split: per-example losses
        }

    def _lengths(self, split: tuple) -> np.ndarray:
        return np.asarray([len(r) - 1 for r in split[0]])

    def _epoch_batches(self, batching: Batching, rng: np.random.Generator | None = None
                       ) -> list[np.ndarray] | list[list[np.ndarray]]:
        """The training split's batches: index arrays of rows, or with `pack` lists of packed
        sequences (each an index array of the rows it holds), `batch_size` sequences a batch."""
        if not self.pack:
            return make_batches(self._lengths(self.train), batching, self.max_length, rng)
        if self._packs is None:
            self._packs = self._pack(batching)
        order = rng.permutation(len(self._packs)) if rng is not None else range(len(self._packs))
        packs = [self._packs[i] for i in order]
        return [packs[i:i + batching.batch_size]
                for i in range(0, len(packs), batching.batch_size)]

    def _pack(self, batching: Batching) -> list[np.ndarray]:
        """The training rows packed into sequences of data.pack_length positions, by default
        the longest row's (bucketed): a step of batch_size sequences then holds the positions
        the widest unpacked step held, not batch_size x max_length. The log line says what a
        step holds against the unpacked steps."""
        lengths = self._lengths(self.train)
        multiple = batching.bucket_multiple
        self._pack_width = int(self.pack_length or
                               bucket_length(int(lengths.max()), multiple, self.max_length))
        if int(lengths.max()) > self._pack_width:
            raise ConfigError(f"data.pack_length={self.pack_length} is shorter than the longest "
                              f"training row ({int(lengths.max())} tokens): raise it, or leave it "
                              "null (the longest row's length)")
        packs = pack_rows(lengths, self._pack_width)
        unpacked = [len(b) * bucket_length(int(lengths[b].max()), multiple, self.max_length)
                    for b in make_batches(lengths, batching, self.max_length)]
        log.info("data.pack: %d training rows in %d sequences of %d positions (%.0f%% of them "
                 "rows, the rest padding); a step holds %d x %d = %d positions and about %.1f "
                 "rows (unpacked: %d rows, %d positions on average, %d at most)",
                 len(lengths), len(packs), self._pack_width,
                 100 * lengths.sum() / (len(packs) * self._pack_width), batching.batch_size,
                 self._pack_width, batching.batch_size * self._pack_width,
                 batching.batch_size * len(lengths) / len(packs), batching.batch_size,
                 np.mean(unpacked), max(unpacked))
        return packs

    def num_train_batches(self, batching: Batching) -> int:
        return len(self._epoch_batches(batching))

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One shuffled epoch (seed + epoch); after load_state_dict it skips the batches done."""
        rng = np.random.default_rng(self.seed + epoch)
        batches = self._epoch_batches(batching, rng)
        for chosen in self._position.remaining(batches, epoch):
            if self.pack:
                yield self._collate_packed(self.train, chosen, batching.batch_size)
            else:
                yield self._collate(self.train, chosen, batching.bucket_multiple)

    def _collate_packed(self, split: tuple, packs: list[np.ndarray], batch_size: int) -> Batch:
        """A batch of packed sequences: each the concatenation of its rows (inputs, labels and
        target masks shifted as in _collate), `segment_ids` numbering the rows from 1 (0: the
        padding after them), so each row attends only to itself (models/decoders/packing.py). Always
        `batch_size` sequences of the packing's width (an epoch's last batch gets empty ones,
        scored 0), so the compiled step sees one shape."""
        rows, targets = split
        shape = (max(batch_size, len(packs)), self._pack_width)
        inputs = np.full(shape, self.pad_id, np.int32)
        labels = np.full(shape, self.pad_id, np.int32)
        mask = np.zeros(shape, np.float32)
        segments = np.zeros(shape, np.int32)
        for r, pack in enumerate(packs):
            at = 0
            for s, i in enumerate(pack, 1):
                ids, n = rows[i], len(rows[i]) - 1
                inputs[r, at:at + n], labels[r, at:at + n] = ids[:-1], ids[1:]
                mask[r, at:at + n] = targets[i][1:]
                segments[r, at:at + n] = s
                at += n
        return {"input_ids": mx.array(inputs), "labels": mx.array(labels),
                "loss_mask": mx.array(mask), "segment_ids": mx.array(segments)}

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        for index in make_batches(self._lengths(self.val), batching, self.max_length):
            yield self._collate(self.val, index, batching.bucket_multiple)

    def state_dict(self) -> dict:
        return self._position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._position.load_state_dict(state)
