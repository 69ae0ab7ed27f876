"""Transcription (decoding/transcription.py) token for token against transformers' `generate`
on a tiny random Whisper folder: greedy and beam search (num_beams 2 and 3), a batch of audios
of different lengths with Whisper's forced prompt <|startoftranscript|><|en|><|transcribe|>
<|notimestamps|>; some transcripts end at <|endoftext|> before the limit and some run to it, so
both ends of the search are compared.

The reference is transformers' GenerationMixin.generate, the search WhisperForConditional-
Generation.generate hands a short (<= 30 s) audio to, with the folder's generation config (its
suppressed tokens) and the prompt as decoder_input_ids. Whisper's own generate wrapper is not
called: on this random model (transformers 5.24) it answers a batch of four with one row when
given language="en", and treats decoder_input_ids as a long-form prompt."""

from __future__ import annotations

import pytest

from mlxlab.decoding.transcription import transcribe, transcribe_ids
from mlxlab.models.speech.whisper import WhisperModel
from whisper_fixtures import features, tone, whisper_folder

MAX_NEW = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    folder = whisper_folder(tmp_path_factory.mktemp("whisper"))
    reference = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    feats = features([tone(1.0, 440), tone(2.0, 880, seed=1), tone(0.5, 300, seed=2),
                      tone(3.0, 200, seed=3)])
    return folder, reference.eval(), tokenizer, feats, WhisperModel(pretrained=str(folder))


def generated(reference, tokenizer, feats, beams):
    """transformers' tokens after the prompt, up to the end token."""
    import torch
    from transformers.generation.utils import GenerationMixin

    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                              "<|notimestamps|>"])
    with torch.no_grad():
        out = GenerationMixin.generate(reference, torch.tensor(feats),
                                       decoder_input_ids=torch.tensor([prompt] * len(feats)),
                                       max_new_tokens=MAX_NEW, do_sample=False, num_beams=beams)
    rows = [r.tolist()[len(prompt):] for r in out]
    eos = tokenizer.eos_token_id
    return [r[:r.index(eos)] if eos in r else r for r in rows]


@pytest.mark.parametrize("beams", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_tokens_equal_transformers_generate(setup, beams):
    _, reference, tokenizer, feats, model = setup
    expected = generated(reference, tokenizer, feats, beams)
    ours = transcribe_ids(model, tokenizer, feats, beam_size=beams, max_new_tokens=MAX_NEW)
    assert ours == expected
    lengths = {len(r) for r in ours}
    assert min(lengths) < MAX_NEW  # some end at <|endoftext|> ...
    if beams == 1:
        assert MAX_NEW in lengths  # ... and some run to the limit
    texts = transcribe(model, tokenizer, feats, beam_size=beams, max_new_tokens=MAX_NEW)
    assert texts == [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]


def test_bad_settings(setup):
    _, _, tokenizer, feats, model = setup
    with pytest.raises(ValueError, match="no <\\|fr\\|> token"):
        transcribe(model, tokenizer, feats[:1], language="fr")
    with pytest.raises(ValueError, match="max_new_tokens=224: between 1 and 60"):
        transcribe(model, tokenizer, feats[:1])
    with pytest.raises(ValueError, match="beam_size=0"):
        transcribe(model, tokenizer, feats[:1], beam_size=0, max_new_tokens=4)
