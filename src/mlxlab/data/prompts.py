"""Prompts for online RL (objective=grpo): rows of a jsonl the model completes during the run,
with the columns its rewards read.

One prompt a line, as TRL's GRPOTrainer reads them:
- {"prompt": "What is 3+4? Answer: ", "answer": "7"}: the text as it is, after the tokenizer's
  BOS where it adds one (a "standard" prompt);
- {"prompt": [{"role": "user", "content": ...}], ...} or {"messages": [...], ...}: a chat,
  rendered with the model's chat template and its generation prompt (where the assistant's reply
  starts), as data=chat renders SFT chats (a "conversational" prompt).
Every other key of a row (answer, solution, tests, ...) is a column: a reward gets it as a
keyword argument, one value per completion (objectives/rl/rewards.py).

The module hands out batches of prompt positions ({"index": ...}, one epoch shuffled with
seed + epoch, its position checkpointed as every data module's); the objective reads the prompts
at those positions (`prompts`) and makes its own training batches from them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batch, Batching
from mlxlab.data.chat import TEMPLATE_FILE, ChatError, ChatTemplate, encode_chats
from mlxlab.data.completions import PromptCompletion, Rows, jsonl_lines
from mlxlab.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    """The prompts of one split: token ids, the prompt as the row holds it (a string or a list of
    turns: what rewards get), each row's columns and its line in the file."""

    ids: list[np.ndarray]
    texts: list
    columns: list[dict]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def read_prompts(path: str | Path, prompt_key: str, messages_key: str) -> Rows:
    """The rows of a prompt file: format "chat" (messages, or a prompt that is a list of turns)
    or "prompt" (a string), one format a file; a bad line is named."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompt file not found: {path} (set data.train_file= to a jsonl)")
    rows, first = [], None
    for number, row in jsonl_lines(path):
        value = row.get(messages_key, row.get(prompt_key)) if isinstance(row, dict) else None
        fmt = ("chat" if isinstance(value, list) and value and all(
            isinstance(m, dict) and "role" in m for m in value)
            else "prompt" if isinstance(value, str) else None)
        if fmt is None:
            raise ConfigError(f"{path}:{number} is not a JSON object with a {prompt_key!r} string "
                              f"or a {messages_key!r} / {prompt_key!r} list of "
                              "{\"role\": ..., \"content\": ...} turns; fix the line or set "
                              "data.prompt_key= / data.messages_key=")
        first = first or (number, fmt)
        if fmt != first[1]:
            raise ConfigError(f"{path} mixes formats: line {first[0]} is {first[1]}, line "
                              f"{number} is {fmt}; keep one format per file")
        rows.append((number, reply_as_completion(row, value, messages_key, prompt_key) if fmt == "chat"
                     else row))
    if first is None:
        raise ConfigError(f"{path} holds no rows")
    return Rows(path, first[1], rows)


def reply_as_completion(row: dict, turns: list[dict], messages_key: str = "messages",
                        prompt_key: str = "prompt") -> dict:
    """A chat that ends with the assistant's reply (a fine-tune's own data=chat rows) as a
    prompt: the turns before the reply, the reply's text in the row's `completion` column (a
    dataset completion, as objective=gkd reads it) unless the row has one already."""
    if turns[-1].get("role") != "assistant" or len(turns) < 2:
        return row
    prompt = {k: v for k, v in row.items() if k not in (messages_key, prompt_key)}
    prompt[messages_key] = turns[:-1]
    content = turns[-1].get("content")
    if isinstance(content, str):
        prompt.setdefault("completion", content)
    return prompt


class PromptRows(PromptCompletion):
    """Prompts from `train_file` (and `val_file`, else the last `val_fraction` of the shuffled
    rows) for an objective that generates (module docstring). `max_length`: a prompt's tokens
    at most (a longer one is dropped, counted). The tokenizer and chat template are the
    pretrained model's (model.pretrained) unless data.chat_template names a .jinja file."""

    task = "lm"  # the model is a language model: export, generation and eval.tasks apply
    # Its rows have no completions to train on: only an objective that makes its own batches
    # from them trains on them (whose `metrics` name the kind "prompts": objectives/base.py).
    prompts_only = True

    def __init__(
        self,
        train_file: str | None,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        prompt_key: str = "prompt",
        messages_key: str = "messages",
        max_length: int = 256,
        chat_template: str | None = None,
        chat_template_name: str | None = None,
        seed: int = 0,
        split_seed: int | None = None,
        tokenizer: dict | None = None,
    ):
        if train_file is None:  # an experiment that trains on the user's own rows leaves it unset
            raise ConfigError("data.train_file is not set: give the prompts' jsonl, e.g. "
                              "data.train_file=<the fine-tune's train.jsonl>")
        super().__init__(train_file, val_file, val_fraction, prompt_key=prompt_key,
                         max_length=max_length, seed=seed, tokenizer=tokenizer,
                         split_seed=split_seed, messages_key=messages_key, too_long="drop",
                         chat_template=chat_template, chat_template_name=chat_template_name)
        self._chat_eos: str | None = None  # a chat template's eos_token: a chat's end of turn

    def setup(self, run_dir: str | Path | None = None) -> None:
        def read(path):
            return read_prompts(path, self.keys["prompt"], self.keys["messages"])

        train, val = self._split(read(self.train_file), read)
        if not self.tokenizer_cfg.get("path"):
            raise ConfigError(f"{train.path} holds prompts for a model to complete: set "
                              "model.pretrained=<model folder> (or data.tokenizer.path=<its "
                              "tokenizer.json>)")
        self._setup_tokenizer(train, run_dir)
        self.train, self.val = self._encode_prompts(train), self._encode_prompts(val)
        if self.chat_template and run_dir is not None:
            self._keep_template(Path(run_dir) / TEMPLATE_FILE)
        if not len(self.train):
            raise ConfigError(f"{train.path}: no training prompt is left (see the counts "
                              "above); raise data.max_length")
        self.has_validation = bool(len(self.val))
        self.no_validation_reason = "no validation prompts (data.val_fraction=0, no val_file)"
        log.info("%s: %s prompts, %d train / %d val, vocab %d", self.train_file, train.format,
                 len(self.train), len(self.val), self.vocab_size)

    def _encode_prompts(self, rows: Rows) -> PromptSet:
        """Each row's prompt as token ids and text, its columns; over-long prompts dropped."""
        out = PromptSet([], [], [], [])
        if not rows.rows:
            return out
        keys = (self.keys["prompt"], self.keys["messages"])
        if rows.format == "chat":
            chats = [{"messages": r.get(keys[1], r.get(keys[0])), "tools": r.get("tools")}
                     for _, r in rows.rows]
            try:
                encoded = encode_chats(self.tokenizer, self._chat_template(), chats,
                                       add_generation_prompt=True)
            except ChatError as e:
                raise ConfigError(f"{rows.path}:{rows.rows[e.index][0]}: {e.reason}") from None
            ids = [np.asarray(c.ids, np.int32) for c in encoded]
            self._chat_eos = self._chat_template().special_tokens.get("eos_token")
        else:
            heads = self.tokenizer.encode_batch([r[keys[0]] for _, r in rows.rows],
                                                add_special_tokens=False)
            ids = [np.asarray([*self.bos_ids, *h.ids], np.int32) for h in heads]
        long = 0
        for (line, row), tokens in zip(rows.rows, ids):
            if len(tokens) > self.max_length:
                long += 1
                continue
            out.ids.append(tokens)
            out.texts.append(row.get(keys[1], row.get(keys[0])))  # as TRL hands it to rewards
            out.columns.append({k: v for k, v in row.items() if k not in keys})
            out.lines.append(line)
        if long:
            log.warning("%s: %d of %d prompts are longer than max_length=%d tokens and were "
                        "dropped", rows.path, long, len(ids), self.max_length)
        return out

    # --- batches: prompt positions; the objective reads the prompts ------------------------------

    def prompts(self, split: str, index: Sequence[int]) -> tuple[list[str], list[np.ndarray],
                                                                  dict[str, list]]:
        """(texts, token ids, columns as {key: one value per prompt}) of the prompts at `index`
        of split "train" or "val"."""
        prompts = self.train if split == "train" else self.val
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        keys = sorted({k for i in index for k in prompts.columns[i]})
        columns = {k: [prompts.columns[i].get(k) for i in index] for k in keys}
        return [prompts.texts[i] for i in index], [prompts.ids[i] for i in index], columns

    def prompt_template(self) -> ChatTemplate:
        """The chat template the prompts are rendered with (the model's, or data.chat_template's
        file): what renders an objective's tools and tool turns."""
        return self._chat_template()

    def stop_ids(self) -> list[int]:
        """The tokens a completion ends with: the tokenizer's end-of-text, the chat template's
        eos_token (a chat's end of turn) and the pretrained folder's eos_token_id(s)."""
        ids = {self.eot_id}
        eos = self._chat_eos
        if eos and self.tokenizer.token_to_id(eos) is not None:
            ids.add(self.tokenizer.token_to_id(eos))
        folder = Path(self.tokenizer_cfg["path"])
        folder = folder if folder.is_dir() else folder.parent
        for name in ("generation_config.json", "config.json"):
            if (folder / name).is_file():
                value = json.loads((folder / name).read_text()).get("eos_token_id")
                ids.update(v for v in (value if isinstance(value, list) else [value])
                           if isinstance(v, int))
        return sorted(ids)

    def encode_completions(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Completions written for these prompts (a column of the rows: on-policy distillation's
        dataset completions) as the model would sample them: their tokens, then the token a
        completion stops with (a chat template's eos_token for chats, as data=chat ends an
        assistant turn; else the tokenizer's end-of-text, as data=completions ends a row)."""
        end = self.eot_id
        if self._chat_eos and self.tokenizer.token_to_id(self._chat_eos) is not None:
            end = self.tokenizer.token_to_id(self._chat_eos)
        heads = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray([*h.ids, end], np.int32) for h in heads]

    def rows_without(self, split: str, key: str) -> list[int]:
        """The file lines of `split`'s rows whose column `key` is not a string."""
        prompts = self.train if split == "train" else self.val
        return [line for line, columns in zip(prompts.lines, prompts.columns)
                if not isinstance(columns.get(key), str)]

    def longest_prompt(self) -> int:
        return max(len(t) for t in [*self.train.ids, *self.val.ids])

    def num_train_batches(self, batching: Batching) -> int:
        return -(-len(self.train) // batching.batch_size)

    def train_batches(self, batching: Batching, epoch: int) -> Iterator[Batch]:
        """One shuffled epoch of prompt positions (seed + epoch); after load_state_dict it skips
        the batches done."""
        for index in self._position.shuffled(len(self.train), batching.batch_size, self.seed,
                                             epoch):
            yield {"index": mx.array(index.astype(np.int32))}

    def val_batches(self, batching: Batching) -> Iterator[Batch]:
        """The validation prompts in order: positions and right-padded ids (the validation
        fingerprint reads them)."""
        for k in range(0, len(self.val), batching.batch_size):
            index = np.arange(k, min(k + batching.batch_size, len(self.val)), dtype=np.int32)
            width = max(len(self.val.ids[i]) for i in index)
            ids = np.full((len(index), width), self.pad_id, np.int32)
            for r, i in enumerate(index):
                ids[r, : len(self.val.ids[i])] = self.val.ids[i]
            yield {"index": mx.array(index), "input_ids": mx.array(ids)}
