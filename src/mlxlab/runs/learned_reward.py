"""A finished reward run (objective=reward) as one of GRPO's rewards, beside Python rewards:

    objective:
      rewards:
        - {_target_: mlxlab.runs.learned_reward.LearnedReward, run: outputs/reward_chat/<time>}
        - {_target_: mlxlab.objectives.rl.rewards.regex_format, pattern: "^\\d+$", weight: 0.2}

`run` is the reward run's folder, or its registered model version (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`, as `mlxlab register` names it; `uri` is the store, else
$MLFLOW_TRACKING_URI, else <project>/mlruns/mlflow.db), resolved to the folder it was logged
from (runs/registered.py) when the config is checked.

Each (prompt, completion) is rendered as the reward run rendered its pairs (its own tokenizer
and chat template, kept in its run folder: the prompt's turns, the completion the assistant's
reply) and scored as objectives/preference/reward.py scores a side: the head's value at the reply's
last token. The reward model therefore reads text it tokenizes itself, whatever the policy's
tokenizer: the policy's completions reach it as text (decoded without special tokens), so no
token ids pass between two vocabularies. Its weights are loaded once, frozen (the config check
reads only its state.json): by GRPO's setup (`load`), before trainer.micro_batch=auto measures a
step, so they are counted there, with the activations of one scoring batch
(`scoring_memory`); it scores in batches of `batch_size` without gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.checkpoint import CheckpointState
from mlxlab.config.records import check_number
from mlxlab.data.chat import encode_chats, load_chat_template
from mlxlab.data.tokenizer import build_tokenizer, special_ids
from mlxlab.errors import ConfigError
from mlxlab.runs.model import choose_checkpoint, load_run_model
from mlxlab.runs.registered import is_registered_name, registered_run_dir
from mlxlab.runs.tokenizer import require_run_tokenizer
from mlxlab.runtime.compute import device

log = logging.getLogger(__name__)


class LearnedReward:
    """`(prompts, completions, **columns) -> list[float]`: the reward run `run`'s scores (see
    the module). `checkpoint`: best (default) or last."""

    def __init__(self, run: str, batch_size: int = 16, checkpoint: str = "best",
                 uri: str | None = None) -> None:
        check_number("objective.rewards[].batch_size", batch_size, int, 1)
        self.run, self.batch_size, self.checkpoint = str(run), int(batch_size), checkpoint
        self.folder = reward_folder(self.run, uri)
        if not self.folder.exists():
            raise ConfigError(f"objective.rewards: run={self.run} does not exist: give the folder "
                              "of a finished reward run (objective=reward, e.g. "
                              "outputs/train/<date>/<time>) or a registered model's name")
        found = choose_checkpoint(self.folder, checkpoint)
        head = ((CheckpointState.read(found).config or {}).get("model") or {}).get("head")
        if head != "score":
            raise ConfigError(f"objective.rewards: {self.run} is not a reward model (its "
                              f"model.head is {head or 'lm'}): give a run trained with "
                              "objective=reward (experiment=reward_chat)")
        self.tokenizer_path = require_run_tokenizer(self.folder, "reward")
        self._parts: tuple | None = None

    def load(self) -> None:
        """The reward model in memory now (GRPO's setup: before the micro-batch is measured)."""
        self._load()

    def scoring_memory(self, rows: int, width: int) -> int:
        """MLX's bytes above what it holds for one scoring batch (min(rows, batch_size) sequences
        of `width` tokens, no gradients), measured; the weights are loaded first and not
        counted here (they are resident: a step's measurement holds them)."""
        model, _, _, pad_id = self._load()
        tokens = mx.full((min(int(rows), self.batch_size), max(1, int(width))), pad_id, mx.int32)
        mx.eval(tokens)
        held = mx.get_active_memory()
        device.reset_peak_memory()  # as micro_batch.probe does, on every MLX version
        mx.eval(model(tokens))
        extra = max(0, int(mx.get_peak_memory()) - int(held))
        mx.clear_cache()
        return extra

    def _load(self) -> tuple:
        if self._parts is None:
            model, state = load_run_model(self.folder, self.checkpoint)
            model.freeze()
            tokenizer = build_tokenizer(None, path=str(self.tokenizer_path))
            tokenizer.no_padding()
            tokenizer.no_truncation()
            _, pad_id, _ = special_ids(tokenizer, self.tokenizer_path.parent)
            template = load_chat_template(str(self.tokenizer_path))
            log.info("learned reward: %s (%s)", self.run, state.path)
            self._parts = (model, tokenizer, template, pad_id)
        return self._parts

    def __call__(self, prompts: Sequence, completions: Sequence,
                 **_: Any) -> list[float]:
        model, tokenizer, template, pad_id = self._load()
        chats = [{"messages": [*as_messages(p), *as_messages(c, "assistant")]}
                 for p, c in zip(prompts, completions)]
        encoded = encode_chats(tokenizer, template, chats)
        rewards: list[float] = []
        for lo in range(0, len(encoded), self.batch_size):
            rows = encoded[lo: lo + self.batch_size]
            width = max(len(c.ids) for c in rows)
            tokens = np.full((len(rows), width), pad_id, np.int32)
            last = np.zeros(len(rows), np.int32)
            for r, chat in enumerate(rows):
                tokens[r, : len(chat.ids)] = chat.ids
                last[r] = int(np.nonzero(chat.turns == chat.turns.max())[0].max())
            scores = model(mx.array(tokens))[..., 0].astype(mx.float32)
            picked = mx.take_along_axis(scores, mx.array(last)[:, None], axis=1)[:, 0]
            rewards += np.array(picked).tolist()
        return rewards


def reward_folder(run: str, uri: str | None = None) -> Path:
    """The reward run's folder: `run` itself, or the folder a registered version was logged
    from (one ConfigError line when the store, the version or the folder is not there)."""
    if not is_registered_name(run):
        return Path(run).expanduser()
    try:
        return registered_run_dir(run, uri)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"objective.rewards: {e}; a learned reward reads the reward run's "
                          "folder (its weights, tokenizer and chat template)") from None


