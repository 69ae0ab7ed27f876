"""How much of a speech fine-tune's gain a quantized export keeps, judged per utterance as a
text export is judged (export/retention.py): the same utterances transcribed by the export,
by the run and by the run's base, each transcript scored against its reference
(evaluation/speech/word_errors.py: Whisper's normalizer, jiwer's word and character errors),
then every measure judged by `judge_scores` (the export against the run, paired; the share
of the run's gain over its base that it keeps; Holm over the measures) and gated by `gate`
(refused, ExportError, where it is significantly worse than the run and keeps under KEEP of
the gain, unless --accept-loss).

A task's WER is its errors over its reference words, summed over the utterances (the corpus
rate `runs compare` pairs): each utterance's column value is its errors times the task's
utterances over its total reference words, so the column's mean is the corpus WER and the
paired tests compare the utterances' error counts. CER alike, on characters.

`judge_transcripts` takes per-utterance hypotheses, not a model: any speech export (whisper.cpp
here, an mlx-whisper folder quantized) transcribes the utterances its own way and is judged by
the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mlxlab.evaluation.speech.word_errors import RATES, score_transcriptions
from mlxlab.export.retention import Column, Scores, entry_of, gate, judge_scores, measure


@dataclass(frozen=True)
class Utterances:
    """What the transcripts are scored against: a task's name, its utterances' ids and
    reference texts, and the normalizer both sides go through."""

    task: str
    ids: Sequence[str]
    references: Sequence[str]
    normalize: Callable[[str], str]


def transcript_scores(utterances: Utterances, hypotheses: Sequence[str]) -> Scores:
    """`hypotheses` (one per utterance, in order) as the task's wer and cer columns (lower is
    better; their means are the corpus rates)."""
    rows = score_transcriptions(utterances.ids, utterances.references, hypotheses,
                                utterances.normalize)
    out: Scores = {}
    for rate, (errors, length) in RATES.items():
        counts = np.array([float(r[errors]) for r in rows])
        total = float(sum(r[length] for r in rows))
        out[f"{utterances.task}/{rate}"] = Column(counts * len(rows) / total,
                                                  higher_is_better=False)
    return out


def _all_scores(tasks: Sequence[Utterances], hypotheses: Sequence[Sequence[str]]) -> Scores:
    out: Scores = {}
    for utterances, texts in zip(tasks, hypotheses, strict=True):
        out.update(transcript_scores(utterances, texts))
    return out


def judge_transcripts(tasks: Sequence[Utterances], run: Sequence[Sequence[str]],
                      exported: Sequence[Sequence[str]],
                      base: Sequence[Sequence[str]] | None, *, base_from: str, written: str,
                      accept_loss: bool, instead: str) -> dict:
    """The export's transcripts judged against the run's and the base's (None: no base, as
    `base_from` says): for each task of `tasks`, one list of transcripts per model, in the
    task's utterance order. Returns the "retention" entry of the export's report, or raises
    an ExportError (the refusal line, with the run's, the export's and the base's WER) where
    the export lost the gain and `accept_loss` is not set."""
    kept = judge_scores(_all_scores(tasks, run),
                        _all_scores(tasks, base) if base is not None else None,
                        _all_scores(tasks, exported))
    entry = entry_of([measure(k) for k in kept], written, accept_loss, base_from,
                     [t.task for t in tasks])
    entry["utterances"] = sum(len(t.ids) for t in tasks)
    return gate(entry, accept_loss, instead, what="the fine-tune's gain in word error rate")
