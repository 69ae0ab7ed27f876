"""Tiny random Whisper folders as transformers saves them (no network): a WhisperConfig of a
few layers, its WhisperForConditionalGeneration's weights, a byte-level WhisperTokenizer over a
small vocabulary with Whisper's special tokens, the feature extractor's settings and a
generation config that names the special tokens as Whisper checkpoints' do; and audio
synthesized at test time (tones and noise, 16 kHz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
# Whisper's special tokens in its own order (the end of text first, then the start of
# transcript, the languages, the tasks, ..., no timestamps)
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
            "<|notimestamps|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("a", "t"),
          ("Ġc", "at"), ("Ġ", "c"), ("Ġh", "at"), ("Ġ", "h")]


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A WhisperTokenizer (byte-level BPE: the 256 bytes and MERGES, then SPECIALS) saved into
    `folder`; returns the special tokens' ids."""
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {chars[b]: i for i, b in enumerate(range(256))}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    source = folder / "bpe"
    source.mkdir(exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tok = WhisperTokenizer(str(source / "vocab.json"), str(source / "merges.txt"))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.save_pretrained(str(folder))
    return dict(zip(SPECIALS, tok.convert_tokens_to_ids(SPECIALS), strict=True))


def whisper_folder(folder: Path, n_mels: int = 80, seed: int = 0, vocab_size: int = 288,
                   layers: int = 2, d_model: int = 64, end_bias: float = 0.5,
                   spread: float = 0.3) -> Path:
    """A tiny random WhisperForConditionalGeneration saved by transformers into `folder`, with
    its tokenizer, feature extractor and generation config. The end token's embedding points
    along the decoder's final LayerNorm bias (of norm `end_bias`), raising its logit by about
    3 * end_bias: some transcripts end before a short token limit and others do not."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    ids = write_tokenizer(folder)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, num_mel_bins=n_mels, max_source_positions=1500,
        max_target_positions=64, decoder_start_token_id=sot, pad_token_id=eot,
        eos_token_id=eot, bos_token_id=eot, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # weights of std `spread`: large enough that tokens differ by row
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, spread)
        direction = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
        model.model.decoder.layer_norm.bias.copy_(end_bias * direction)
        model.model.decoder.embed_tokens.weight[eot] = 3.0 * direction
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=64, suppress_tokens=[], begin_suppress_tokens=[eot],
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|de|>": ids["<|de|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    model.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(str(folder))
    return folder


def tone(seconds: float, hz: float, seed: int = 0) -> np.ndarray:
    """A tone with a little noise, float32 mono at 16 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def features(audios: list[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """transformers' WhisperFeatureExtractor's [B, n_mels, 3000] log-mel features."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
