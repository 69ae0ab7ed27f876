"""An evaluation task: a jsonl file a user writes by hand, one example a line.

Three kinds, told apart by the keys of the rows (every row of a file must be of one kind):

- multiple choice: `prompt`, `choices` (a list of strings), `answer` (the index of the right
  choice, or the right choice itself). Scored as lm-eval-harness scores `output_type:
  multiple_choice`: the log-likelihood of " " + choice after the prompt; acc picks the highest,
  acc_norm the highest per character of the choice.
- generation: `prompt`, `answer` (a string, or a list of accepted strings): greedy decoding up to
  a token limit; exact_match and contains. An `image` (or `images`: a list) column shows the
  prompt's pictures to a vision-language model (paths relative to the task file, file:// or
  data: URLs), rendered by its chat template and laid out by its processor.
- perplexity: `text`: the token-weighted loss, perplexity and bits per byte of the text.
- transcription: `audio` (a sound file, relative to the task file) and `text`, its reference
  transcript (or data=speech's `file_name` and `transcription`: its validation file is a task):
  a speech model's transcription of each utterance, scored by word and character error rate
  after Whisper's normalization (evaluation/speech/). An utterance's id is its `id`, else its
  audio path as the row gives it.

Each example keeps an id, the row's `id` field or else its 0-based row number, so two models'
scores pair example by example (evaluation/paired.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlab.config.records import utf8_text
from mlxlab.errors import ConfigError, MissingFileError

MULTIPLE_CHOICE, GENERATION, PERPLEXITY = "multiple_choice", "generation", "perplexity"
TRANSCRIPTION = "transcription"
# a transcription row's sound file and reference: its own names, or data=speech's (audiofolder's)
AUDIO_KEYS, TRANSCRIPT_KEYS = ("audio", "file_name"), ("text", "transcription")
# The per-example scores of each kind and the task metrics computed from them.
METRICS = {
    MULTIPLE_CHOICE: ("acc", "acc_norm"),
    GENERATION: ("exact_match", "contains"),
    PERPLEXITY: ("loss", "perplexity", "bits_per_byte"),
    TRANSCRIPTION: ("wer", "cer"),
}
# Per-example scores that are right/wrong (paired by McNemar's test); the others are continuous.
BINARY_SCORES = ("acc", "acc_norm", "exact_match", "contains")
# The per-example score of each kind that pairs two runs (perplexity: each text's loss).
# (transcription: each utterance's word and character errors, paired as the corpus rates)
PAIRED_SCORES = {MULTIPLE_CHOICE: ("acc", "acc_norm"), GENERATION: ("exact_match", "contains"),
                 PERPLEXITY: ("loss",), TRANSCRIPTION: ("wer", "cer")}
_NAME = re.compile(r"^[A-Za-z0-9_.\- ]+$")  # what an MLflow metric key may hold


@dataclass(frozen=True)
class Example:
    """One row: its id and what the kind reads (prompt / choices / answer / text)."""

    id: str
    prompt: str = ""
    choices: tuple[str, ...] = ()
    answer: int | tuple[str, ...] | None = None  # choice index, or accepted generations
    text: str = ""
    images: tuple[str, ...] = ()  # generation: the pictures the prompt shows (resolved paths)
    audio: str = ""  # transcription: the utterance's sound file (resolved path); text its transcript


@dataclass(frozen=True)
class Task:
    """A task file read and checked: its name (the file's stem, the metrics' middle part
    `eval/<name>/<metric>`), kind and examples."""

    name: str
    kind: str
    path: Path
    examples: tuple[Example, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]


def kind_of(row: dict) -> str | None:
    """The kind a row's keys say, None when they say none."""
    if any(key in row for key in AUDIO_KEYS):
        return TRANSCRIPTION
    if "choices" in row:
        return MULTIPLE_CHOICE
    if "prompt" in row and "answer" in row:
        return GENERATION
    if "text" in row and "prompt" not in row:
        return PERPLEXITY
    return None


