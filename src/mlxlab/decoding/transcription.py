"""Speech to text with a Whisper model (models/speech/whisper.py): the audio's log-mel features
encoded once, then the decoder run token by token over a KV cache from Whisper's prompt
<|startoftranscript|><|lang|><|transcribe|><|notimestamps|> (English-only models:
<|startoftranscript|><|notimestamps|>), a batch of audios at once.

- greedy (beam_size=1): each row's argmax until <|endoftext|>, as transformers' `generate`
  takes it; rows that end wait for the others;
- beam search (beam_size=N): transformers' beam search (its default flags: length_penalty from
  the folder's generation config, else 1.0; early_stopping false): each step keeps the 2N best
  continuations of the N beams, those ending in <|endoftext|> among the top N become finished
  hypotheses scored by their log-probability over their length, the N best others run on, and a
  row stops once no running beam can beat its worst finished one.

The folder's generation config's `suppress_tokens` (never) and `begin_suppress_tokens` (not as
the first token) are applied as transformers applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

NEG = -1.0e9  # transformers' "no score" for beams not (yet) there


@dataclass(frozen=True)
class Prompt:
    """The decoder's forced start and how generation ends."""

    ids: list[int]
    eos: int
    suppress: list[int]
    begin_suppress: list[int]
    length_penalty: float


def prompt_for(model: Any, tokenizer: Any, language: str = "en") -> Prompt:
    """Whisper's prompt for `language` (transcription, no timestamps), or one ValueError line
    naming a language the tokenizer has no token for."""
    config, generation = model.config, model.generation_config
    token = tokenizer.convert_tokens_to_ids
    sot = int(config.get("decoder_start_token_id") or token("<|startoftranscript|>"))
    multilingual = generation.get("is_multilingual", config["vocab_size"] >= 51865)
    ids = [sot]
    if multilingual:
        lang = f"<|{language}|>"
        lang_id = token(lang)
        if lang_id is None or lang_id == tokenizer.unk_token_id:
            raise ValueError(f"language {language!r}: the tokenizer has no {lang} token (a "
                             "Whisper language code: en, de, fr, ...)")
        ids += [lang_id, token("<|transcribe|>")]
    elif language != "en":
        raise ValueError(f"language {language!r}: this Whisper is English-only; use language=en")
    ids.append(token("<|notimestamps|>"))
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos = int(eos[0] if isinstance(eos, list) else eos)
    return Prompt(ids=ids, eos=eos, suppress=list(generation.get("suppress_tokens") or []),
                  begin_suppress=list(generation.get("begin_suppress_tokens") or []),
                  length_penalty=float(generation.get("length_penalty", 1.0)))


def check_settings(model: Any, tokenizer: Any, language: str, beam_size: int,
                   max_new_tokens: int) -> Prompt:
    """The prompt of `language`, once the settings are checked: one ValueError line for a
    language without a token, a beam size below 1 or more new tokens than the decoder has
    positions left after the prompt."""
    prompt = prompt_for(model, tokenizer, language)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size}: an integer >= 1 (1: greedy)")
    room = model.max_seq_len - len(prompt.ids)
    if not 1 <= max_new_tokens <= room:
        raise ValueError(f"max_new_tokens={max_new_tokens}: between 1 and {room} (this "
                         f"Whisper's {model.max_seq_len} decoder positions less the prompt's "
                         f"{len(prompt.ids)})")
    return prompt


def _suppressed(logits: mx.array, prompt: Prompt, first: bool) -> mx.array:
    """Logits [rows, vocab] in float32 with the suppressed tokens at -inf."""
    logits = logits.astype(mx.float32)
    banned = prompt.suppress + (prompt.begin_suppress if first else [])
    if not banned:
        return logits
    mask = np.zeros(logits.shape[-1], dtype=bool)
    mask[[b for b in banned if b < mask.size]] = True
    return mx.where(mx.array(mask), -mx.inf, logits)


