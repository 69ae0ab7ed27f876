"""Whisper's log-mel features of 16 kHz audio, as transformers' WhisperFeatureExtractor makes
them: each utterance zero-padded (or cut) to 30 s, a short-time Fourier transform (400-sample
periodic Hann window, hop 160, centred with reflected edges), the power spectrum through the
Slaney mel filter bank transformers builds (`mel_filter_bank`, 0-8 kHz, imported, not copied),
log10 of it (floored at 1e-10), each utterance floored at its own maximum - 8, then (x + 4) / 4.
The result is (n_mels, 3000) per utterance: 100 frames a second, channels first as the
extractor emits them and `WhisperModel` takes them.

Computed in MLX, a batch at a time: framing is a strided view, the FFT and the filter-bank
product run as one batched op each on MLX's default device (the GPU where there is one, beside
the model that reads the features; the CPU where an MLX build's GPU backend has no FFT), so a
batch of many utterances costs a few array ops, not a Python loop over them; only padding to
30 s is numpy. `log_mel` of one utterance gives numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import mlx.core as mx
import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480,000: what every utterance is padded or cut to
N_FRAMES = N_SAMPLES // HOP              # 3,000 frames (the STFT's last one is dropped)
# utterances transformed at once: bounds the framed copy and its spectrum (about 23 MB an
# utterance at its peak)
ROWS_AT_ONCE = 16


@cache
def mel_filters(n_mels: int) -> mx.array:
    """(N_FFT // 2 + 1, n_mels) Slaney filters, those WhisperFeatureExtractor builds."""
    from transformers.audio_utils import mel_filter_bank

    return mx.array(mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels,
                                    min_frequency=0.0, max_frequency=8000.0,
                                    sampling_rate=SAMPLE_RATE, norm="slaney",
                                    mel_scale="slaney").astype(np.float32))


@cache
def hann_window() -> mx.array:
    """The periodic Hann window of N_FFT samples (torch.hann_window's default)."""
    n = np.arange(N_FFT)
    return mx.array((0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32))


def pad_or_trim(audio: np.ndarray) -> np.ndarray:
    """`audio` as exactly N_SAMPLES float32 samples: zeros after it, or its first 30 s."""
    out = np.zeros(N_SAMPLES, np.float32)
    n = min(len(audio), N_SAMPLES)
    out[:n] = audio[:n]
    return out


def _log_mel_rows(signals: mx.array, n_mels: int) -> mx.array:
    """(rows, n_mels, N_FRAMES) features of (rows, N_SAMPLES) padded signals."""
    edge = N_FFT // 2  # centred frames: the signal reflected at both ends (torch.stft's default)
    padded = mx.concatenate([signals[:, edge:0:-1], signals, signals[:, -2:-edge - 2:-1]],
                            axis=1)
    rows, width = padded.shape
    frames = mx.as_strided(padded, (rows, 1 + (width - N_FFT) // HOP, N_FFT),
                           (width, HOP, 1))
    spectrum = mx.fft.rfft(frames * hann_window(), axis=-1)[:, :-1]
    power = mx.square(mx.abs(spectrum))
    mel = (power @ mel_filters(n_mels)).transpose(0, 2, 1)
    log_spec = mx.log10(mx.maximum(mel, 1e-10))
    floor = log_spec.max(axis=(1, 2), keepdims=True) - 8.0
    return (mx.maximum(log_spec, floor) + 4.0) / 4.0


def log_mel_batch(audios: Sequence[np.ndarray], n_mels: int) -> mx.array:
    """(len(audios), n_mels, 3000) float32 features of 16 kHz utterances (see the module)."""
    if not audios:
        return mx.zeros((0, n_mels, N_FRAMES), mx.float32)
    parts = []
    for start in range(0, len(audios), ROWS_AT_ONCE):
        signals = mx.array(np.stack([pad_or_trim(a) for a in audios[start:start + ROWS_AT_ONCE]]))
        try:
            part = _log_mel_rows(signals, n_mels)
            mx.eval(part)  # one chunk's framed copy at a time
        except RuntimeError:  # an MLX build whose GPU backend has no FFT: the CPU's
            with mx.stream(mx.cpu):
                part = _log_mel_rows(signals, n_mels)
                mx.eval(part)
        parts.append(part)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
    """(n_mels, 3000) float32 features of one 16 kHz utterance, as numpy."""
    return np.array(log_mel_batch([np.asarray(audio, np.float32)], n_mels)[0])
