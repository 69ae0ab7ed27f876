"""Unpaired feedback from jsonl (task="unpaired"): a prompt, one completion and a thumbs up or
down on it, TRL's unpaired preference form (what KTO trains on, objectives/preference/kto.py).

Rows (each read on its own):
- strings: {"prompt": "...", "completion": "...", "label": true | false, "system": "..."
  (optional)}: the prompt is the user turn (after the system turn), the completion the
  assistant turn;
- conversational: {"prompt": [messages], "completion": [assistant message(s)], "label": ...}
  (a single message object works too); an optional "tools" list goes to the template.
`label` is a JSON boolean: true a desirable completion, false an undesirable one; anything else
(1, "yes", null) is refused with its line. A row is rendered and tokenized as data=preference
renders one side of a pair (data/chat.py `encode_chats`), and its completion mask is the reply's
assistant turns with their end-of-turn tokens.

A batch holds its rows as an lm batch (input_ids, labels, loss_mask), `desirable` (1.0 / 0.0 a
row), `index` (the row's place in its split) and, for KTO's KL estimate, the batch's mismatched
pairs as TRL builds them: row i's prompt followed by the completion of row i - 1 (cyclically,
within the batch), as `kl_input_ids`, `kl_labels` and `kl_loss_mask`. The sequences are joined
as token ids, prompt then completion, as TRL joins them; one that is longer than max_length + 1
tokens is cut. Both sets of rows are padded to one length bucket. The batching, shuffling and
the data position that resumes it are data=completions' (this module subclasses
PromptCompletion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batch, bucket_length
from mlxlab.data.chat import TEMPLATE_FILE, ChatError, encode_chats
from mlxlab.data.completions import PromptCompletion, Rows, jsonl_lines
from mlxlab.data.preference import as_turns
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

KEYS = {"prompt": "prompt", "completion": "completion", "label": "label", "system": "system"}


@dataclass
class EncodedRows:
    """One split's rows: token ids, completion masks, where each completion starts (its first
    learnt token: the prompt is what comes before) and each row's label."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]
    starts: list[int]
    desirable: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(ids) - 1 for ids in self.ids])


def row_messages(row: Any, keys: dict[str, str]) -> tuple[list[dict], list[dict], bool]:
    """(prompt messages, completion messages, label) of one row; ValueError says what is wrong."""
    if not isinstance(row, dict) or any(keys[k] not in row for k in ("prompt", "completion",
                                                                        "label")):
        raise ValueError(f"not a JSON object with {keys['prompt']!r}, {keys['completion']!r} "
                         f"and {keys['label']!r}")
    label = row[keys["label"]]
    if not isinstance(label, bool):
        raise ValueError(f"{keys['label']!r} must be true or false (a thumbs up or down), not "
                         f"{label!r}")
    completion = as_turns(row[keys["completion"]], "assistant", keys["completion"])
    prompt = as_turns(row[keys["prompt"]], "user", keys["prompt"])
    system = row.get(keys["system"])
    if isinstance(system, str) and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return prompt, completion, label


