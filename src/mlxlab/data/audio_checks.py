"""Each utterance's audio checked before a run starts: a missing or unreadable file, a silent
one (its peak amplitude below a floor: an empty recording, a file of zeros), or one longer than
Whisper's 30 s window (its end would be cut from the features while its transcript keeps it)
is one ConfigError naming the row, the file and the fix.

Reading every file is the price of refusing bad audio before a run folder exists; what a file
measures (duration, peak) is kept per process, keyed by its path, size and modification time, so
the data module built again in the same process (the config check, then the run) reads no file
twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxlab.data.audio_features import CHUNK_SECONDS, SAMPLE_RATE
from mlxlab.data.audio_io import read_audio
from mlxlab.data.speech_rows import Utterances
from mlxlab.errors import ConfigError, MissingFileError

# (path, size, mtime) -> (seconds, peak amplitude)
_measured: dict[tuple[str, int, int], tuple[float, float]] = {}


def measure(path: Path) -> tuple[float, float]:
    """(duration in seconds, peak absolute amplitude) of an audio file at 16 kHz."""
    if not path.is_file():
        read_audio(path)  # raises the missing-file line
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _measured:
        audio = read_audio(path)
        _measured[key] = (len(audio) / SAMPLE_RATE,
                          float(np.abs(audio).max()) if audio.size else 0.0)
    return _measured[key]


def check_audio(utterances: Utterances, silence_floor: float) -> None:
    """Every utterance's audio is readable, heard and at most 30 s, or one ConfigError line."""
    for path, where in zip(utterances.paths, utterances.where):
        try:
            seconds, peak = measure(path)
        except (ConfigError, MissingFileError) as e:  # a row's file: the data is wrong
            raise ConfigError(f"{where}: {e}") from None
        if peak <= silence_floor:
            raise ConfigError(f"{where}: audio {path} is silent (peak amplitude {peak:.2g}, at "
                              f"or below data.silence_floor={silence_floor:g}); re-record or "
                              "remove the row, or lower data.silence_floor for very quiet "
                              "audio")
        if seconds > CHUNK_SECONDS:
            raise ConfigError(f"{where}: audio {path} is {seconds:.1f} s, longer than "
                              f"Whisper's {CHUNK_SECONDS} s window (the features would cut its "
                              "end, the transcript would not); split it into utterances of at "
                              "most 30 s, or remove the row")