def as_messages(text: Any, role: str = "user") -> list[dict]:
    """A prompt (or a reply: role assistant) as chat turns: a string is one turn of `role`, a
    message is itself, a list of messages is itself."""
    if isinstance(text, str):
        return [{"role": role, "content": text}]
    return [text] if isinstance(text, dict) else list(text)


def is_reward_run(path: str | Path) -> bool:
    """Whether `path` is a finished run of a reward model (model.head=score in its state.json)."""
    try:
        found = choose_checkpoint(Path(path).expanduser())
    except (ConfigError, OSError):  # no run there: the caller's own loading names what is
        return False
    return ((CheckpointState.read(found).config or {}).get("model") or {}).get("head") == "score"


def score_file(run: str | Path, path: str | Path, batch_size: int = 16) -> dict:
    """`mlxlab eval REWARD_RUN rows.jsonl`: each prompt/completion row's reward (and their mean),
    or, for preference pairs (prompt/chosen/rejected), the pairwise accuracy with its 95 %
    Wilson interval and the mean margin."""
    from mlxlab.data.completions import jsonl_lines
    from mlxlab.data.preference import KEYS, pair_messages
    from mlxlab.stats import proportion_interval

    rows = [(n, row) for n, row in jsonl_lines(Path(path))]
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    reward = LearnedReward(str(run), batch_size)
    if all(isinstance(r, dict) and "chosen" in r for _, r in rows):
        sides = []
        for number, row in rows:
            try:
                sides.append(pair_messages(row, KEYS))
            except ValueError as e:
                raise ConfigError(f"{path}:{number}: {e}; fix the line") from None
        prompts = [p for p, _, _ in sides]
        chosen = reward(prompts, [c for _, c, _ in sides])
        rejected = reward(prompts, [r for _, _, r in sides])
        right = sum(c > r for c, r in zip(chosen, rejected))
        low, high = proportion_interval(right, len(rows))
        return {"run": str(run), "pairs": len(rows), "accuracy": right / len(rows),
                "accuracy_95": [low, high],
                "margin": float(np.mean(np.subtract(chosen, rejected)))}
    bad = next((n for n, r in rows if not (isinstance(r, dict) and "prompt" in r
                                             and "completion" in r)), None)
    if bad is not None:
        raise ConfigError(f"{path}:{bad}: a reward run scores rows of 'prompt' and "
                          "'completion' (or preference pairs: 'chosen' and 'rejected')")
    scores = reward([r["prompt"] for _, r in rows], [r["completion"] for _, r in rows])
    return {"run": str(run), "rows": len(rows), "mean_reward": float(np.mean(scores)),
            "scores": scores}
