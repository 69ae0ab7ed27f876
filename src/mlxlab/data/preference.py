"""Preference pairs from jsonl (task="preference"): a prompt, a chosen and a rejected reply, as
TRL and mlx-lm-lora write them, rendered with the model's chat template.

Row forms (one a file is usual; each row is read on its own):
- strings: {"prompt": "...", "chosen": "...", "rejected": "...", "system": "..." (optional)}:
  the prompt is the user turn (after the system turn), each reply the assistant turn, as
  mlx-lm-lora's DPODataset renders them;
- conversational: {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}
  (a single message object or a string reply works too), TRL's form; without "prompt", chosen
  and rejected are whole conversations and the prompt is the turns they share (TRL's implicit
  prompt). An optional "tools" list goes to the template.
Each side is rendered and tokenized exactly as data=chat renders a chat (data/chat.py
`encode_chats`, the one renderer), and its completion mask is the assistant turns after the
prompt with their end-of-turn tokens (`EncodedChat.turns`). A batch holds both sides of each of
its pairs, padded to one length bucket (`chosen_*` and `rejected_*` arrays of the same shape,
each side as an lm batch: input_ids, labels, loss_mask) and `index`, the pair's place in its
split (what a cached reference's table, kept by objectives/preference/preference.py, is looked up
by). A pair longer than max_length + 1 tokens on either side is cut (data.too_long=truncate) or
dropped, and a pair left with nothing to learn on a side is dropped, each counted in the log. The batching, shuffling and the data position that
resumes it are data=completions' (this module subclasses PromptCompletion).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batch, Batching, bucket_length, make_batches
from mlxlab.data.chat import TEMPLATE_FILE, ChatError, encode_chats
from mlxlab.data.completions import PromptCompletion, Rows, jsonl_lines
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

KEYS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system",
        "margin": "margin"}
SIDES = ("chosen", "rejected")


@dataclass
class EncodedPairs:
    """One split's pairs: token ids and completion masks of each side."""

    ids: dict[str, list[np.ndarray]]
    masks: dict[str, list[np.ndarray]]
    margins: list[float] | None = None  # the file's margin column (objective=reward), if any

    def __len__(self) -> int:
        return len(self.ids["chosen"])

    def lengths(self) -> np.ndarray:
        """Each pair's longer side, in predicted positions (what its batch is padded to)."""
        return np.asarray([max(len(c), len(r)) - 1 for c, r in zip(*self.ids.values())])


def read_pairs(path: str | Path, keys: dict[str, str]) -> Rows:
    """Every line of a preference jsonl file; a line that is not a pair is named with the fix."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"data file not found: {path} (set data.train_file= to a jsonl of "
            f"{keys['prompt']!r}/{keys['chosen']!r}/{keys['rejected']!r} rows)"
        )
    rows = []
    for number, row in jsonl_lines(path):
        try:
            pair_messages(row, keys)
        except ValueError as e:
            raise ConfigError(
                f"{path}:{number}: {e}; fix the line or set data.keys.prompt= / chosen= / rejected="
            ) from None
        rows.append((number, row))
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    check_margins(path, rows, keys["margin"])
    check_distinct(path, rows, keys)
    return Rows(path, "preference", rows)


def check_margins(path: Path, rows: list[tuple[int, Any]], key: str) -> None:
    """The optional margin column (TRL's RewardTrainer: how much the chosen reply is
    preferred) is a number on every row or on none."""
    having = [number for number, row in rows if key in row]
    if having and len(having) < len(rows):
        missing = next(number for number, row in rows if key not in row)
        raise ConfigError(f"{path}:{missing}: no {key!r}, which line {having[0]} has: give "
                          "every pair a margin or none")
    for number, row in rows:
        value = row.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}:{number}: {key!r} must be a number, not {value!r}")


# Above this share of pairs whose two replies are the same, the file cannot teach a preference.
EQUAL_PAIRS_MAX = 0.5


def check_distinct(path: Path, rows: list[tuple[int, Any]], keys: dict[str, str]) -> None:
    """A pair whose chosen and rejected replies are the same teaches nothing (its loss has no
    gradient, its reward accuracy is 0): most or all such pairs (what a key typo such as
    data.keys.rejected=chosen makes) are a ConfigError, a few a warning naming the first."""
    same = [number for number, row in rows
            if (sides := pair_messages(row, keys))[1] == sides[2]]
    if not same:
        return
    what = (f"{path}: {len(same)} of {len(rows)} pairs have the same chosen and rejected reply "
            f"(line {same[0]} the first), which teaches no preference")
    if len(same) > EQUAL_PAIRS_MAX * len(rows):
        raise ConfigError(f"{what}: check data.keys.chosen / data.keys.rejected "
                          f"({keys['chosen']!r} / {keys['rejected']!r} now) and the file")
    log.warning("%s; they train on nothing", what)


def as_turns(value: Any, role: str, what: str) -> list[dict]:
    """A reply or prompt as a list of messages: a string is one turn of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict) and "role" in value:
        return [value]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and "role" in m for m in value)
    ):
        return list(value)
    raise ValueError(
        f"{what!r} must be a string, a message or a non-empty list of "
        '{"role": ..., "content": ...} messages'
    )


