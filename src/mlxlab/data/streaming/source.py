"""Where the documents come from (`data.source`): a Hugging Face hub dataset, streamed, or local
txt/jsonl/json/parquet/csv files read 1 MB at a time; each example's text, stripped."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError, MissingFileError

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
READ_CHUNK = 1 << 20
DOC_ID = "_mlxlab_doc"  # the column the training stream adds: a document's position in the split
# Whether this process lets datasets import PyTorch when a stream is opened (leave_out_torch).
_torch_hooks = True


def leave_out_torch() -> None:
    """This process feeds MLX, never torch's DataLoader: the streams it opens skip datasets' torch
    hooks (an epoch counter in shared memory for DataLoader workers, a torch IterableDataset
    base class), whose `import torch` is 2-4 s of a run's start where PyTorch is installed. Only
    mlxlab-train's jobs ask for it (train.py `job`): a process that also uses datasets with
    torch (a notebook calling `train`, the test process) keeps them."""
    global _torch_hooks
    _torch_hooks = False


def _datasets() -> Any:
    """The datasets package (a slow import: only when a stream is opened), without its torch
    hooks where this process left them out."""
    import datasets

    if not _torch_hooks:
        datasets.config.TORCH_AVAILABLE = False
    return datasets


def _listed(data_files: Any) -> list:
    """The file patterns of `data_files`: one, a list, or {split: one or a list}."""
    files = data_files if isinstance(data_files, (list, dict)) else [data_files]
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    return files


def _builder_for(data_files: Any) -> str:
    files = _listed(data_files)
    kinds = {BUILDERS.get(Path(str(f)).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise ConfigError(
            f"data.source.data_files={data_files}: use files of one kind, "
            f"ending in one of {sorted(BUILDERS)}"
        )
    for f in files:
        if not glob.glob(str(f)):
            raise MissingFileError(
                f"data file not found: {f} (set data.source.data_files= to a local file)"
            )
    return kinds.pop()


@dataclass
class TextSource:
    """`dataset_id` (+ `dataset_config`) streams `split` from the Hugging Face hub, and then
    `data_files` is ignored; otherwise `data_files` (txt, jsonl/json, parquet, csv) are read
    locally. A txt file's documents are chosen by `sample_by`: its blank-line-separated
    paragraphs (default), its lines, or the whole file (`document`); a jsonl/parquet/csv row is
    one document, its `text_column`. `encoding` is the text encoding of local txt, jsonl and csv
    files."""

    dataset_id: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    data_files: str | list | dict | None = None
    text_column: str = "text"
    sample_by: str = "paragraph"
    encoding: str = "utf-8"
    builder: str | None = field(init=False, default=None)  # the datasets builder of local files

    def __post_init__(self) -> None:
        if not self.dataset_id and not self.data_files:
            raise ConfigError("set data.source.dataset_id= (a hub dataset) or "
                              "data.source.data_files= (local files)")
        self.encoding = str(self.encoding)
        # A hub id wins, so `data.source.dataset_id=...` alone switches away from the local default.
        self.builder = None if self.dataset_id else _builder_for(self.data_files)

    def name(self) -> str:
        return (
            str(self.data_files)
            if self.builder
            else f"{self.dataset_id}:{self.dataset_config or ''}"
        )

    def files(self) -> list[str]:
        return sorted({m for f in _listed(self.data_files) for m in glob.glob(str(f))})

    def open(self, split: str) -> Any:
        """The streamed (`datasets.IterableDataset`) split of the source."""
        load_dataset = _datasets().load_dataset
        if self.builder is None:
            return load_dataset(self.dataset_id, self.dataset_config, split=split, streaming=True)
        # Read 1 MB at a time (the default is 10 MB) so memory stays small and flat.
        kwargs = {
            "text": {"sample_by": self.sample_by, "chunksize": READ_CHUNK},
            "json": {"chunksize": READ_CHUNK},
        }.get(self.builder, {})
        if self.builder in ("text", "json", "csv"):
            kwargs["encoding"] = self.encoding
        try:
            return load_dataset(
                self.builder, data_files=self.data_files, split=split, streaming=True, **kwargs,
            )
        except StopIteration:  # the json reader infers its schema from a first record
            empty = [f for f in self.files() if os.path.getsize(f) == 0] or self.files()
            raise ConfigError(
                f"no records in {', '.join(empty)}: the file is empty; give "
                "data.source.data_files= files with text"
            ) from None
        except UnicodeDecodeError as e:
            raise self.decode_error(e) from None

    def from_texts(self, texts: list[str]) -> Any:
        """Texts held in memory as a stream of examples like the source's own."""
        return _datasets().Dataset.from_dict({self.text_column: texts}).to_iterable_dataset()

    def decode_error(self, error: UnicodeDecodeError) -> ValueError:
        """The error names the file that does not decode (the reader's own message does not)."""
        bad = []
        for f in self.files() if self.builder else []:
            try:
                with open(f, encoding=self.encoding) as handle:
                    while handle.read(READ_CHUNK):
                        pass
            except UnicodeDecodeError:
                bad.append(f)
            except OSError:
                continue
        where = ", ".join(bad) or self.name()
        return ValueError(
            f"{where} is not {self.encoding} text ({error.reason}: byte {error.object[error.start]:#x}"
            f" at position {error.start}): set data.source.encoding= to the file's encoding, e.g. "
            "data.source.encoding=latin-1 (or cp1252)"
        )

    def read(self, stream: Iterable[dict]) -> Iterator[dict]:
        """The examples of a stream; a file that does not decode is named in the error."""
        try:
            yield from stream
        except UnicodeDecodeError as e:
            raise self.decode_error(e) from None

    def text(self, example: dict) -> str:
        if self.text_column not in example:
            raise ConfigError(
                f"text column {self.text_column!r} not in {self.name()}; "
                # not DOC_ID: the training stream adds it, the file has no such column
                f"available columns: {[c for c in example if c != DOC_ID]} "
                "(set data.source.text_column=)"
            )
        return str(example[self.text_column] or "").strip()

    def documents(self, stream: Iterable[dict]) -> Iterator[str]:
        """The non-empty documents of a stream, in order (what gets tokenized)."""
        for example in self.read(stream):
            text = self.text(example)
            if text:
                yield text
