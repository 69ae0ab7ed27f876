"""Tiny random Whisper folders whisper.cpp can run (no network): whisper.cpp lays Whisper's
special tokens out at fixed ids (<|endoftext|> 50257 in a multilingual vocabulary of 51,865,
<|startoftranscript|> after it, 99 languages, the tasks, <|notimestamps|>, 1,501 timestamps),
so the folder's tokenizer has Whisper's full layout: the 256 byte symbols, ASCII filler words
up to 50,257 regular tokens, then the special tokens. The model is a few layers wide
(transformers' WhisperForConditionalGeneration, random weights); its generation config
suppresses what whisper.cpp always suppresses (the special tokens, the timestamps) and, as a
first token, a blank or the end (whisper.cpp's suppress_blank), as real checkpoints' do."""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

REGULAR = 50257  # a multilingual Whisper's regular tokens: <|endoftext|> is id 50257
N_LANGUAGES = 99  # whisper-tiny ... large-v2 (large-v3 adds yue: 51,866)
N_TIMESTAMPS = 1501


def _filler(count: int) -> list[str]:
    """`count` distinct lower-case ASCII words of 2-4 letters, every other one with BPE's
    leading-space marker (Ġ)."""
    words = itertools.chain(*(itertools.product(string.ascii_lowercase, repeat=n)
                              for n in (2, 3, 4)))
    return [("Ġ" if i % 2 else "") + "".join(w) for i, w in zip(range(count), words)]


def whisper_cpp_tokenizer(folder: Path) -> dict[str, int]:
    """Whisper's full multilingual layout as a WhisperTokenizer saved into `folder`; returns
    the special tokens' ids."""
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {chars[b]: i for i, b in enumerate(range(256))}
    for word in _filler(REGULAR - 256):
        vocab[word] = len(vocab)
    vocab["<|endoftext|>"] = REGULAR
    source = folder / "bpe"
    source.mkdir(exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:N_LANGUAGES]]
    specials = ["<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
                *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]]
    tok = WhisperTokenizer(str(source / "vocab.json"), str(source / "merges.txt"),
                           pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[:-N_TIMESTAMPS]})
    tok.add_tokens(specials[-N_TIMESTAMPS:])
    tok.save_pretrained(str(folder))
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|notimestamps|>",
             "<|translate|>", "<|transcribe|>", "<|0.00|>"]
    ids = dict(zip(names, tok.convert_tokens_to_ids(names), strict=True))
    assert len(tok) == REGULAR + 1 + len(specials), len(tok)
    return ids


def whisper_cpp_folder(folder: Path, n_mels: int = 80, seed: int = 0, layers: int = 2,
                       d_model: int = 64, text_positions: int = 20, active: int = 16,
                       cross: float = 3.0, conv: float = 0.3) -> Path:
    """A tiny random multilingual Whisper (vocabulary 51,865) saved by transformers into
    `folder`, with the tokenizer above, its feature extractor and generation config.

    Its weights are shaped so that its greedy transcripts are short, depend on long audio
    (`long_tone`), and mostly keep their argmax under float16 (whisper.cpp's f16 weights,
    activations and caches): `active` tokens have embeddings of norm ~8, every other row a
    thousandth of that; the body's weights are small (std 0.09: perturbations shrink through
    the layers); the cross-attention's queries and keys small too (it averages the encoder's
    frames, no saturated softmax to flip) and its values and output large (std `cross`: the
    audio steers the decoder), the convolutions' weights of std `conv`; the end token's
    embedding points along the decoder's final LayerNorm bias (norm 1.8). `text_positions`
    20 lets whisper.cpp decode 5 tokens (n_text_ctx / 2 - 5)."""
    import numpy as np
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    ids = whisper_cpp_tokenizer(folder)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    vocab_size = REGULAR + 1 + 1 + N_LANGUAGES + 6 + N_TIMESTAMPS
    config = WhisperConfig(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, num_mel_bins=n_mels, max_source_positions=1500,
        max_target_positions=text_positions, decoder_start_token_id=sot, pad_token_id=eot,
        eos_token_id=eot, bos_token_id=eot, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                steer = "encoder_attn.v_proj" in name or "encoder_attn.out_proj" in name
                p.normal_(0, cross if steer else 0.09)
        model.model.decoder.embed_positions.weight.normal_(0, 0.3)
        for layer in (model.model.encoder.conv1, model.model.encoder.conv2):
            layer.weight.normal_(0, conv)
        direction = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
        embed = model.model.decoder.embed_tokens.weight
        embed.normal_(0, 0.006)
        chosen = rng.choice(np.arange(256, REGULAR - 1), active, replace=False)
        embed[torch.as_tensor(chosen)] = torch.as_tensor(
            rng.normal(0, 1.0, (active, d_model)), dtype=embed.dtype)
        embed[eot] = 3.0 * direction
        model.model.decoder.layer_norm.bias.copy_(1.8 * direction)
    space = 32  # the byte symbol of " " (id = its byte here)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=text_positions, suppress_tokens=list(range(sot, vocab_size)),
        begin_suppress_tokens=[space, eot], no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    model.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(str(folder))
    return folder


def long_tone(i: int):
    """Utterance `i` of the probe: a 22-28 s tone with a little noise (long, so the frames the
    cross-attention averages differ from clip to clip; whisper.cpp's window is 30 s)."""
    from whisper_fixtures import tone

    return tone(28.0 - 2 * (i % 4), 150.0 + 310 * i, seed=i)
