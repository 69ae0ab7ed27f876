"""An mlxlab model as lm-evaluation-harness sees one: its `TemplateLM` over any mlxlab decoder.

lm-eval's own code does everything that decides a score (the task's prompts and few-shot
examples, the chat template's rendering, `_encode_pair`, the rolling windows, the stop
sequences, the filters and metrics); this class only runs the model, as its `hf` model does:

- `loglikelihood`: TemplateLM's encoding, then each (context, continuation) scored in right-
  padded batches by `scoring.loglikelihoods` (the inputs keep their last max_length + 1 tokens,
  float32 log-softmax summed over the continuation, and whether greedy decoding gives it);
- `loglikelihood_rolling`: lm-eval's disjoint rolling windows (`get_rolling_token_windows`,
  the prefix token first), each window's log-likelihood summed per text;
- `generate_until`: greedy decoding of `batch_size` prompts at once (`greedy_batch`: each
  answer the one it gets alone), the context left-truncated to max_length - max_gen_toks,
  ending at end-of-text or once a stop string appears, cut at the first of lm-eval's stop
  strings (the task's `until` and the end-of-text's text).

Tokenization is the model's own Hugging Face tokenizer (transformers, from the tokenizer files
beside the weights), called as `HFLM.tok_encode` calls it, and the chat template is its
`apply_chat_template`: the ids are the ones lm-eval's `hf` model scores. A run's LoRA adapters
stay unfused: the model is the run's as it trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mlxlab.decoding.batched_greedy import greedy_batch
from mlxlab.errors import ConfigError
from mlxlab.evaluation.scoring import Progress, eval_mode, greedy_ids, loglikelihoods
from mlxlab.models.base import Model

log = logging.getLogger(__name__)

MAX_GEN_TOKS = 256  # lm-eval's default for a task that names none (HFLM.max_gen_toks)


def hf_tokenizer(folder: str | Path) -> Any:
    """The transformers tokenizer of the files in `folder` (tokenizer.json with its config,
    or tokenizer.json alone)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


class MlxlabLM(TemplateLM):
    """lm-eval's model interface over `model` (an mlxlab decoder, in eval mode while it scores
    and back in the mode it was in after) and `tokenizer` (transformers'). `add_bos_token` is
    HFLM's (None: the tokenizer's own default); `max_length` the context (default the model's
    max_seq_len)."""

    def __init__(self, model: Model, tokenizer: Any, batch_size: int = 16,
                 add_bos_token: bool | None = None, max_length: int | None = None,
                 name: str = "mlxlab") -> None:
        super().__init__()
        if not isinstance(model, Model):
            raise TypeError(f"{type(model).__name__} is not a model of mlxlab (models/base.py "
                            "Model)")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size = int(batch_size)
        self.add_bos_token = add_bos_token
        self._max_length = int(max_length or model.max_seq_len)
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{name}: its tokenizer names no end-of-text token (eos_token in "
                              "tokenizer_config.json), which lm-eval's requests need")

    # --- what lm-eval reads -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = self.tokenizer.chat_template
        if not template:
            raise ConfigError(f"{self.name} has no chat template (chat_template.jinja or "
                              "tokenizer_config.json's): drop --apply-chat-template")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """HFLM.tok_encode: the flag given, else add_bos_token, else the tokenizer's default;
        no special tokens when the text already starts with the prefix token's text."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        special = {} if flag is None else {"add_special_tokens": flag}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ------------------------------------------------------------------------------

    def _scored(self, pairs: list[tuple[list[int], list[int]]], what: str
                ) -> list[tuple[float, bool]]:
        """Each (context ids, continuation ids) scored, `batch_size` at once, with progress."""
        out: list[tuple[float, bool]] = []
        progress = Progress(f"{self.name} {what}", len(pairs), "requests")
        with eval_mode(self.model), closing(progress):  # back in its own mode after
            step = max(self.batch_size * 8, 1)  # progress per chunk of batches
            for start in range(0, len(pairs), step):
                chunk = pairs[start:start + step]
                out.extend(loglikelihoods(self.model, chunk, self.batch_size))
                progress.add(len(chunk))
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        results = self._scored(pairs, "loglikelihood")
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                              ) -> list[float]:
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._scored(windows, "loglikelihood_rolling")):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers, grouped by their generation settings (lm-eval's `until`,
        `max_gen_toks`); a task that samples (do_sample, temperature > 0) is refused."""
        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(k)
        out = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        progress = Progress(f"{self.name} generate_until", len(requests), "answers")
        with eval_mode(self.model), closing(progress):  # back in its own mode after
            for members in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), MAX_GEN_TOKS)
                if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                    raise ConfigError(
                        f"a task asks {self.name} to sample (do_sample / temperature "
                        f"{kwargs.get('temperature')}): mlxlab's lm-eval model decodes greedily; "
                        "set the task's generation_kwargs to do_sample: false, temperature: 0")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                keep = self.max_length - max_new
                if keep <= 0:
                    raise ConfigError(f"max_gen_toks {max_new} leaves no room for a prompt in "
                                      f"the model's context of {self.max_length}")
                prompts = [self.tok_encode(requests[k].args[0], left_truncate_len=keep)
                           for k in members]
                answers = self._greedy(prompts, max_new, until, progress)
                for k, ids in zip(members, answers):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out

    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str],
                progress: Progress) -> list[list[int]]:
        stops = {self.eot_token_id}

        def stopped(ids: list[int]) -> bool:
            text = self.tok_decode(ids)
            return any(s and s in text for s in until)

        if self.model.make_cache() is None:  # a model without a KV cache: one at a time
            answers = []
            for ids in prompts:
                answers.append(greedy_ids(self.model, ids, max_new, stops, stopped))
                progress.add(1)
            return answers
        return greedy_batch(self.model, prompts, max_new, stops, stopped, self.batch_size,
                            on_group=progress.add)
