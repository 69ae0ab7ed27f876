"""What a Whisper export is proved on: a probe audio (3 s, synthesized from PROBE_SEED: the same
for every export), its log-mel features, a probe of decoder ids (the model's prompt, then ids
drawn from its vocabulary) for the logits, and mlxlab's own transcript of the audio.

Logits are compared on the features mlxlab makes of the probe audio; the transcript the tool
makes from the audio file's samples itself (its own feature extractor), against mlxlab's
transcript of the same features (transformers' WhisperFeatureExtractor equals mlxlab's
log_mel to float tolerance; mlx-whisper's pads a short audio's log-mel with zeros, where
transformers computes the padding's silence, so mlxlab transcribes mlx-whisper's features
there: the model is what is proved, not the two feature pipelines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlxlab.export.proof import TOLERANCE, Checker

PROBE_SEED, PROBE_SECONDS, PROBE_TOKENS = 0, 3.0, 12
# the transcript's cap: long enough for the probe's 3 s, short for a model that never ends it
PROBE_NEW_TOKENS = 32
SAMPLE_RATE = 16000
# what a refused speech export says its gap means
DIFFERS = ("the export's layout or the tool's Whisper forward differs from mlxlab's: the run's "
           "weights stay usable in mlxlab (transcribe, eval, serve)")


def speech_checker(name: str) -> Checker:
    return Checker(name=name, tolerance=TOLERANCE, differs=DIFFERS)


def probe_audio() -> np.ndarray:
    """PROBE_SECONDS of float32 mono 16 kHz: three gliding tones under an on/off envelope (a
    word-like rhythm) and a little noise, from PROBE_SEED."""
    rng = np.random.default_rng(PROBE_SEED)
    t = np.arange(int(PROBE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    audio = sum(0.2 * np.sin(2 * np.pi * (f0 + 80 * t) * t) for f0 in (180.0, 420.0, 910.0))
    envelope = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 2.5 * t))
    return (audio * envelope + rng.normal(0, 0.02, t.size)).astype(np.float32)


@dataclass(frozen=True)
class Probe:
    """The probe audio, mlxlab's features of it [1, n_mels, 3000], the decoder ids [2, T] the
    logits are compared on, the language asked for, and mlxlab's transcript and its ids."""

    audio: np.ndarray
    features: np.ndarray
    decoder_ids: np.ndarray
    language: str
    text: str
    ids: list[int]


def make_probe(model: Any, tokenizer: Any) -> Probe:
    """The probe of a model (module docstring) with mlxlab's greedy transcript of it."""
    from mlxlab.data.audio_features import log_mel
    from mlxlab.decoding.transcription import prompt_for

    audio = probe_audio()
    features = log_mel(audio, int(model.config["num_mel_bins"]))[None]
    language = "en"
    prompt = prompt_for(model, tokenizer, language).ids
    rng = np.random.default_rng(PROBE_SEED)
    tail = rng.integers(0, model.vocab_size, size=(2, PROBE_TOKENS - len(prompt)))
    ids = np.concatenate([np.tile(prompt, (2, 1)), tail], axis=1)
    text, tokens = transcript(model, tokenizer, features, language)
    return Probe(audio, features, ids, language, text, tokens)


def transcript(model: Any, tokenizer: Any, features: np.ndarray, language: str
               ) -> tuple[str, list[int]]:
    """mlxlab's greedy transcript of one audio's features and its token ids."""
    from mlxlab.decoding.transcription import transcribe_ids

    new = min(PROBE_NEW_TOKENS, model.max_seq_len - 4)
    ids = transcribe_ids(model, tokenizer, features, language=language, max_new_tokens=new)[0]
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


def mlxlab_logits(model: Any, probe: Probe, features: np.ndarray | None = None) -> np.ndarray:
    """The model's float32 logits [2, T, vocab] on the probe (the audio's features twice)."""
    import mlx.core as mx

    feats = probe.features if features is None else features
    batch = mx.array(np.repeat(feats, 2, axis=0))
    return np.array(model(batch, mx.array(probe.decoder_ids, dtype=mx.int32)).astype(mx.float32))


def transcript_mismatch(tool: str, theirs: str, ours: str, probe_ids: list[int]) -> str:
    """The refusal's line for a transcript the tool makes other than mlxlab's."""
    return (f"refused: {tool} transcribes the probe audio as {theirs!r}, mlxlab's model as "
            f"{ours!r} (ids {probe_ids[:12]}): {DIFFERS}")
