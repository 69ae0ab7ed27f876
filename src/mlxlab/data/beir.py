"""A retrieval set in the BEIR layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl`
(`_id`, `text`) and `qrels/<split>.tsv` (a header, then `query-id corpus-id score` rows), as
BEIR and MTEB ship them. A document's text is its title and text joined by a space (BEIR's
sentence-transformers model); a query-document pair with a score above 0 is relevant. Read and
checked whole when the data module is built (before a run folder exists): a qrels row naming a
query or document the files do not hold, an empty text or a duplicated id is one line naming the
file, the line and the fix.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlxlab.config.records import utf8_text
from mlxlab.data.completions import jsonl_lines
from mlxlab.errors import ConfigError, MissingFileError

_NAME = re.compile(r"[^A-Za-z0-9_.\-]+")  # what a task name (an eval_tasks file) may hold


@dataclass(frozen=True)
class RetrievalSet:
    """Queries, documents and which documents are relevant to each query."""

    name: str
    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    corpus: list[str]
    relevant: dict[str, set[str]] = field(default_factory=dict)


def _texts(path: Path, with_title: bool) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR jsonl file."""
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; a BEIR folder holds corpus.jsonl, "
                               "queries.jsonl and qrels/<split>.tsv")
    ids, texts, seen = [], [], set()
    for number, row in jsonl_lines(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text"), str):
            raise ConfigError(f"{where}: a BEIR row is an object with '_id' and 'text'")
        ident = str(row["_id"])
        if ident in seen:
            raise ConfigError(f"{where}: _id {ident!r} is used twice; ids must be unique")
        text = f"{row.get('title') or ''} {row['text']}".strip() if with_title else row["text"]
        if not text.strip():
            raise ConfigError(f"{where}: _id {ident!r} has an empty text")
        seen.add(ident)
        ids.append(ident)
        texts.append(text)
    if not ids:
        raise ConfigError(f"{path} holds no rows")
    return ids, texts


def _qrels(path: Path, queries: set[str], corpus: set[str]) -> dict[str, set[str]]:
    """query id -> its relevant document ids, every id checked against the files."""
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: set data.eval_split= to a file in "
                               f"{path.parent} (without .tsv)")
    relevant: dict[str, set[str]] = {}
    lines = utf8_text(path).splitlines()
    for number, row in enumerate(csv.reader(lines, delimiter="\t"), 1):
        if not row or (number == 1 and row[0] == "query-id"):
            continue
        where = f"{path}:{number}"
        if len(row) != 3:
            raise ConfigError(f"{where}: a qrels row is query-id, corpus-id and score, "
                              "tab-separated")
        query, doc, score = row
        if query not in queries:
            raise ConfigError(f"{where}: query id {query!r} is not in queries.jsonl")
        if doc not in corpus:
            raise ConfigError(f"{where}: corpus id {doc!r} is not in corpus.jsonl; fix the "
                              "qrels or add the document")
        try:
            if float(score) > 0:
                relevant.setdefault(query, set()).add(doc)
        except ValueError:
            raise ConfigError(f"{where}: score {score!r} is not a number") from None
    if not relevant:
        raise ConfigError(f"{path} marks no document relevant (a score above 0) to any query")
    return relevant


def read_beir(folder: str | Path, split: str = "test") -> RetrievalSet:
    """The retrieval set of a BEIR folder, its queries those the qrels of `split` judge."""
    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"data.eval_dir={folder}: no such folder (give a BEIR folder "
                               "with corpus.jsonl, queries.jsonl and qrels/)")
    corpus_ids, corpus = _texts(folder / "corpus.jsonl", with_title=True)
    query_ids, queries = _texts(folder / "queries.jsonl", with_title=False)
    relevant = _qrels(folder / "qrels" / f"{split}.tsv", set(query_ids), set(corpus_ids))
    judged = [i for i, q in enumerate(query_ids) if q in relevant]
    return RetrievalSet(_NAME.sub("_", folder.name) or "retrieval",
                        [query_ids[i] for i in judged], [queries[i] for i in judged],
                        corpus_ids, corpus, relevant)
