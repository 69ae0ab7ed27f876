"""The judgement of a Whisper export that changes the weights (--quantize): what the written
model, run by the tool it was written for, keeps of the run's accuracy.

The seam: `judge_written(source, written)` is called once the export is written and read back
(before it is moved into --out). `written.transcribe` runs the written model as its tool runs it
(mlx-whisper's transcribe for an mlx-whisper folder), audio by audio; the measure (the word
error rate of its transcripts against the run's on the run's evaluation utterances, paired per
utterance) and the refusal live behind this function. Until that measure is here, the export
is written with its read-back only and its record says it was not judged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxlab.export.speech.source import WhisperSource


@dataclass(frozen=True)
class Written:
    """A written Whisper export: its folder (or file), its format, its bits (None: float) and
    `transcribe`, the written model as its tool runs it (audios at 16 kHz -> transcripts)."""

    path: Path
    fmt: str
    bits: int | None
    transcribe: Callable[[Sequence[np.ndarray]], list[str]] | None


def needs_judgement(bits: int | None) -> bool:
    """Whether an export is judged beyond its read-back: one that changed the weights."""
    return bits is not None


def judge_written(source: WhisperSource, written: Written) -> dict:
    """The judgement's record (export_report.json's "retention"); raises ExportError to refuse
    the export. Not measured yet: the record says so and nothing is refused."""
    return {"status": "not judged", "format": written.fmt, "bits": written.bits,
            "why": "the word-error-rate retention of a quantized Whisper export is not "
                   "measured in this build; the export was read back only"}
