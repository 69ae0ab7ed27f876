"""Whisper exports: a speech run or a Whisper folder written as transformers' folder
(`--format hf`) or mlx-whisper's (`--format mlx-whisper`), each proved by the tool it is for
(pipeline.py reads top to bottom)."""

from mlxlab.export.speech.pipeline import FORMATS, export_whisper
from mlxlab.export.speech.source import is_whisper_source

__all__ = ["FORMATS", "export_whisper", "is_whisper_source"]
