"""The judgement of a Whisper export that changes the weights (--quantize): what the written
model, run by the tool it was written for, keeps of the run's accuracy.

The seam: `judge_written(source, written)` is called once the export is written and read back
(before it is moved into --out). `written.transcribe` runs the written model as its tool runs it
(mlx-whisper's transcribe for an mlx-whisper folder), audio by audio, on the run's evaluation
utterances; retention.py pairs the word error rates per utterance against the run's and its
base's and refuses an export that lost the gain (unless --accept-loss)."""

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


def judge_written(source: WhisperSource, written: Written, accept_loss: bool = False) -> dict:
    """The judgement's record (export_report.json's "retention"); raises ExportError to refuse
    the export: the written model's transcripts (`written.transcribe`) of the run's evaluation
    utterances (eval.tasks) scored against the run's and its base's (adapters off), paired per
    utterance by retention.judge_transcripts, as the whisper.cpp export is judged. Without the
    tool (--no-check, or mlx-whisper not installed) the record says it was not judged."""
    from mlxlab.export.hf import ExportError
    from mlxlab.export.speech.retention import judge_transcripts
    from mlxlab.export.speech.whisper_cpp import (
        base_transcripts,
        mlxlab_transcripts,
        probe_utterances,
    )
    from mlxlab.export.speech.whisper_cpp_run import token_limit
    from mlxlab.runs.speech_model import load_speech_model

    if written.transcribe is None:
        return {"status": "not judged", "format": written.fmt, "bits": written.bits,
                "why": "the written model was not run (--no-check, or mlx-whisper is not "
                       "installed): read back by mlxlab only"}
    loaded = load_speech_model(source.path)
    utterances = probe_utterances(loaded, None)
    if not utterances.where.startswith("the run's"):
        raise ExportError(f"--quantize {written.bits} is judged on the run's transcribed "
                          "utterances: export a run scored on eval.tasks (a transcription "
                          "task), or export it float")
    limit = token_limit(int(loaded.model.config["max_target_positions"]))
    run = [mlxlab_transcripts(loaded, audio, utterances.language, limit)
           for audio in utterances.audio]
    base, base_from = base_transcripts(loaded, utterances, limit)
    exported = [written.transcribe(audio) for audio in utterances.audio]
    return judge_transcripts(utterances.tasks, run, exported, base, base_from=base_from,
                             written=str(written.path), accept_loss=accept_loss,
                             instead="export --quantize 8, or float")
