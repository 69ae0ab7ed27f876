"""Speech test material made at test time, offline: a tiny random Whisper folder with a small
byte-level WhisperTokenizer (every Whisper special token, ids laid out as Whisper's are, so
transformers' prefix_tokens find the language tokens), and synthesized audio files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


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


def tiny_whisper(folder: Path, n_mels: int = 80, max_target_positions: int = 64,
                 seed: int = 0) -> Path:
    """A random WhisperForConditionalGeneration (d_model 64, 2 + 2 layers) saved by
    transformers into `folder`, with the tokenizer above."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tokenizer = whisper_tokenizer()
    sot, eot = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|endoftext|>"])
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=n_mels, d_model=64,
                           encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                           max_source_positions=1500,
                           max_target_positions=max_target_positions,
                           decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot,
                           eos_token_id=eot, begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.3, seed: int = 0
         ) -> np.ndarray:
    """A sine at `freq` with a little noise, float32 at 16 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * noise).astype(np.float32)


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
