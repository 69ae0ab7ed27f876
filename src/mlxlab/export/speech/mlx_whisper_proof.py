"""The mlx-whisper folder proved by reading back what was written.

- mlxlab reads it (models/speech/whisper_folder.py, the loader of mlx-whisper folders) and must
  compute the model's logits on the probe (probe.py) within proof.TOLERANCE of their scale: the
  names and axes are mlx-whisper's as mlxlab reads them (a float export; mlxlab loads no
  quantized Whisper).
- mlx-whisper itself, where it is installed: load_model reads the folder (a quantized one
  quantized as its config says) and its logits on the probe must be mlxlab's (a float export),
  and `mlx_whisper.transcribe(audio, path_or_hf_repo=FOLDER)`, greedy without timestamps and
  without its fallbacks, must transcribe the probe audio as mlxlab transcribes the log-mel
  features mlx-whisper's transcribe makes of it (probe.py says why those).

`transcriber` gives the written folder as mlx-whisper runs it, for the quantized export's
judgement (judgement.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlxlab.export.hf import ExportError
from mlxlab.export.proof import compare
from mlxlab.export.speech.probe import (
    PROBE_NEW_TOKENS,
    Probe,
    mlxlab_logits,
    speech_checker,
    transcript,
    transcript_mismatch,
)


def mlx_whisper_version() -> str | None:
    """'mlx-whisper <version>' where it imports, else None."""
    try:
        import mlx_whisper  # noqa: F401 - whether it imports here (it needs torch and numba)
    except ImportError:
        return None
    from importlib.metadata import version

    return f"mlx-whisper {version('mlx-whisper')}"


def prove_in_mlxlab(model: Any, probe: Probe, folder: Path) -> dict:
    """mlxlab's read-back of the float folder: its logits on the probe against the model's."""
    import mlx.core as mx

    from mlxlab.models.speech.whisper import WhisperModel

    try:
        written = WhisperModel(pretrained=str(folder))
    except (OSError, ValueError) as err:
        raise ExportError(f"refused: mlxlab does not read the written mlx-whisper folder back "
                          f"({err})") from err
    written.set_dtype(mx.float32)  # the values written, computed in float32 as the model's
    written.eval()
    return compare(mlxlab_logits(model, probe), mlxlab_logits(written, probe),
                   probe.decoder_ids, speech_checker("mlxlab (read back)"))


def prove_in_mlx_whisper(model: Any, tokenizer: Any, probe: Probe, folder: Path,
                         quantized: int | None) -> dict:
    """mlx-whisper's read-back (module docstring); a folder quantized to `quantized` bits is
    loaded and run (its transcript recorded), its loss judged by judgement.py, not here."""
    import mlx.core as mx
    from mlx_whisper.load_models import load_model

    name = mlx_whisper_version() or "mlx-whisper"
    try:
        theirs = load_model(str(folder), dtype=mx.float32)
    except Exception as err:  # noqa: BLE001 - any failure to load is the export's refusal
        raise ExportError(f"refused: {name} does not load the export ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160] if str(err) else ''})") from err
    theirs.set_dtype(mx.float32)  # the values written in float32 (a float16 folder's too)
    feats = mx.array(np.repeat(probe.features, 2, axis=0).transpose(0, 2, 1))
    logits = np.array(theirs(feats, mx.array(probe.decoder_ids, dtype=mx.int32)).astype(mx.float32))
    text = transcriber(folder, probe.language)([probe.audio])[0]
    if quantized:
        return {"status": "read back", "checker": name, "transcript": {"text": text},
                "why": f"a {quantized}-bit folder: {name} loaded and ran it; what the "
                       "quantization costs is judged apart (the report's retention)"}
    record = compare(mlxlab_logits(model, probe), logits, probe.decoder_ids,
                     speech_checker(name))
    ours, ids = transcript(model, tokenizer, mlx_whisper_features(probe.audio, model), probe.language)
    if text != ours:
        raise ExportError(transcript_mismatch(f"mlx_whisper.transcribe ({name})", text, ours, ids))
    record["transcript"] = {"text": text, "language": probe.language}
    return record


def mlx_whisper_features(audio: np.ndarray, model: Any) -> np.ndarray:
    """[1, n_mels, 3000]: the log-mel features mlx_whisper.transcribe decodes a (<= 30 s) audio
    from: its log-mel of the audio padded by 30 s of silence, the audio's frames kept and padded
    with zeros to 3000."""
    from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

    mel = log_mel_spectrogram(audio, n_mels=int(model.config["num_mel_bins"]), padding=N_SAMPLES)
    content = mel.shape[-2] - N_FRAMES
    segment = pad_or_trim(mel[:min(N_FRAMES, content)], N_FRAMES, axis=-2)
    return np.array(segment).T[None].astype(np.float32)


def transcriber(folder: Path, language: str, max_new_tokens: int | None = PROBE_NEW_TOKENS
                ) -> Callable[[Sequence[np.ndarray]], list[str]]:
    """The folder as mlx_whisper.transcribe runs it: greedy (temperature 0, no fallback),
    without timestamps, each audio on its own, in float32, at most `max_new_tokens` tokens a
    transcript (None: mlx-whisper's own cap, half the decoder's positions: 224, as mlxlab's
    transcribe)."""
    import mlx_whisper
    from mlx_whisper.transcribe import ModelHolder

    def run(audios: Sequence[np.ndarray]) -> list[str]:
        ModelHolder.model = ModelHolder.model_path = None  # a folder rewritten at the same path
        texts = []
        for audio in audios:
            result = mlx_whisper.transcribe(
                np.asarray(audio, dtype=np.float32), path_or_hf_repo=str(folder),
                temperature=0.0, without_timestamps=True, condition_on_previous_text=False,
                compression_ratio_threshold=None, logprob_threshold=None,
                no_speech_threshold=None, language=language, fp16=False, verbose=None,
                sample_len=max_new_tokens)
            texts.append(result["text"].strip())
        ModelHolder.model = ModelHolder.model_path = None
        return texts

    return run
