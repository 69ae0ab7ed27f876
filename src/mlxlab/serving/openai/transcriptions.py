"""OpenAI's `POST /v1/audio/transcriptions` over Whisper models (a Whisper folder or a speech
run: runs/speech_model.py), in the shape of OpenAI's API, so the official `openai` client's
`client.audio.transcriptions.create(model=..., file=...)` works unchanged.

    multipart/form-data: file=<audio file>, model=NAME, language=en (optional, default en),
                         response_format=json | text (optional, default json),
                         temperature=0 (optional: decoding is greedy)
    -> json: {"text": "..."}          text: the transcript as text/plain

The file (WAV, FLAC, OGG) is read as `mlxlab transcribe` reads it (16 kHz mono, its first 30 s)
and decoded greedily from Whisper's prompt for the language: the same text the verb prints.
Whisper's language detection, timestamps (verbose_json, srt, vtt), a prompt and sampling
(temperature above 0) are not offered: such a request is refused naming the field, as is a field
this endpoint does not read; an unknown model is 404, a file that is no audio 400. One model
transcribes one request at a time, on the request's thread.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any

from mlxlab.serving.openai.checks import served_model
from mlxlab.serving.openai.errors import ServingError

TRANSCRIPTION_PATHS = ("/v1/audio/transcriptions", "/audio/transcriptions")
FIELDS = ("file", "model", "language", "response_format", "temperature")
FORMATS = ("json", "text")
MAX_NEW_TOKENS = 224  # Whisper's: half the decoder's 448 positions, as `mlxlab transcribe`


@dataclass(eq=False)
class ServedTranscriber:
    """A Whisper model under the names a request's `model` may use (`names[0]` listed first);
    it transcribes on the request's own thread, a request at a time (the lock), as an
    embedder embeds."""

    names: tuple[str, ...]
    speech: Any  # runs/named_model.py EvalModel of a Whisper (runs/speech_model.py)
    source: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.names[0]

    def transcribe(self, audio: bytes, suffix: str, language: str) -> str:
        with self.lock:
            return self._transcribe(audio, suffix, language)

    def _transcribe(self, audio: bytes, suffix: str, language: str) -> str:
        import numpy as np

        from mlxlab.data.audio_features import log_mel_batch
        from mlxlab.data.audio_io import read_audio
        from mlxlab.decoding.transcription import transcribe

        handle, path = tempfile.mkstemp(suffix=suffix, prefix="mlxlab-audio-")
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(audio)
            try:
                samples = read_audio(path)
            except ValueError as err:  # ConfigError: the bytes are no audio libsndfile reads
                raise ServingError(f"file: {str(err).replace(path, 'the upload')}",
                                   param="file") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        features = np.array(log_mel_batch([samples],
                                          int(self.speech.model.config["num_mel_bins"])))
        try:
            texts = transcribe(self.speech.model, self.speech.tokenizer, features,
                               language=language, max_new_tokens=MAX_NEW_TOKENS)
        except ValueError as err:  # a language the tokenizer has no token for
            raise ServingError(str(err), param="language") from None
        return texts[0]


def load_transcribers(targets: Sequence[Any], which: str = "best") -> list[ServedTranscriber]:
    """Each Whisper target (served.py's Target: a Whisper folder or a speech run) loaded to
    answer /v1/audio/transcriptions under its names."""
    from mlxlab.runs.speech_model import load_speech_model

    return [ServedTranscriber(tuple(dict.fromkeys(t.names)), load_speech_model(t.path, which),
                              t.text) for t in targets]


@dataclass(frozen=True)
class Upload:
    """A multipart form: its text fields and its file (bytes and the name the client gave)."""

    fields: dict[str, str]
    file: bytes | None
    filename: str


def parse_form(content_type: str | None, raw: bytes) -> Upload:
    """The multipart/form-data body (the openai client's upload), or a ServingError."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise ServingError("send the audio as multipart/form-data (a `file` part and a `model` "
                           f"field), not {content_type or 'no Content-Type'}")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    if not message.is_multipart():
        raise ServingError("the multipart/form-data body has no parts (is its boundary right?)")
    fields: dict[str, str] = {}
    audio, filename = None, ""
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if name == "file":
            audio = part.get_payload(decode=True) or b""
            filename = part.get_filename() or ""
        else:
            payload = part.get_payload(decode=True) or b""
            fields[name] = payload.decode("utf-8", errors="replace")
    return Upload(fields, audio, filename)


def _check(upload: Upload) -> tuple[str, str]:
    """(language, response_format) of a transcription request, or its refusal."""
    unknown = sorted(set(upload.fields) - set(FIELDS))
    if unknown:
        raise ServingError(f"{unknown[0]}: not a field this server reads of a transcription "
                           f"request (it reads {', '.join(FIELDS)}); leave it out",
                           param=unknown[0])
    if not upload.file:
        raise ServingError("file: required, the audio (WAV, FLAC or OGG) as a file part",
                           param="file")
    fmt = upload.fields.get("response_format", "json")
    if fmt not in FORMATS:
        raise ServingError(f"response_format: this server answers json or text (no "
                           f"timestamps: verbose_json, srt and vtt are not offered), not "
                           f"{fmt!r:.40}", param="response_format")
    temperature = upload.fields.get("temperature", "0")
    try:
        hot = float(temperature) != 0
    except ValueError:
        hot = True
    if hot:
        raise ServingError(f"temperature: decoding here is greedy; send 0 or leave it out, not "
                           f"{temperature!r:.40}", param="temperature")
    return upload.fields.get("language", "en") or "en", fmt


def transcription_response(content_type: str | None, raw: bytes,
                           served: Mapping[str, ServedTranscriber],
                           listed: Sequence[str]) -> tuple[str, bytes]:
    """(Content-Type, body) of the answer to one transcription request (see the module), or a
    ServingError."""
    upload = parse_form(content_type, raw)
    model = served_model(upload.fields, served, list(dict.fromkeys(listed)))
    language, fmt = _check(upload)
    text = model.transcribe(upload.file, Path(upload.filename).suffix or ".wav", language)
    if fmt == "text":
        return "text/plain; charset=utf-8", (text + "\n").encode()
    import json

    return "application/json", json.dumps({"text": text}).encode()
