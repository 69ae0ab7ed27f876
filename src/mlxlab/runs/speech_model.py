"""A Whisper model a verb names, loaded to transcribe: a transformers or mlx-whisper folder, or a
finished speech run (data=speech: its best or last checkpoint), with transformers'
WhisperTokenizer it decodes with (the folder's; a run's that of the Whisper folder it was
trained from, which data=speech tokenized with). `mlxlab eval` scores transcription tasks on it
(evaluation/speech/).
"""

from __future__ import annotations

from pathlib import Path

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.runs.model_source import RUN, open_model_source
from mlxlab.runs.named_model import EvalModel

WHISPER = "mlxlab.models.speech.whisper.WhisperModel"  # conf/model/whisper.yaml's _target_


def speech_run_config(path: Path, which: str) -> dict | None:
    """The saved config of a run folder whose model is a Whisper, else None."""
    from mlxlab.checkpoint import CheckpointState
    from mlxlab.runs import choose_checkpoint

    try:
        state = CheckpointState.read(choose_checkpoint(path, which))
    except (FileNotFoundError, ValueError):
        return None
    return state.config if (state.config.get("model") or {}).get("_target_") == WHISPER else None


def is_speech_source(name: str | Path, which: str = "best") -> bool:
    """Whether `name` is a Whisper folder or a finished speech run (nothing is loaded)."""
    from mlxlab.data.speech import model_config
    from mlxlab.models.speech.whisper_folder import is_whisper_config

    try:
        source = open_model_source(name)
    except MissingFileError:
        return False
    if source.kind == RUN:
        return speech_run_config(source.path, which) is not None
    return is_whisper_config(model_config(source.path))


def load_speech_model(name: str | Path, which: str = "best") -> EvalModel:
    """The Whisper `name` names (is_speech_source) in eval mode, with its WhisperTokenizer."""
    from mlxlab.data.speech import load_whisper_tokenizer
    from mlxlab.models.speech.whisper import WhisperModel

    source = open_model_source(name)
    if source.kind != RUN:
        model = WhisperModel(pretrained=str(source.path))
        model.eval()
        return EvalModel(model, load_whisper_tokenizer(source.path),
                         source.path, source.kind, tokenizer_folder=source.path,
                         provenance=source.provenance)
    from mlxlab.runs.model import load_run_model

    config = speech_run_config(source.path, which)
    folder = (config or {}).get("model", {}).get("pretrained")
    if not folder or not Path(folder).expanduser().is_dir():
        raise ConfigError(f"{source.path} was trained from the Whisper folder {folder}, which "
                          "is gone: its WhisperTokenizer files decode the run's transcriptions; "
                          "restore the folder")
    model, state = load_run_model(source.path, which)
    tokenizer = load_whisper_tokenizer(Path(folder).expanduser())
    return EvalModel(model, tokenizer, source.path, RUN, state.path, state.run_id,
                     tokenizer_folder=Path(folder).expanduser())
