"""Word and character errors of one transcription against its reference, after Whisper's text
normalization.

Both texts are normalized first, as Whisper's paper and transformers' WhisperTokenizer
(`normalize` / `basic_normalize`) do before scoring: English with transformers'
EnglishTextNormalizer (lower case, fillers and bracketed noise dropped, numbers and currencies
written as digits, British spellings made American through OpenAI's spelling map,
english_spelling.json beside this file), any other language with its BasicTextNormalizer
(lower case, symbols and punctuation to spaces). The map ships with mlxlab, not with the model
folder, so two models' transcriptions are normalized alike and their errors pair.

Then jiwer aligns the words (and the characters) and counts substitutions, deletions and
insertions. Each utterance keeps its counts, not only its rate: a task's WER is the sum of the
errors over the sum of the reference words (jiwer's corpus WER), never a mean of per-utterance
rates, and `runs compare` pairs the counts (evaluation/paired.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError

NORMALIZERS = ("auto", "english", "basic", "none")
SPELLING_MAP = Path(__file__).with_name("english_spelling.json")


@cache
def english_spelling() -> dict[str, str]:
    """OpenAI's British-to-American spelling map (what a Whisper tokenizer reads from the
    checkpoint's normalizer.json)."""
    return json.loads(SPELLING_MAP.read_text(encoding="utf-8"))


def normalizer_name(mode: str, language: str) -> str:
    """Which normalizer `mode` means for `language`: auto is english for English, else basic."""
    if mode not in NORMALIZERS:
        raise ConfigError(f"eval.normalizer={mode!r}: use one of {', '.join(NORMALIZERS)}")
    if mode != "auto":
        return mode
    return "english" if language.lower() in ("en", "english") else "basic"


def text_normalizer(mode: str = "auto", language: str = "en") -> Callable[[str], str]:
    """The function that normalizes a reference and a transcription before they are compared:
    Whisper's English normalizer, its basic one (any language), or none (whitespace only)."""
    name = normalizer_name(mode, language)
    if name == "none":
        return lambda text: " ".join(text.split())
    from transformers.models.whisper.english_normalizer import (
        BasicTextNormalizer,
        EnglishTextNormalizer,
    )

    inner = (EnglishTextNormalizer(english_spelling()) if name == "english"
             else BasicTextNormalizer())
    return lambda text: " ".join(inner(text).split())


def utterance_errors(reference: str, hypothesis: str) -> dict[str, Any]:
    """The word and character errors of `hypothesis` against `reference` (both normalized
    already): counts (errors = substitutions + deletions + insertions, words = the reference's)
    and the utterance's own rates. A reference without words has no rate to compare against."""
    import jiwer

    if not reference.strip():
        raise ValueError("a reference without words has no word error rate")
    words = jiwer.process_words(reference, hypothesis or "")
    chars = jiwer.process_characters(reference, hypothesis or "")
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    errors = words.substitutions + words.deletions + words.insertions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return {"wer": errors / n_words, "cer": char_errors / n_chars, "errors": errors,
            "words": n_words, "substitutions": words.substitutions,
            "deletions": words.deletions, "insertions": words.insertions,
            "char_errors": char_errors, "chars": n_chars}


# each rate's (errors, reference length) columns in a row of utterance_errors
RATES = {"wer": ("errors", "words"), "cer": ("char_errors", "chars")}


def corpus_rates(rows: Sequence[dict]) -> dict[str, float]:
    """The task's WER and CER: each the sum of its errors over the sum of its reference
    lengths, over the utterances of `rows`."""
    return {rate: sum(r[errors] for r in rows) / sum(r[length] for r in rows)
            for rate, (errors, length) in RATES.items()}


def score_transcriptions(ids: Sequence[str], references: Sequence[str],
                         outputs: Sequence[str], normalize: Callable[[str], str]
                         ) -> list[dict[str, Any]]:
    """One row per utterance: its id, errors (utterance_errors), the normalized reference and
    hypothesis, and the model's raw output."""
    rows = []
    for ident, reference, output in zip(ids, references, outputs, strict=True):
        ref, hyp = normalize(reference), normalize(output)
        if not ref:
            raise ConfigError(f"utterance {ident}: its reference {reference!r} normalizes to no "
                              "words; give it a transcript, or drop the row")
        rows.append({"id": ident, **utterance_errors(ref, hyp), "reference": ref,
                     "hypothesis": hyp, "output": output})
    return rows
