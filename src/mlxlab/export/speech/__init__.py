"""Whisper exports: a speech run or a Whisper folder written as transformers' folder
(`--format hf`) or mlx-whisper's (`--format mlx-whisper`), each proved by the tool it is for
(pipeline.py reads top to bottom); and as whisper.cpp's model file (`--format whisper.cpp`:
whisper_cpp.py, with ggml_file.py, whisper_cpp_layout.py, whisper_cpp_run.py), proved by
whisper.cpp itself. A quantized speech export is judged by the word error rate it keeps per
utterance (retention.py: `judge_transcripts`, any export's transcripts)."""

from mlxlab.export.speech.pipeline import FORMATS, export_whisper
from mlxlab.export.speech.source import is_whisper_source

__all__ = ["FORMATS", "export_whisper", "is_whisper_source"]
