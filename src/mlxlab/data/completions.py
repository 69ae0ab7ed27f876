"""Prompt/completion pairs for supervised fine-tuning (task="lm"), loss on the completion only.

The jsonl format is mlx-lm's: one {"prompt": ..., "completion": ...} object per line. Each
example becomes [BOS] prompt completion EOS (BOS only where the tokenizer adds one, as a
pretrained Llama's does); labels are the inputs shifted by one and `loss_mask` is 1 only on the
completion and its EOS, so the model learns to answer, not to repeat prompts. Examples are
right-padded: with causal attention the padding after a sequence never changes what comes
before it, so batches need no attention mask.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlab.data.base import DataModule
from mlxlab.data.batching import Batch, Batching, bucket_length, make_batches
from mlxlab.data.tokenizer import build_tokenizer, special_ids, tokenizer_hash
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.validation import check_fraction, check_number

log = logging.getLogger(__name__)


def read_pairs(path: str | Path, prompt_key: str, completion_key: str) -> list[tuple[str, str]]:
    """(prompt, completion) of every line of a jsonl file; a bad line is named with its number."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (set data.train_file= to a jsonl)")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row[prompt_key]), str(row[completion_key])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}:{number} is not a JSON object with {prompt_key!r} and "
                f"{completion_key!r} ({type(e).__name__}: {e}); fix the line or set "
                "data.prompt_key= / data.completion_key="
            ) from None
    if not pairs:
        raise ConfigError(f"{path} holds no prompt/completion pairs")
    return pairs


class PromptCompletion(DataModule):
    """Batches of prompt/completion examples from `train_file` (and `val_file`, else the last
    `val_fraction` of the shuffled training pairs). Sequences longer than `max_length` tokens are
    cut at the end. `tokenizer.path` is the pretrained model's tokenizer.json (train.py sets it
    from model.pretrained); without one a byte-level BPE is trained on the texts."""

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
    ):
        check_number("data.max_length", max_length, int, 2)
        check_fraction("data.val_fraction", val_fraction)
        self.train_file, self.val_file = train_file, val_file
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.split_seed = int(seed if split_seed is None else split_seed)  # None: as before
        self.prompt_key, self.completion_key = prompt_key, completion_key
        self.max_length = int(max_length)
        self.tokenizer_cfg = {"kind": "bytelevel_bpe", "min_vocab": 512, **dict(tokenizer or {})}
        self.tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        self._epoch, self._batches_done = 0, 0

    def setup(self, run_dir: str | Path | None = None) -> None:
        pairs = read_pairs(self.train_file, self.prompt_key, self.completion_key)
        if self.val_file:
            val = read_pairs(self.val_file, self.prompt_key, self.completion_key)
        else:
            order = np.random.default_rng(self.split_seed).permutation(len(pairs))
            n_val = int(round(len(pairs) * self.val_fraction))
            if n_val >= len(pairs):
                raise ConfigError(f"val_fraction={self.val_fraction} leaves no training pairs")
            val = [pairs[i] for i in order[:n_val]]
            pairs = [pairs[i] for i in order[n_val:]]
        save_to = Path(run_dir) / "tokenizer.json" if run_dir is not None else None
        self.tokenizer = build_tokenizer(
            [p + c for p, c in pairs], save_to=save_to, **self.tokenizer_cfg
        )
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.eot_id, self.pad_id, self.bos_ids = special_ids(self.tokenizer)
        self.train = self._encode(pairs)
        self.val = self._encode(val)
        log.info("%s: %d train / %d val pairs, vocab %d", self.train_file, len(pairs), len(val),
                 self.vocab_size)

    def _encode(self, pairs: list[tuple[str, str]]) -> tuple[list[np.ndarray], np.ndarray]:
        """Token arrays ([BOS] prompt completion EOS, at most max_length + 1) and the index where
        each completion starts."""
        if not pairs:
            return [], np.zeros(0, np.int64)
        prompts = self.tokenizer.encode_batch([p for p, _ in pairs], add_special_tokens=False)
        completions = self.tokenizer.encode_batch([c for _, c in pairs], add_special_tokens=False)
        rows, starts, cut = [], [], 0
        for p, c in zip(prompts, completions):
            head = [*self.bos_ids, *p.ids]
            ids = np.asarray([*head, *c.ids, self.eot_id], np.int32)
            cut += len(ids) > self.max_length + 1
            rows.append(ids[: self.max_length + 1])
            starts.append(len(head))
        if cut:
            log.warning("%d of %d examples are longer than max_length=%d tokens and were cut",
                        cut, len(pairs), self.max_length)
        return rows, np.asarray(starts)

    def _collate(self, split: tuple, index: np.ndarray, multiple: int) -> Batch:
        rows, starts = split
        width = bucket_length(max(len(rows[i]) - 1 for i in index), multiple, self.max_length)
        tokens = np.full((len(index), width + 1), self.pad_id, np.int32)
        mask = np.zeros((len(index), width), np.float32)
        for r, i in enumerate(index):
            ids = rows[i]
            tokens[r, : len(ids)] = ids
            # label position t predicts token t + 1: completion tokens are labels from start - 1
            mask[r, max(starts[i] - 1, 0) : len(ids) - 1] = 1.0
        return {
            "input_ids": mx.array(tokens[:, :-1]),
            "labels": mx.array(tokens[:, 1:]),
            "loss_mask": mx.array(mask),
            "index": mx.array(np.asarray(index, np.int32)),  # position in the split: per-example losses
        }

    def _lengths(self, split: tuple) -> np.ndarray:
        return np.asarray([len(r) - 1 for r in split[0]])

    def num_train_batches(self, batching: Batching) -> int:
        return len(make_batches(self._lengths(self.train), batching, self.max_length))

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One shuffled epoch (seed + epoch); after load_state_dict it skips the batches done."""
        rng = np.random.default_rng(self.seed + epoch)
        batches = make_batches(self._lengths(self.train), batching, self.max_length, rng)
        start = self._batches_done if epoch == self._epoch else 0
        for k in range(start, len(batches)):
            self._epoch, self._batches_done = epoch, k + 1  # counted when handed out
            yield self._collate(self.train, batches[k], batching.bucket_multiple)
        self._epoch, self._batches_done = epoch + 1, 0

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        for index in make_batches(self._lengths(self.val), batching, self.max_length):
            yield self._collate(self.val, index, batching.bucket_multiple)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])
