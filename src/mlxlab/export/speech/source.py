"""The Whisper an export writes: a finished speech run (model=whisper; its best checkpoint,
pinned while it is read, LoRA fused into the weights) or a Whisper folder (transformers,
mlx-whisper or CTranslate2), with the WhisperTokenizer of the folder it was trained from and
that folder's path, where the tokenizer and feature-extractor files come from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlab.export.hf import ExportError
from mlxlab.export.pin import pinned_checkpoint, unfinished_note
from mlxlab.models.adapters.lora import fuse_lora, has_adapters
from mlxlab.models.speech.whisper import WhisperModel
from mlxlab.models.speech.whisper_folder import is_whisper_folder
from mlxlab.runs.model_source import RUN, open_model_source
from mlxlab.runs.speech_model import speech_run_config


@dataclass
class WhisperSource:
    """The model as it is written (LoRA fused, float32, eval mode), its tokenizer, the base
    folder its tokenizer and feature extractor come from, and where it came from: `path` (the
    run or the folder), `checkpoint` (a run's, else None), `step`, `lora` (whether adapters were
    fused), `note` (an unfinished run's line), `config` (a run's saved config, else {})."""

    model: WhisperModel
    tokenizer: Any
    base_folder: Path
    path: Path
    checkpoint: Path | None = None
    step: int | None = None
    lora: bool = False
    note: str | None = None
    config: dict | None = None
    run_id: str | None = None


def is_whisper_source(name: str | Path) -> bool:
    """Whether `name` is a Whisper folder or a run of model=whisper (nothing is loaded)."""
    path = Path(name).expanduser()
    if not path.exists():
        return False
    if is_whisper_folder(path):
        return True
    try:
        source = open_model_source(str(path))
        return source.kind == RUN and speech_run_config(source.path, "best") is not None
    except (OSError, ValueError):  # not a run mlxlab reads: the text exports say what it is
        return False


@contextmanager
def whisper_source(name: str | Path) -> Iterator[WhisperSource]:
    """The Whisper `name` names, loaded for the block (a run's checkpoint stays pinned)."""
    from mlxlab.data.speech import load_whisper_tokenizer

    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a speech run (outputs/<task>/"
                                "<time>) or a Whisper folder")
    if is_whisper_folder(path):
        model = WhisperModel(pretrained=str(path))
        yield _ready(WhisperSource(model, load_whisper_tokenizer(path), path, path))
        return
    from mlxlab.runs import load_run_model

    with pinned_checkpoint(path) as (chosen, copy):
        model, state = load_run_model(copy)
        if not isinstance(model, WhisperModel):
            raise ExportError(f"{path} is not a speech run (model=whisper)")
        base = Path(model.processor_folder or "")
        if not model.processor_folder or not base.is_dir():
            raise ExportError(f"{path} was trained from the Whisper folder "
                              f"{model.processor_folder}, which is gone: its tokenizer and "
                              "feature extractor go into the export; restore the folder")
        run_folder = chosen.parent.parent if chosen.parent.name == "checkpoints" else path
        source = WhisperSource(model, load_whisper_tokenizer(base), base, path, chosen,
                               state.step, has_adapters(model),
                               unfinished_note(run_folder, state.step, state.config),
                               state.config, state.run_id)
        yield _ready(source)


def _ready(source: WhisperSource) -> WhisperSource:
    """LoRA fused into the weights, float32, eval mode: the model every check computes with."""
    import mlx.core as mx

    if source.lora:
        fuse_lora(source.model)
    source.model.set_dtype(mx.float32)
    source.model.eval()
    return source
