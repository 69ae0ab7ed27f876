"""A Whisper model a verb names, loaded to transcribe: a Whisper folder (transformers' or
mlx-whisper's, or what `mlxlab export` wrote) or a finished speech run (its best or last
checkpoint), with its Whisper tokenizer; and audio files read as the model's log-mel features.
`mlxlab transcribe` and `mlxlab serve`'s /v1/audio/transcriptions load through here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.data.audio_features import log_mel_batch
from mlxlab.data.speech import load_whisper_tokenizer
from mlxlab.errors import ConfigError
from mlxlab.models.speech.whisper import WhisperModel
from mlxlab.runs.model import load_run_model
from mlxlab.runs.model_source import RUN, open_model_source
from mlxlab.runs.tokenizer import require_run_tokenizer


@dataclass
class SpeechModel:
    """A Whisper model to transcribe with and where it came from (`kind`: pretrained | export
    | run; a run's `checkpoint`)."""

    model: WhisperModel
    tokenizer: Any  # transformers' WhisperTokenizer
    path: Path
    kind: str
    checkpoint: Path | None = None

    @property
    def n_mels(self) -> int:
        return int(self.model.config["num_mel_bins"])

    def features(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """[B, n_mels, 3000] log-mel features of 16 kHz float32 audios."""
        return np.array(log_mel_batch(list(audios), self.n_mels))


def load_speech_model(name: str | Path, which: str = "best") -> SpeechModel:
    """The Whisper model `name` names (a folder, or a finished run's `which` checkpoint) in eval
    mode, with its tokenizer; anything else is one line saying what is expected."""
    source = open_model_source(name)
    if source.kind != RUN:
        model = WhisperModel(pretrained=str(source.path))
        tokenizer = load_whisper_tokenizer(source.path, None, "transcribe")
        model.eval()
        return SpeechModel(model, tokenizer, source.path, source.kind)
    model, state = load_run_model(source.path, which)
    if not isinstance(model, WhisperModel):
        raise ConfigError(f"{name} is a run of {type(model).__name__}, not a Whisper model: "
                          "transcribe with a speech run (model=whisper) or a Whisper folder")
    tokenizer = load_whisper_tokenizer(require_run_tokenizer(source.path, "speech").parent, None,
                                       "transcribe")
    return SpeechModel(model, tokenizer, source.path, RUN, state.path)
