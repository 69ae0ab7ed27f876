"""The utterances of a speech data set: audio paths, transcripts and ids, read from
- a jsonl file, one object a row, or a CSV file with a header row;
- a Hugging Face audiofolder: a folder whose `metadata.csv` (or `metadata.jsonl`) names each
  audio file in its `file_name` column beside its transcript. Its splits are its subfolders as
  audiofolder names them (train/ or training/; validation/, valid/, dev/ or val/; test/,
  testing/, eval/ or evaluation/), each with its own metadata file or named from the folder's
  top metadata file (`file_name` then starts with the split's folder); a folder without split
  subfolders is all training data.
Audio paths are relative to the file that names them. A row's utterance id is its `id`
column, else its audio path as the file gives it; ids are unique within a split. A bad row is
one ConfigError naming the file, its line and the fix.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlab.config.records import utf8_text
from mlxlab.data.completions import jsonl_lines
from mlxlab.errors import ConfigError, MissingFileError

# audiofolder's split folders (datasets' SPLIT_KEYWORDS), and its metadata files
SPLIT_FOLDERS = {"train": ("train", "training"),
                 "validation": ("validation", "valid", "dev", "val"),
                 "test": ("test", "testing", "eval", "evaluation")}
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
AUDIOFOLDER_AUDIO = "file_name"  # the column audiofolder names every file in


@dataclass(frozen=True)
class Columns:
    """Which columns hold a row's audio path, its transcript and (optionally) its id."""

    audio: str = AUDIOFOLDER_AUDIO
    text: str = "transcription"
    id: str | None = None

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> Columns:
        """The data.columns node ({audio, text, id}); another key is one ConfigError line."""
        unknown = sorted(set(node) - {"audio", "text", "id"})
        if unknown:
            raise ConfigError(f"data.columns has {unknown}: it names the audio, text and id "
                              "columns (data.columns.audio=path data.columns.text=sentence)")
        columns = cls(**node)
        for key in ("audio", "text", "id"):
            value = getattr(columns, key)
            if not (isinstance(value, str) and value) and not (key == "id" and value is None):
                raise ConfigError(f"data.columns.{key}={value!r}: give a column name")
        return columns


@dataclass
class Utterances:
    """One split's utterances, in file order: each audio file, its transcript, its id, and
    where the row is (`file:line`, for messages)."""

    paths: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, other: Utterances) -> None:
        for mine, theirs in ((self.paths, other.paths), (self.texts, other.texts),
                             (self.ids, other.ids), (self.where, other.where)):
            mine.extend(theirs)

    def take(self, index) -> Utterances:
        return Utterances([self.paths[i] for i in index], [self.texts[i] for i in index],
                          [self.ids[i] for i in index], [self.where[i] for i in index])


def _csv_rows(path: Path):
    reader = csv.DictReader(io.StringIO(utf8_text(path)))
    for number, row in enumerate(reader, 2):  # line 1 is the header
        if None in row:  # more cells than the header names
            raise ConfigError(f"{path}:{number} has more cells than the header's "
                              f"{len(reader.fieldnames or [])} columns; fix the row")
        yield number, row


def read_manifest(path: Path, columns: Columns, prefix: str = "") -> Utterances:
    """The rows of one jsonl or CSV file (by its suffix); with `prefix`, only the rows whose
    audio path starts with that folder (an audiofolder's top metadata file, one split)."""
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path} (set data.train_file= to a jsonl "
                               "or CSV of audio paths and transcripts, or an audiofolder)")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: speech data is a .jsonl or .csv file of audio paths and "
                          "transcripts, or an audiofolder folder with metadata.csv")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else jsonl_lines(path)
    out = Utterances()
    for number, row in rows:
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object of columns")
        for key in (columns.audio, columns.text, columns.id):
            if key is not None and not isinstance(row.get(key), str):
                raise ConfigError(f"{where} has no string column {key!r} (it has "
                                  f"{sorted(row)}); set data.columns.audio= / .text= / .id= "
                                  "to the file's column names")
        audio = row[columns.audio]
        if prefix and Path(audio).parts[:1] != (prefix,):
            continue
        if not row[columns.text].strip():
            raise ConfigError(f"{where}: the transcript of {audio} is empty; give its text or "
                              "remove the row")
        out.add(Utterances([path.parent / audio], [row[columns.text]],
                           [row[columns.id] if columns.id else audio], [where]))
    return out


def split_folders(folder: Path) -> dict[str, Path]:
    """{split: its subfolder} of an audiofolder, as audiofolder names them."""
    found: dict[str, Path] = {}
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        for split, names in SPLIT_FOLDERS.items():
            if child.name.lower() in names:
                if split in found:
                    raise ConfigError(f"{folder} has two {split} folders ({found[split].name}, "
                                      f"{child.name}); keep one")
                found[split] = child
    return found


def _metadata(folder: Path) -> Path | None:
    return next((folder / n for n in METADATA_FILES if (folder / n).is_file()), None)


def read_audiofolder(folder: Path, columns: Columns) -> dict[str, Utterances]:
    """{split: its utterances} of an audiofolder (see the module)."""
    if columns.audio != AUDIOFOLDER_AUDIO:
        raise ConfigError(f"data.columns.audio={columns.audio}: an audiofolder ({folder}) names "
                          f"its audio files in {AUDIOFOLDER_AUDIO}; leave data.columns.audio="
                          f"{AUDIOFOLDER_AUDIO}")
    top = _metadata(folder)
    splits = split_folders(folder)
    if not splits:
        if top is None:
            raise MissingFileError(f"{folder} has no metadata.csv: an audiofolder names its "
                                   "audio files in metadata.csv (columns file_name and the "
                                   "transcript)")
        return {"train": read_manifest(top, columns)}
    out = {}
    for split, sub in splits.items():
        own = _metadata(sub)
        if own is not None:
            out[split] = read_manifest(own, columns)
        elif top is not None:
            out[split] = read_manifest(top, columns, prefix=sub.name)
        else:
            raise MissingFileError(f"{sub} has no metadata.csv, nor has {folder}: give each "
                                   "split folder its metadata.csv (file_name, transcript)")
    if "train" not in out:
        raise ConfigError(f"{folder} has no train/ split folder (it has "
                          f"{sorted(p.name for p in splits.values())}); name the training "
                          "split's folder train/")
    return out


def check_unique(utterances: Utterances, what: str) -> None:
    seen: dict[str, str] = {}
    for uid, where in zip(utterances.ids, utterances.where):
        if uid in seen:
            raise ConfigError(f"{where}: utterance id {uid!r} is also on {seen[uid]}; {what} "
                              "ids must be unique (set data.columns.id= to a column of unique ids)")
        seen[uid] = where