def read_task(path: str | Path) -> Task:
    """The task in a jsonl file; a bad line is one ConfigError naming the file, the line and
    the fix."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise MissingFileError(f"task file not found: {path} (give a jsonl of prompt/choices/"
                               "answer, prompt/answer, text or audio/text rows)")
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    if not _NAME.match(name):
        raise ConfigError(f"task file {path}: its name {name!r} becomes the metric "
                          f"eval/{name}/...; rename it to letters, digits, '_', '-', '.'")
    kind, examples, seen = None, [], {}
    for number, line in enumerate(utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON ({e.msg}): one JSON object a line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object: one object a line")
        this = kind_of(row)
        if this is None:
            raise ConfigError(f"{where} has keys {sorted(row)}: a task row has prompt, choices "
                              "and answer (multiple choice), prompt and answer (generation), "
                              "text (perplexity), or audio and text (transcription)")
        if kind is not None and this != kind:
            raise ConfigError(f"{where} is a {this} row in a {kind} task: one kind per file; "
                              "split the file")
        kind = this
        default = _audio_path(row) if this == TRANSCRIPTION else len(examples)
        example = _example(row, this, str(row.get("id", default)), where, path.parent)
        if example.id in seen:
            raise ConfigError(f"{where}: id {example.id!r} is also on line {seen[example.id]}; "
                              "ids pair examples across runs and must be unique")
        seen[example.id] = number
        examples.append(example)
    if not examples:
        raise ConfigError(f"task file {path} holds no rows")
    return Task(name, kind, path, tuple(examples))


def read_tasks(paths: list[str | Path]) -> list[Task]:
    """Several task files; two with one name (a/x.jsonl, b/x.jsonl) would log the same metrics."""
    tasks = [read_task(p) for p in paths]
    names: dict[str, Path] = {}
    for task in tasks:
        if task.name in names:
            raise ConfigError(f"tasks {names[task.name]} and {task.path} share the name "
                              f"{task.name!r} (their metrics eval/{task.name}/...): rename one")
        names[task.name] = task.path
    return tasks


def _images(row: dict, where: str, folder: Path) -> tuple[str, ...]:
    """A generation row's pictures, each checked to exist (data/images.py reads them)."""
    from mlxlab.data.images import image_bytes

    given = row.get("images", row.get("image"))
    if given is None:
        return ()
    given = given if isinstance(given, list) else [given]
    out = []
    for ref in given:
        try:
            name, source = image_bytes(ref, folder)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        out.append(ref if isinstance(source, bytes) else name)
    return tuple(out)


def _audio_path(row: dict) -> object:
    return next(row[key] for key in AUDIO_KEYS if key in row)


def _utterance(row: dict, ident: str, where: str, folder: Path) -> Example:
    """A transcription row: its sound file (checked to exist) and reference transcript."""
    audio = _audio_path(row)
    text = next((row[key] for key in TRANSCRIPT_KEYS if key in row), None)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: an audio row needs text (or transcription), its reference "
                          "transcript: a non-empty string")
    if not isinstance(audio, str) or not audio:
        raise ConfigError(f"{where}: audio must be the path of a sound file")
    path = folder / Path(audio).expanduser()  # an absolute path stays itself
    if not path.is_file():
        raise ConfigError(f"{where}: audio file {path} not found (paths are relative to the "
                          "task file)")
    return Example(ident, text=text, audio=str(path))


def _example(row: dict, kind: str, ident: str, where: str, folder: Path = Path(".")) -> Example:
    if kind == TRANSCRIPTION:
        return _utterance(row, ident, where, folder)
    if kind == PERPLEXITY:
        if not isinstance(row["text"], str) or not row["text"]:
            raise ConfigError(f"{where}: text must be a non-empty string")
        return Example(ident, text=row["text"])
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise ConfigError(f"{where}: prompt must be a string, got {type(prompt).__name__}")
    answer: Any = row.get("answer")
    if kind == GENERATION:
        accepted = answer if isinstance(answer, list) else [answer]
        if not accepted or not all(isinstance(a, str) and a.strip() for a in accepted):
            raise ConfigError(f"{where}: answer must be a non-empty string or a list of them")
        return Example(ident, prompt=prompt, answer=tuple(accepted),
                       images=_images(row, where, folder))
    choices = row["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ConfigError(f"{where}: choices must be a list of two or more non-empty strings")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ConfigError(f"{where}: answer {answer!r} must be the index of the right choice "
                          f"(0..{len(choices) - 1}) or the right choice itself")
    return Example(ident, prompt=prompt, choices=tuple(choices), answer=answer)