def transcribe(model: Any, tokenizer: Any, input_features: Any, *, language: str = "en",
               beam_size: int = 1, max_new_tokens: int = 224) -> list[str]:
    """The transcript of each audio's [n_mels, 3000] features in `input_features`
    [B, n_mels, 3000] (greedy when beam_size == 1), special tokens left out."""
    tokens = transcribe_ids(model, tokenizer, input_features, language=language,
                            beam_size=beam_size, max_new_tokens=max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def transcribe_ids(model: Any, tokenizer: Any, input_features: Any, *, language: str = "en",
                   beam_size: int = 1, max_new_tokens: int = 224) -> list[list[int]]:
    """Each audio's generated token ids after the prompt, up to (not including) the end of
    text."""
    prompt = check_settings(model, tokenizer, language, beam_size, max_new_tokens)
    features = mx.array(np.asarray(input_features, dtype=np.float32))
    states = model.encode(features)
    if beam_size == 1:
        return _greedy(model, states, prompt, max_new_tokens)
    return _beam(model, states, prompt, max_new_tokens, beam_size)


def _greedy(model: Any, states: mx.array, prompt: Prompt, max_new: int) -> list[list[int]]:
    rows = states.shape[0]
    ids = mx.array([prompt.ids] * rows, dtype=mx.int32)
    logits, cache = model.decode(ids, states)
    done = np.zeros(rows, dtype=bool)
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new):
        chosen = np.array(mx.argmax(_suppressed(logits[:, -1], prompt, step == 0), axis=-1))
        for r in np.flatnonzero(~done):
            if chosen[r] == prompt.eos:
                done[r] = True
            else:
                out[r].append(int(chosen[r]))
        if done.all() or step == max_new - 1:
            break
        chosen = np.where(done, prompt.eos, chosen)  # ended rows feed the end token on
        logits, cache = model.decode(mx.array(chosen[:, None], dtype=mx.int32), states, cache)
    return out


@dataclass
class _Row:
    """One audio's beam search: its running beams and its finished hypotheses."""

    running: list[list[int]]
    running_scores: np.ndarray  # [N] summed log-probabilities
    finished: list[tuple[float, list[int]]]  # (normalized score, tokens), the N best
    open: bool = True  # transformers' "is_early_stop_heuristic_unsatisfied"


def _beam(model: Any, states: mx.array, prompt: Prompt, max_new: int, n: int) -> list[list[int]]:
    rows = states.shape[0]
    states = mx.repeat(states, n, axis=0)  # row b's beams at b*n ... b*n+n-1
    logits, cache = model.decode(mx.array([prompt.ids] * rows * n, dtype=mx.int32), states)
    start = np.full(n, NEG, dtype=np.float32)
    start[0] = 0.0  # one live beam at first, as transformers starts
    beams = [_Row([[] for _ in range(n)], start.copy(), []) for _ in range(rows)]
    for step in range(max_new):
        logprobs = _suppressed(logits[:, -1], prompt, step == 0)
        logprobs = np.array(logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True))
        last = step == max_new - 1
        sources, tokens = [], []
        for b, row in enumerate(beams):
            src, tok = _beam_step(row, logprobs[b * n:(b + 1) * n], prompt, n, step, last)
            sources += [b * n + s for s in src]
            tokens += tok
        if last or not any(row.open for row in beams):
            break
        for layer in cache:
            layer.select(mx.array(sources, dtype=mx.int32))
        logits, cache = model.decode(mx.array(tokens, dtype=mx.int32)[:, None], states, cache)
    best = [max(row.finished, key=lambda f: f[0])[1] if row.finished else row.running[0]
            for row in beams]
    return [t[:-1] if t and t[-1] == prompt.eos else t for t in best]


def _beam_step(row: _Row, logprobs: np.ndarray, prompt: Prompt, n: int, step: int,
               last: bool) -> tuple[list[int], list[int]]:
    """One step of transformers' beam search for one audio (module docstring); returns, for
    each running beam after it, its source beam and its new token."""
    vocab = logprobs.shape[-1]
    total = (logprobs + row.running_scores[:, None]).reshape(-1)
    top = np.argsort(-total, kind="stable")[:2 * n]
    scores, src, tok = total[top], top // vocab, top % vocab
    ends = (tok == prompt.eos) | last
    if row.open:  # candidates among the top n that end join the finished pool
        length = (step + 1) ** prompt.length_penalty
        for i in np.flatnonzero(ends[:n]):
            row.finished.append((float(scores[i]) / length, [*row.running[src[i]], int(tok[i])]))
        row.finished = sorted(row.finished, key=lambda f: -f[0])[:n]
    keep = np.argsort(-np.where(ends, scores + NEG, scores), kind="stable")[:n]
    row.running = [[*row.running[src[i]], int(tok[i])] for i in keep]
    row.running_scores = np.where(ends[keep], scores[keep] + NEG, scores[keep]).astype(np.float32)
    if row.open and len(row.finished) == n:  # can a running beam still beat the worst finished?
        best = row.running_scores[0] / (step + 1) ** prompt.length_penalty
        row.open = bool(best > min(f[0] for f in row.finished))
    return [int(src[i]) for i in keep], [int(tok[i]) for i in keep]
