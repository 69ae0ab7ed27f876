"""The transformers folder proved where it is written: transformers' WhisperForConditional-
Generation loads it (float32, CPU; a weight it finds no tensor for refuses the export) and
(a) computes mlxlab's logits on the probe (probe.py) within proof.TOLERANCE of their scale,
(b) its greedy `generate`, on the features WhisperProcessor loaded from the folder makes of the
probe audio, transcribes it as mlxlab does. Either failing refuses the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.export.hf import ExportError
from mlxlab.export.proof import compare, torch_logits, transformers_model
from mlxlab.export.speech.probe import (
    PROBE_NEW_TOKENS,
    SAMPLE_RATE,
    Probe,
    mlxlab_logits,
    speech_checker,
    transcript_mismatch,
)


def prove_hf_folder(model: Any, probe: Probe, folder: Path, checker_name: str) -> dict:
    """The check's record (export_report.json's "check"), or an ExportError line."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    theirs = transformers_model(WhisperForConditionalGeneration, folder)
    ours = mlxlab_logits(model, probe)
    inputs = {"input_features": torch.tensor(np.repeat(probe.features, 2, axis=0)),
              "decoder_input_ids": torch.tensor(probe.decoder_ids, dtype=torch.long)}
    record = compare(ours, torch_logits(theirs, inputs), probe.decoder_ids,
                     speech_checker(checker_name))
    try:
        processor = WhisperProcessor.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - any failure to load is the export's refusal
        raise ExportError(f"refused: transformers' WhisperProcessor does not load from the "
                          f"export ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
                          ) from err
    text, ids = generated(theirs, processor, probe, model.max_seq_len)
    if ids != probe.ids or text != probe.text:
        raise ExportError(transcript_mismatch(f"transformers' generate ({checker_name})", text,
                                              probe.text, probe.ids))
    record["transcript"] = {"text": text, "tokens": len(ids), "language": probe.language}
    return record


def generated(model: Any, processor: Any, probe: Probe, positions: int) -> tuple[str, list[int]]:
    """transformers' greedy transcript of the probe audio (the folder's processor makes its
    features) and its ids after the prompt, up to the end token. The prompt is given as
    decoder_input_ids to GenerationMixin.generate, the search Whisper's own generate hands a
    short audio to, with the folder's generation config (its suppressed tokens)."""
    import torch
    from transformers.generation.utils import GenerationMixin

    from mlxlab.decoding.transcription import prompt_for

    features = processor(probe.audio, sampling_rate=SAMPLE_RATE,
                         return_tensors="pt").input_features
    prompt = prompt_for(_Shape(model), processor.tokenizer, probe.language)
    new = min(PROBE_NEW_TOKENS, positions - 4)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its note that max_new_tokens overrides max_length
    with torch.no_grad():
        out = GenerationMixin.generate(model, features.float(),
                                       decoder_input_ids=torch.tensor([prompt.ids]),
                                       max_new_tokens=new, do_sample=False, num_beams=1)
    hf_logging.set_verbosity(verbosity)
    row = out[0].tolist()[len(prompt.ids):]
    ids = row[:row.index(prompt.eos)] if prompt.eos in row else row
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


class _Shape:
    """What decoding's prompt_for reads of a model, from a transformers Whisper's configs."""

    def __init__(self, model: Any):
        self.config = model.config.to_dict()
        self.generation_config = {k: v for k, v in model.generation_config.to_dict().items()
                                  if v is not None}
