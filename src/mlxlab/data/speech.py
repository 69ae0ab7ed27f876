"""Audio and transcripts for fine-tuning a Whisper model (task="speech"): batches of log-mel
features, decoder inputs and labels, as transformers' Whisper fine-tuning recipe makes them.

The utterances are a jsonl or CSV file of audio paths and transcripts, or a Hugging Face
audiofolder (data/speech_rows.py); the validation split is `val_file`, else the audiofolder's
validation (or test) split, else the last `val_fraction` of the rows shuffled with split_seed.
Every audio file is read and checked when the module is built, before a run folder exists
(data/audio_checks.py: missing, unreadable, silent, longer than 30 s); so is every transcript's
length against the decoder's positions, when the model's folder is known then (`processor`,
model.pretrained in conf/data/speech.yaml).

The tokenizer is the model's (transformers' WhisperTokenizer from the model folder, or from the
run folder of a resumed run: data.tokenizer.path). A row's token sequence is the decoder prompt
<|startoftranscript|><|lang|><|transcribe|><|notimestamps|> (`language` by code or name,
`task`; each token found by its name, which is what transformers' prefix_tokens gives for a
Whisper vocabulary; language null: an English-only model's <|startoftranscript|><|notimestamps|>), the transcript's tokens, then <|endoftext|>. The batch's
`decoder_input_ids` are that sequence but its last token, right-padded with the model's pad
token; `labels` are the sequence but its first token (position t predicts token t + 1), with
-100 where no loss is taken: the padding, and the prompt's tokens after <|startoftranscript|>
(the language, task and no-timestamps tokens, which decoding forces) unless
`loss_on_prompt` (what transformers' DataCollatorSpeechSeq2SeqWithPadding does: its labels keep
them). A transcript is tokenized with a leading space (" Hello", the first token Whisper itself
decodes) unless `leading_space` is false (transformers' recipe, the bare text).
`input_features` are the utterances' log-mel features (data/audio_features.py), computed per
batch from the files; `index` is each row's place in its split, whose `utterance_ids` name it
(per-utterance metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.config.records import check_choice, check_fraction, check_number
from mlxlab.data.audio_checks import check_audio
from mlxlab.data.audio_features import log_mel_batch
from mlxlab.data.audio_io import read_audio
from mlxlab.data.batching import Batch, bucket_length
from mlxlab.data.fixed_rows import FixedBatchRows
from mlxlab.data.speech_rows import (
    Columns,
    Utterances,
    check_unique,
    read_audiofolder,
    read_manifest,
)
from mlxlab.data.tokenizer import tokenizer_hash
from mlxlab.errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")
IGNORE = -100  # a label position without loss (transformers' CrossEntropyLoss ignore_index)
DECODER_POSITIONS = 448  # Whisper's max_target_positions, where a folder does not say


def model_config(folder: str | Path | None) -> dict[str, Any]:
    """The folder's config.json ({} without one)."""
    return model_config_file(folder, "config.json")


def model_config_file(folder: str | Path | None, name: str) -> dict[str, Any]:
    """The folder's JSON file `name` ({} without one)."""
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def load_whisper_tokenizer(folder: str | Path):
    """transformers' WhisperTokenizer of `folder`, or one ConfigError line."""
    from transformers import WhisperTokenizer

    try:
        return WhisperTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{folder}: no Whisper tokenizer loads from it ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120]}); a Whisper model folder holds "
                          "tokenizer.json (or vocab.json and merges.txt)") from None


def decoder_prompt(tokenizer, language: str | None, task: str) -> list[int]:
    """<|startoftranscript|><|lang|><|task|><|notimestamps|> (language None: an English-only
    model's <|startoftranscript|><|notimestamps|>) as ids, each token found by its name: what
    transformers' prefix_tokens gives for a Whisper vocabulary, and what decoding forces. A
    language the tokenizer has no token for is one ConfigError line."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    names = ["<|startoftranscript|>"]
    if language is not None:
        code = TO_LANGUAGE_CODE.get(str(language).lower(), str(language).lower())
        names += [f"<|{code}|>", f"<|{task}|>"]
    names.append("<|notimestamps|>")
    vocab = tokenizer.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing and language is not None and missing[0] == names[1]:
        raise ConfigError(f"data.language={language!r}: the model's tokenizer has no "
                          f"{missing[0]} token; give a language Whisper knows, by code or name "
                          "(en, de, english, ...), or null for an English-only (.en) model")
    if missing:
        raise ConfigError(f"the model's tokenizer has no {missing[0]} token: it is not a "
                          "Whisper tokenizer; give the Whisper model's own folder")
    return [vocab[n] for n in names]


class Encoded:
    """One split's token sequences (prompt, transcript, end) and its utterances."""

    def __init__(self, utterances: Utterances, sequences: list[np.ndarray]):
        self.utterances, self.sequences = utterances, sequences

    def __len__(self) -> int:
        return len(self.sequences)


