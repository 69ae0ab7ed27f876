"""Speech data made at test time, offline: a WhisperTokenizer with every language token laid out
as Whisper's are (transformers' prefix_tokens computes their ids from that order), and
synthesized audio files with their rows (tiny Whisper folders: tests/whisper_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from whisper_fixtures import SAMPLE_RATE, tone


def whisper_tokenizer():
    """A WhisperTokenizer over the 256 byte symbols (no merges) plus Whisper's special tokens:
    <|endoftext|>, <|startoftranscript|>, the language tokens in Whisper's order, the tasks,
    <|notimestamps|>."""
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    specials = ["<|startoftranscript|>", *[f"<|{code}|>" for code in LANGUAGES],
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def write_audio(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), audio, rate)
    return path


def utterance_set(folder: Path, n: int = 6, prefix: str = "") -> list[dict]:
    """`n` tone files of 1-3 s under `folder`/`prefix` and their rows (file_name, a transcript
    naming the tone)."""
    words = ["low hum", "a bright tone", "the middle note", "high whistle", "soft beep",
             "long chime", "short click", "deep drone"]
    rows = []
    for i in range(n):
        name = f"{prefix}utt{i}.wav"
        write_audio(folder / name, tone(1.0 + (i % 3), 200.0 + 150 * i, seed=i))
        rows.append({"file_name": name, "transcription": words[i % len(words)]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
