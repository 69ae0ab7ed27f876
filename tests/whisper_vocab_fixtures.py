"""A tiny random Whisper on OpenAI's own multilingual vocabulary (51865 tokens), the folder
mlx-whisper can run: mlx-whisper decodes with tiktoken's encoding it ships (chosen by n_vocab),
so the model's tokenizer must be that vocabulary at Whisper's ids. The tokenizer is built
offline from mlx-whisper's assets/multilingual.tiktoken (each token's bytes and rank = id;
no merges: it decodes as Whisper's does, which is all transcription needs), then Whisper's
special tokens in Whisper's order (<|endoftext|> 50257, <|startoftranscript|> 50258, 99
languages, the tasks, ..., <|notimestamps|> 50363, the 1501 timestamps). The generation
config suppresses what mlx-whisper's transcribe suppresses (its non-speech tokens and the
special ones; a space or the end as the first token), so all three decoders decode alike."""

from __future__ import annotations

import base64
import json
from pathlib import Path

VOCAB = 51865
LANGUAGE_COUNT = 99  # a 51865-token Whisper's (large-v3's 51866 adds Cantonese)


def openai_tokenizer(folder: Path):
    """The WhisperTokenizer described above, saved into `folder`."""
    from mlx_whisper import tokenizer as mlx_tokenizer
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    chars = bytes_to_unicode()
    ranks = Path(mlx_tokenizer.__file__).parent / "assets" / "multilingual.tiktoken"
    vocab = {}
    for line in ranks.read_text().splitlines():
        token, rank = line.split()
        vocab["".join(chars[b] for b in base64.b64decode(token))] = int(rank)
    source = folder / "bpe"
    source.mkdir(parents=True, exist_ok=True)
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")
    tok = WhisperTokenizer(str(source / "vocab.json"), str(source / "merges.txt"))
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:LANGUAGE_COUNT]]
    specials = ["<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
                *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    tok.add_special_tokens({"additional_special_tokens": specials})
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|notimestamps|>") == 50363
    tok.save_pretrained(str(folder))
    return tok


def mlx_whisper_suppression() -> tuple[list[int], list[int]]:
    """(suppress_tokens, begin_suppress_tokens) as mlx_whisper.transcribe applies them."""
    from mlx_whisper.tokenizer import get_tokenizer

    tok = get_tokenizer(True, num_languages=LANGUAGE_COUNT, language="en", task="transcribe")
    always = [*tok.non_speech_tokens, tok.translate, tok.transcribe, tok.sot, tok.sot_prev,
              tok.sot_lm, tok.no_speech]
    return sorted(set(always)), [*tok.encode(" "), tok.eot]


def openai_vocab_folder(folder: Path, seed: int = 0, end_bias: float = 0.5,
                        spread: float = 0.3) -> Path:
    """A tiny random WhisperForConditionalGeneration (width 64, 2 + 2 layers, 80 mel bins) on
    the 51865-token vocabulary, saved by transformers with the tokenizer, the feature
    extractor and a generation config (module docstring); its end token raised as
    whisper_fixtures.whisper_folder raises it, so transcripts end; no special token after it
    is ever chosen (mlx-whisper's transcribe reads timestamps a model emits even when asked
    for none)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    tok = openai_tokenizer(folder)
    token = tok.convert_tokens_to_ids
    eot, sot = token("<|endoftext|>"), token("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
        decoder_ffn_dim=256, num_mel_bins=80, max_source_positions=1500,
        max_target_positions=448, decoder_start_token_id=sot, pad_token_id=eot,
        eos_token_id=eot, bos_token_id=eot)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "encoder.embed_positions" not in name:  # Whisper's sinusoids
                p.normal_(0, spread)
        direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
        model.model.decoder.layer_norm.bias.copy_(end_bias * direction)
        model.model.decoder.embed_tokens.weight[eot] = 3.0 * direction
        # the special tokens after the end (the prompt's, the timestamps) at logit 0, under
        # the best of 50257 random text logits: never chosen, as a trained model's
        model.model.decoder.embed_tokens.weight[eot + 1:] = 0.0
    suppress, begin = mlx_whisper_suppression()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=448, suppress_tokens=suppress, begin_suppress_tokens=begin,
        no_timestamps_token_id=token("<|notimestamps|>"), is_multilingual=True,
        lang_to_id={t: token(t) for t in ("<|en|>", "<|de|>")},
        task_to_id={"transcribe": token("<|transcribe|>"), "translate": token("<|translate|>")},
        alignment_heads=[[1, 0], [1, 2]])
    model.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(folder))
    return folder