class SpeechTranscripts(FixedBatchRows):
    """Utterances for a Whisper model (see the module)."""

    task = "speech"
    num_labels = None

    def __init__(self, train_file: str, val_file: str | None = None,
                 val_fraction: float = 0.1, columns: Mapping[str, Any] | None = None,
                 language: str | None = "en", task: str = "transcribe",
                 processor: str | None = None, tokenizer: dict | None = None,
                 silence_floor: float = 1e-4, loss_on_prompt: bool = False,
                 leading_space: bool = True, seed: int = 0,
                 split_seed: int | None = None) -> None:
        super().__init__()
        check_fraction("data.val_fraction", val_fraction)
        check_choice("data.task", task, TASKS)
        check_number("data.silence_floor", silence_floor, float, 0.0)
        for name, value in (("loss_on_prompt", loss_on_prompt), ("leading_space", leading_space)):
            if not isinstance(value, bool):
                raise ConfigError(f"data.{name}={value!r}: use true or false")
        self.leading_space = leading_space
        self.train_file, self.val_file, self.path = train_file, val_file, str(train_file)
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.split_seed = int(seed if split_seed is None else split_seed)
        self.language, self.speech_task = language, task
        self.columns = Columns.of(columns or {})
        self.processor_folder = processor
        self.tokenizer_path = (tokenizer or {}).get("path")
        self.loss_on_prompt = loss_on_prompt
        # read and checked now: a bad row, file or transcript fails before anything exists
        self.splits = self._read()
        for name, utterances in self.splits.items():
            if not utterances:
                source = self.val_file if name == "val" and self.val_file else train_file
                raise ConfigError(f"{source}: its {name} split holds no utterances; add rows")
            check_unique(utterances, name)
            check_audio(utterances, float(silence_floor))
        self.tokenizer = self.whisper_tokenizer = None
        self.tokenizer_hash: str | None = None
        self.vocab_size: int | None = None
        if self._folder() is not None:
            self._encode_all()

    # ---- rows ------------------------------------------------------------------------------
    def _read(self) -> dict[str, Utterances]:
        source = Path(str(self.train_file)).expanduser()
        if source.is_dir():
            found = read_audiofolder(source, self.columns)
            held = next((s for s in ("validation", "test") if s in found), None)
            if held is not None and not self.val_file:
                log.info("%s: validating on its %s split", source, held)
                return {"train": found["train"], "val": found[held]}
            train = found["train"]
        else:
            train = read_manifest(source, self.columns)
        if self.val_file:
            return {"train": train, "val": read_manifest(Path(self.val_file), self.columns)}
        order = np.random.default_rng(self.split_seed).permutation(len(train))
        n_val = int(round(len(train) * self.val_fraction))
        if n_val < 1 or n_val >= len(train):
            raise ConfigError(f"data.val_fraction={self.val_fraction} of {len(train)} "
                              f"utterances holds out {n_val}: give data.val_file= or another "
                              "fraction")
        return {"train": train.take(order[n_val:]), "val": train.take(order[:n_val])}

    def _folder(self) -> Path | None:
        """Where the tokenizer is: data.tokenizer.path's folder (a resumed run's, or the model's
        as the run resolved it), else the model's folder; None while the model is a hub id the
        run has not resolved to a folder yet."""
        if self.tokenizer_path:
            return Path(self.tokenizer_path).parent
        folder = Path(str(self.processor_folder)).expanduser() if self.processor_folder else None
        return folder if folder is not None and folder.is_dir() else None

    def _model_config(self) -> dict[str, Any]:
        """The model folder's config.json (the tokenizer's folder's where the model is not a
        folder): transformers' keys, or mlx-whisper's."""
        folder = Path(str(self.processor_folder)).expanduser() if self.processor_folder else None
        config = model_config(folder if folder is not None and folder.is_dir() else
                              self._folder())
        # a CTranslate2 folder's config.json has no sizes: its preprocessor_config.json's
        # feature_size (faster-whisper's folders ship one), else Whisper's 80 (the objective
        # checks it against the model's before the first step)
        features = model_config_file(folder if folder is not None and folder.is_dir() else
                                     self._folder(), "preprocessor_config.json")
        return {"num_mel_bins": config.get("num_mel_bins", config.get(
                    "n_mels", features.get("feature_size", 80))),
                "max_target_positions": config.get("max_target_positions",
                                                   config.get("n_text_ctx", DECODER_POSITIONS)),
                "pad_token_id": config.get("pad_token_id")}

    # ---- tokens ----------------------------------------------------------------------------
    def _encode_all(self) -> None:
        config = self._model_config()
        self.n_mels = int(config["num_mel_bins"])
        self.max_length = int(config["max_target_positions"])
        self.whisper_tokenizer = load_whisper_tokenizer(self._folder())
        self.prompt = decoder_prompt(self.whisper_tokenizer, self.language, self.speech_task)
        self.end_id = int(self.whisper_tokenizer.eos_token_id)
        pad = config["pad_token_id"]
        pad = self.whisper_tokenizer.pad_token_id if pad is None else pad
        self.pad_id = int(self.end_id if pad is None else pad)
        self.tokenizer = self.whisper_tokenizer.backend_tokenizer
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self.vocab_size = len(self.whisper_tokenizer)
        self.train, self.val = (self._encode(self.splits[s]) for s in ("train", "val"))

    def _encode(self, utterances: Utterances) -> Encoded:
        """The split's token sequences; a transcript longer than the decoder takes is one
        ConfigError line naming its row."""
        # Whisper writes a transcript's first word with its leading space (" Hello"), as its
        # decoder produces it; transformers' recipe tokenizes the bare text (leading_space=false)
        texts = [" " + t.strip() if self.leading_space else t for t in utterances.texts]
        texts = self.whisper_tokenizer(texts, add_special_tokens=False).input_ids
        sequences = []
        for ids, path, where in zip(texts, utterances.paths, utterances.where):
            sequence = np.asarray([*self.prompt, *ids, self.end_id], np.int32)
            if len(sequence) - 1 > self.max_length:
                raise ConfigError(f"{where}: the transcript of {path} is {len(sequence) - 1} "
                                  f"decoder tokens with its prompt, over the decoder's "
                                  f"{self.max_length} (its config.json's "
                                  "max_target_positions); split the utterance or shorten its "
                                  "transcript")
            sequences.append(sequence)
        return Encoded(utterances, sequences)

    def setup(self, run_dir: str | Path | None = None) -> None:
        if self._folder() is None:
            raise ConfigError("data=speech tokenizes with the model's Whisper tokenizer: set "
                              "model.pretrained=<a Whisper model folder>")
        if self.whisper_tokenizer is None:
            self._encode_all()
        if run_dir is not None:  # the run's tokenizer: a resume and an export read this one
            self.tokenizer.save(str(Path(run_dir) / "tokenizer.json"))
        log.info("%s: %d train / %d val utterances, %d mel bins, prompt %s", self.train_file,
                 len(self.train), len(self.val), self.n_mels,
                 self.whisper_tokenizer.convert_ids_to_tokens(self.prompt))

    def utterance_ids(self, split: str = "val") -> list[str]:
        """The ids of `split`'s utterances (train | val), by a batch's `index`."""
        return list(self.splits[split].ids)

    # ---- batches ---------------------------------------------------------------------------
    def _collate(self, split: Encoded, index: np.ndarray, multiple: int,
                 least: list[int] | None = None) -> Batch:
        sequences = [split.sequences[i] for i in index]
        width = bucket_length(max(len(s) for s in sequences) - 1, multiple, self.max_length)
        inputs = np.full((len(index), width), self.pad_id, np.int32)
        labels = np.full((len(index), width), IGNORE, np.int32)
        unscored = 0 if self.loss_on_prompt else len(self.prompt) - 1
        for row, sequence in enumerate(sequences):
            n = len(sequence) - 1
            inputs[row, :n], labels[row, :n] = sequence[:-1], sequence[1:]
            labels[row, :unscored] = IGNORE
        audio = [read_audio(split.utterances.paths[i]) for i in index]
        return {"input_features": log_mel_batch(audio, self.n_mels),
                "decoder_input_ids": mx.array(inputs), "labels": mx.array(labels),
                "index": mx.array(np.asarray(index, np.int32))}
