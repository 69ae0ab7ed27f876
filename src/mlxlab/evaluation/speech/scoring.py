"""A transcription task scored on a Whisper model: each utterance read (16 kHz mono), turned
into log-mel features, transcribed (decoding/transcription.py: greedy, or a beam search of
eval.beam_size), and its words and characters compared with the reference (word_errors.py).

The task's metrics are the corpus rates (WER and CER: all errors over all reference words or
characters); each utterance's row keeps its counts, normalized reference and hypothesis and the
raw transcription, which `runs compare` pairs and a reader checks.
"""

from __future__ import annotations

import logging
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.speech.word_errors import (
    corpus_rates,
    normalizer_name,
    score_transcriptions,
    text_normalizer,
)
from mlxlab.evaluation.task_scores import TaskScores, eval_mode
from mlxlab.evaluation.tasks import TRANSCRIPTION, Task
from mlxlab.runtime.progress import Progress

log = logging.getLogger(__name__)


def is_speech_model(model: Any) -> bool:
    """A model that transcribes: Whisper's encoder-decoder (encode / decode over audio
    features), not a decoder of text."""
    from mlxlab.models.speech.whisper import WhisperModel

    return isinstance(model, WhisperModel)


def check_pairing(model: Any, tasks: list[Task]) -> None:
    """One ConfigError line when a task's kind does not fit the model: transcription tasks on a
    speech model, every other kind on a language model."""
    speech = is_speech_model(model)
    for task in tasks:
        if (task.kind == TRANSCRIPTION) != speech:
            raise ConfigError(
                f"task {task.name} is a {task.kind} task and the model "
                + ("transcribes speech: score only audio/text (transcription) tasks on it"
                   if speech else "is a language model: score transcription tasks (audio "
                   "rows) on a Whisper model"))


def transcription_prompts(settings: TaskSettings) -> str:
    """What the task's summary says about how it was scored (the `prompts` of other kinds): the
    language and normalizer (two runs pair only when they agree)."""
    language = settings.language or "en"
    return f"{language}, {normalizer_name(settings.normalizer, language)} normalizer"


def score_transcription(model: Any, tokenizer: Any, task: Task,
                        settings: TaskSettings) -> TaskScores:
    """`task`'s utterances transcribed by `model` (a Whisper; `tokenizer` its transformers
    WhisperTokenizer), `settings.batch_size` at a time, and scored per utterance."""
    from mlxlab.data.audio_features import log_mel_batch
    from mlxlab.data.audio_io import read_audio
    from mlxlab.decoding.transcription import transcribe

    language = settings.language or "en"
    normalize = text_normalizer(settings.normalizer, language)
    n_mels = int(model.config["num_mel_bins"])
    # Whisper's own limit on a sampled text: half the decoder's positions (224 of 448)
    limit = max(1, int(model.max_seq_len) // 2)
    outputs: list[str] = []
    progress = Progress(f"task {task.name}", len(task.examples), "utterances", log)
    try:
        with eval_mode(model):
            for start in range(0, len(task.examples), settings.batch_size):
                batch = task.examples[start:start + settings.batch_size]
                features = log_mel_batch([read_audio(ex.audio) for ex in batch], n_mels)
                outputs += transcribe(model, tokenizer, features, language=language,
                                      beam_size=settings.beam_size, max_new_tokens=limit)
                progress.add(len(batch))
    finally:
        progress.close()
    rows = score_transcriptions([ex.id for ex in task.examples],
                                [ex.text for ex in task.examples], outputs, normalize)
    return TaskScores(task.name, task.kind, corpus_rates(rows), rows,
                      prompts=transcription_prompts(settings))
