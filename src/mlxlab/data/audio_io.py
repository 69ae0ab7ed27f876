"""Audio files read as Whisper hears them: float32 samples, mono, 16 kHz.

WAV, FLAC and OGG are decoded by soundfile (libsndfile); stereo and other multi-channel audio is
downmixed by the mean of its channels (as Hugging Face datasets' Audio feature and Whisper's
ffmpeg call do); another sampling rate is resampled with soxr at its high quality (soxr's
"HQ"), librosa's default resampler (soxr_hq): band-limited to just below 8 kHz with a flat
passband, where scipy's resample_poly (which would need no extra) designs a fixed-length Kaiser
filter whose passband droops toward 8 kHz, a band Whisper's 80 / 128 mel bins reach. soxr is
also the faster of the two on long files.
Both packages are the `speech` extra (pip install 'mlxlab[speech]').

A missing or unreadable file is one ConfigError naming it and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxlab.errors import ConfigError, MissingFileError

SAMPLE_RATE = 16_000  # what every Whisper model hears
EXTRA = "pip install 'mlxlab[speech]'"


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package without its libsndfile
        raise ConfigError(f"reading audio needs soundfile: {EXTRA}") from None
    return soundfile


def resample(audio: np.ndarray, rate: int, to: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` (float32, mono) at `rate` Hz as `to` Hz (soxr, high quality)."""
    if rate == to:
        return audio
    try:
        import soxr
    except ImportError:
        raise ConfigError(f"resampling audio from {rate} Hz needs soxr: {EXTRA}") from None
    return soxr.resample(audio, rate, to, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | Path) -> np.ndarray:
    """The file's samples as float32 mono at 16 kHz (see the module)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"audio file not found: {path}; fix its path in the data file "
                               "(paths are relative to the data file's folder)")
    try:
        audio, rate = _soundfile().read(str(path), dtype="float32", always_2d=True)
    except ConfigError:
        raise
    except Exception as e:  # libsndfile raises several kinds for a bad file
        raise ConfigError(f"audio file {path} cannot be read ({type(e).__name__}: "
                          f"{str(e).strip()[:120]}); give a WAV, FLAC or OGG file (convert "
                          "others with ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)") from None
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    return resample(np.ascontiguousarray(mono), int(rate))