def pair_messages(row: Any, keys: dict[str, str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of one row (the module docstring's forms)."""
    if not isinstance(row, dict) or keys["chosen"] not in row or keys["rejected"] not in row:
        raise ValueError(f"not a JSON object with {keys['chosen']!r} and {keys['rejected']!r}")
    for side in SIDES:  # a side left blank is a pair with one reply: nothing to compare
        value = row[keys[side]]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{keys[side]!r} is empty: a pair needs both replies")
    chosen = as_turns(row[keys["chosen"]], "assistant", keys["chosen"])
    rejected = as_turns(row[keys["rejected"]], "assistant", keys["rejected"])
    if keys["prompt"] in row:
        prompt = as_turns(row[keys["prompt"]], "user", keys["prompt"])
        system = row.get(keys["system"])
        if isinstance(system, str) and prompt[0].get("role") != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
        return prompt, chosen, rejected
    shared = 0  # TRL's implicit prompt: the turns both conversations start with
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ValueError(
            f"no {keys['prompt']!r}, and {keys['chosen']!r} and "
            f"{keys['rejected']!r} share no first turn to take as the prompt"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


class PreferencePairs(PromptCompletion):
    """Batches of preference pairs from `train_file` (and `val_file`, else the last
    `val_fraction` of the shuffled training rows): the module docstring. `keys` renames the
    row keys (prompt, chosen, rejected, system); `cache_dir` keeps the reference log-probs
    (objective.reference=cached), keyed by the pairs' tokens and the reference
    weights. The tokenizer and chat template are the pretrained model's (model.pretrained)
    unless data.chat_template names a .jinja file."""

    task = "preference"

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        keys: dict | None = None,
        max_length: int = 1024,
        too_long: str = "truncate",
        chat_template: str | None = None,
        chat_template_name: str | None = None,
        seed: int = 0,
        split_seed: int | None = None,
        tokenizer: dict | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__(
            train_file,
            val_file,
            val_fraction,
            max_length=max_length,
            seed=seed,
            tokenizer=tokenizer,
            split_seed=split_seed,
            too_long=too_long,
            chat_template=chat_template,
            chat_template_name=chat_template_name,
        )
        unknown = sorted(set(keys or {}) - set(KEYS))
        if unknown:
            raise ConfigError(f"data.keys has unknown keys {unknown}; known: {sorted(KEYS)}")
        self.pair_keys = {**KEYS, **dict(keys or {})}
        self.cache_dir = cache_dir

    def setup(self, run_dir: str | Path | None = None) -> None:
        def read(path):
            return read_pairs(path, self.pair_keys)

        train, val = self._split(read(self.train_file), read)
        self._setup_tokenizer(train, run_dir)  # format "preference": the model's tokenizer
        self.train, self.val = self._encode_pairs(train), self._encode_pairs(val)
        if self.chat_template and run_dir is not None:
            self._keep_template(Path(run_dir) / TEMPLATE_FILE)
        for split, kept, source in (("training", self.train, train), ("validation", self.val, val)):
            if not len(kept) and source.rows:
                raise ConfigError(
                    f"{source.path}: no {split} pair is left to learn from (see "
                    "the counts above); raise data.max_length or set "
                    "data.too_long=truncate"
                )
        log.info(
            "%s: %d train / %d val preference pairs, vocab %d",
            self.train_file,
            len(self.train),
            len(self.val),
            self.vocab_size,
        )

    def _setup_tokenizer(self, train: Rows, run_dir: str | Path | None) -> None:
        if not self.tokenizer_cfg.get("path"):
            raise ConfigError(
                f"{train.path} holds preference pairs, which are rendered with a "
                "model's chat template and tokenizer: set model.pretrained=<model "
                "folder> (or data.tokenizer.path=<its tokenizer.json>)"
            )
        super()._setup_tokenizer(train, run_dir)

    def _encode_pairs(self, rows: Rows) -> EncodedPairs:
        """Both sides of every row rendered, tokenized and masked; too long or empty pairs cut
        or dropped and counted."""
        pairs = EncodedPairs({s: [] for s in SIDES}, {s: [] for s in SIDES})
        if not rows.rows:
            return pairs
        key = self.pair_keys["margin"]
        if key in rows.rows[0][1]:
            pairs.margins = []
        sides = {s: self._encode_side(rows, k) for k, s in enumerate(SIDES, start=1)}
        limit, long, empty = self.max_length + 1, 0, 0
        for i in range(len(rows.rows)):
            encoded = [sides[s][i] for s in SIDES]
            if any(len(ids) > limit for ids, _ in encoded):
                long += 1
                if self.too_long == "drop":
                    continue
                encoded = [(ids[:limit], mask[:limit]) for ids, mask in encoded]
            if not all(mask[1:].any() for _, mask in encoded):
                empty += 1
                continue
            for side, (ids, mask) in zip(SIDES, encoded):
                pairs.ids[side].append(ids)
                pairs.masks[side].append(mask)
            if pairs.margins is not None:
                pairs.margins.append(float(rows.rows[i][1][key]))
        if long:
            log.warning(
                "%s: %d of %d pairs have a side longer than max_length=%d tokens and "
                "were %s (data.too_long=%s)",
                rows.path,
                long,
                len(rows.rows),
                self.max_length,
                "cut" if self.too_long == "truncate" else "dropped",
                self.too_long,
            )
        if empty:
            log.warning(
                "%s: %d of %d pairs have a reply with no token to learn%s and were dropped",
                rows.path,
                empty,
                len(rows.rows),
                " within max_length" if long else "",
            )
        return pairs

    def _encode_side(self, rows: Rows, which: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and completion mask of one side (1: chosen, 2: rejected) of every row:
        the prompt and the reply rendered as one chat; the reply's assistant turns learn."""
        chats, prompt_turns = [], []
        for _, row in rows.rows:
            messages = pair_messages(row, self.pair_keys)
            prompt_turns.append(sum(m.get("role") == "assistant" for m in messages[0]))
            chats.append({"messages": [*messages[0], *messages[which]], "tools": row.get("tools")})
        try:
            encoded = encode_chats(self.tokenizer, self._chat_template(), chats)
        except ChatError as e:
            raise ConfigError(f"{rows.path}:{rows.rows[e.index][0]}: {e.reason}") from None
        return [(c.ids, c.turns >= k) for c, k in zip(encoded, prompt_turns)]

    # --- batches: the pairs of `index`, both sides padded to one bucket --------------------------

    def _collate(self, split: EncodedPairs, index: np.ndarray, multiple: int) -> Batch:
        width = bucket_length(int(split.lengths()[index].max()), multiple, self.max_length)
        batch = {"index": mx.array(np.asarray(index, np.int32))}
        if split.margins is not None:
            batch["margin"] = mx.array(np.asarray([split.margins[i] for i in index], np.float32))
        for side in SIDES:
            tokens = np.full((len(index), width + 1), self.pad_id, np.int32)
            mask = np.zeros((len(index), width), np.float32)
            for r, i in enumerate(index):
                ids = split.ids[side][i]
                tokens[r, : len(ids)] = ids
                mask[r, : len(ids) - 1] = split.masks[side][i][1:]  # position t predicts t + 1
            batch |= {
                f"{side}_input_ids": mx.array(tokens[:, :-1]),
                f"{side}_labels": mx.array(tokens[:, 1:]),
                f"{side}_loss_mask": mx.array(mask),
            }
        return batch

    def _lengths(self, split: EncodedPairs) -> np.ndarray:
        return split.lengths()

    # --- every pair in order: a cached reference's pass (objective.reference=cached) ------------

    def splits_in_order(self, batching: Batching) -> dict[str, list[Batch]]:
        """Every pair of each split once, unshuffled, for computing reference log-probs; the
        training position is untouched."""
        return {
            name: [
                self._collate(split, index, batching.bucket_multiple)
                for index in make_batches(split.lengths(), batching, self.max_length)
            ]
            for name, split in (("train", self.train), ("val", self.val))
        }

    def fingerprint(self) -> str:
        """A hash of every pair's tokens and masks in both splits (the reference cache's key)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val):
            for side in SIDES:
                for ids, mask in zip(split.ids[side], split.masks[side]):
                    digest.update(len(ids).to_bytes(4, "little"))
                    digest.update(np.asarray(ids, np.int32).tobytes())
                    digest.update(np.packbits(mask).tobytes())
                digest.update(b"|")
        return digest.hexdigest()[:16]