def read_unpaired(path: str | Path, keys: dict[str, str]) -> Rows:
    """Every line of an unpaired jsonl file; a line that is not such a row is named with the
    fix."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"data file not found: {path} (set data.train_file= to a jsonl of "
            f"{keys['prompt']!r}/{keys['completion']!r}/{keys['label']!r} rows)")
    rows = []
    for number, row in jsonl_lines(path):
        try:
            row_messages(row, keys)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: {e}; fix the line or set data.keys.prompt= / "
                              "completion= / label=") from None
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return Rows(path, "unpaired", rows)


class UnpairedRows(PromptCompletion):
    """Batches of labelled completions from `train_file` (and `val_file`, else the last
    `val_fraction` of the shuffled training rows): the module docstring. `keys` renames the row
    keys (prompt, completion, label, system). The tokenizer and chat template are the pretrained
    model's (model.pretrained) unless data.chat_template names a .jinja file."""

    task = "unpaired"

    def __init__(self, train_file: str, val_file: str | None = None, val_fraction: float = 0.1,
                 keys: dict | None = None, max_length: int = 1024, too_long: str = "truncate",
                 chat_template: str | None = None, chat_template_name: str | None = None,
                 seed: int = 0, split_seed: int | None = None, tokenizer: dict | None = None):
        super().__init__(train_file, val_file, val_fraction, max_length=max_length, seed=seed,
                         tokenizer=tokenizer, split_seed=split_seed, too_long=too_long,
                         chat_template=chat_template, chat_template_name=chat_template_name)
        unknown = sorted(set(keys or {}) - set(KEYS))
        if unknown:
            raise ConfigError(f"data.keys has unknown keys {unknown}; known: {sorted(KEYS)}")
        self.row_keys = {**KEYS, **dict(keys or {})}

    def setup(self, run_dir: str | Path | None = None) -> None:
        def read(path):
            return read_unpaired(path, self.row_keys)

        train, val = self._split(read(self.train_file), read)
        if not self.tokenizer_cfg.get("path"):
            raise ConfigError(f"{train.path} holds completions to rate, which are rendered with "
                              "a model's chat template and tokenizer: set model.pretrained=<model "
                              "folder> (or data.tokenizer.path=<its tokenizer.json>)")
        super()._setup_tokenizer(train, run_dir)
        self.train, self.val = self._encode_rows(train), self._encode_rows(val)
        if self.chat_template and run_dir is not None:
            self._keep_template(Path(run_dir) / TEMPLATE_FILE)
        for split, kept, source in (("training", self.train, train), ("validation", self.val, val)):
            if not len(kept) and source.rows:
                raise ConfigError(f"{source.path}: no {split} row is left to learn from (see the "
                                  "counts above); raise data.max_length or set "
                                  "data.too_long=truncate")
        good = sum(self.train.desirable)
        if len(self.train) and good in (0, len(self.train)):
            log.warning("%s: every training row is labelled %s: KTO learns from both kinds",
                        self.train_file, "true" if good else "false")
        log.info("%s: %d train (%d desirable) / %d val rows, vocab %d", self.train_file,
                 len(self.train), good, len(self.val), self.vocab_size)

    def _encode_rows(self, rows: Rows) -> EncodedRows:
        """Every row rendered, tokenized and masked; too long or empty rows cut or dropped and
        counted."""
        out = EncodedRows([], [], [], [])
        if not rows.rows:
            return out
        chats, prompt_turns, labels = [], [], []
        for _, row in rows.rows:
            prompt, completion, label = row_messages(row, self.row_keys)
            prompt_turns.append(sum(m.get("role") == "assistant" for m in prompt))
            chats.append({"messages": [*prompt, *completion], "tools": row.get("tools")})
            labels.append(label)
        try:
            encoded = encode_chats(self.tokenizer, self._chat_template(), chats)
        except ChatError as e:
            raise ConfigError(f"{rows.path}:{rows.rows[e.index][0]}: {e.reason}") from None
        limit, long, empty = self.max_length + 1, 0, 0
        for chat, k, label in zip(encoded, prompt_turns, labels):
            ids, mask = chat.ids, chat.turns >= k
            if len(ids) > limit:
                long += 1
                if self.too_long == "drop":
                    continue
                ids, mask = ids[:limit], mask[:limit]
            if not mask[1:].any():
                empty += 1
                continue
            out.ids.append(ids)
            out.masks.append(mask)
            out.starts.append(int(np.argmax(mask)))
            out.desirable.append(label)
        for count, what in ((long, f"are longer than max_length={self.max_length} tokens and "
                                   f"were {'cut' if self.too_long == 'truncate' else 'dropped'}"),
                            (empty, "have a completion with no token to learn and were dropped")):
            if count:
                log.warning("%s: %d of %d rows %s", rows.path, count, len(rows.rows), what)
        return out

    def _collate(self, split: EncodedRows, index: np.ndarray, multiple: int) -> Batch:
        limit = self.max_length + 1
        rows = [(split.ids[i], split.masks[i]) for i in index]
        # TRL's mismatched pairs: row r's prompt and the completion of row r - 1 of the batch
        kl_rows = []
        for r, i in enumerate(index):
            j, start = index[r - 1], split.starts[i]
            other = split.starts[j]
            ids = np.concatenate([split.ids[i][:start], split.ids[j][other:]])[:limit]
            mask = np.concatenate([np.zeros(start, bool), split.masks[j][other:]])[:limit]
            kl_rows.append((ids, mask))
        longest = max(len(ids) for ids, _ in rows + kl_rows) - 1
        width = bucket_length(longest, multiple, self.max_length)
        batch = {"index": mx.array(np.asarray(index, np.int32)),
                 "desirable": mx.array(np.asarray([split.desirable[i] for i in index],
                                                  np.float32))}
        for prefix, these in (("", rows), ("kl_", kl_rows)):
            tokens = np.full((len(index), width + 1), self.pad_id, np.int32)
            mask = np.zeros((len(index), width), np.float32)
            for r, (ids, target) in enumerate(these):
                tokens[r, : len(ids)] = ids
                mask[r, : len(ids) - 1] = target[1:]  # position t predicts token t + 1
            batch |= {f"{prefix}input_ids": mx.array(tokens[:, :-1]),
                      f"{prefix}labels": mx.array(tokens[:, 1:]),
                      f"{prefix}loss_mask": mx.array(mask)}
        return batch

    def _lengths(self, split: EncodedRows) -> np.ndarray:
        return split.lengths()
