"""Mine hard negatives for (anchor, positive) pairs with an embedder, as sentence-transformers'
`util.mine_hard_negatives` does (runs/hard_negatives.py: the same settings under its names).

    mlxlab mine-negatives path/to/all-MiniLM-L6-v2 --data pairs.jsonl --out mined.jsonl
    mlxlab mine-negatives MODEL --data pairs.jsonl --out pairs_labeled.jsonl \\
        --output-format labeled-pair --num-negatives 5 --range-min 10 --max-score 0.8
    mlxlab mine-negatives MODEL --data pairs.jsonl --corpus passages.jsonl --out mined.jsonl \\
        --cross-encoder path/to/cross-encoder --absolute-margin 0.1

MODEL is a sentence-transformers folder (or hub id); --data a .jsonl of rows with the anchor and
positive keys (--anchor-key, --positive-key: query and passage by default); --corpus an optional
.jsonl (`text` key) or text file (one passage a line) of more passages. --cross-encoder (a
cross-encoder folder or a reranker run) rescores the candidates when a margin or a score bound is
given. --output-format labeled-pair writes rows data=rerank_pairs trains on ({anchor, positive
key, label}); labeled-list rows for data=rerank_lists (set data.keys.passages to the positive
key). The result is kept in the cache (<cache>/mined_negatives/<key>/: rows.jsonl and
inputs.json, keyed by the sha256 of every input file, the models' files and the settings;
`mlxlab cache list` shows it): the same command again copies it, mining nothing. Bad input is one `mlxlab mine-negatives: error:` line, exit 2, and nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from mlxlab.cli.common import guarded, parser_for

CACHE_FOLDER = "mined_negatives"
ROWS, INPUTS = "rows.jsonl", "inputs.json"  # a kept result's files, in a folder of its key


def _rows(path: str, keys: tuple[str, str]) -> tuple[list[str], list[str]]:
    """(anchors, positives) of a .jsonl file, or one line naming the line at fault."""
    from mlxlab.data.completions import jsonl_lines

    file = Path(path)
    if not file.is_file() or file.suffix != ".jsonl":
        raise FileNotFoundError(f"--data {path}: no such .jsonl file (one {{{keys[0]!r}, "
                                f"{keys[1]!r}}} object a line)")
    anchors, positives = [], []
    for number, row in jsonl_lines(file):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in keys):
            raise ValueError(f"{path}:{number} has no string {keys[0]!r} and {keys[1]!r} (set "
                             "--anchor-key / --positive-key to the file's keys)")
        anchors.append(row[keys[0]])
        positives.append(row[keys[1]])
    if not anchors:
        raise ValueError(f"{path} holds no rows")
    return anchors, positives


def _corpus(path: str | None) -> list[str]:
    if path is None:
        return []
    from mlxlab.cli.embed import read_texts

    if not Path(path).is_file():
        raise FileNotFoundError(f"--corpus {path}: no such file (give a .jsonl file with a "
                                "`text` key, or a text file with one passage a line)")
    return read_texts(path)[0]


def _folder_digest(folder: Path) -> str:
    """One sha256 over every file of a model folder (each file's kept by its path, size and
    modification time: models/sources/fingerprint.py)."""
    from mlxlab.models.sources.fingerprint import cached_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(folder)}:{cached_sha256(file)}\n".encode())
    return digest.hexdigest()


def cache_key(args: argparse.Namespace, model: Path, reranker: Path | None, settings) -> str:
    """sha256 over what decides the result: the files, the models' files, the settings."""
    from mlxlab.runtime.files.checksum import file_sha256

    parts = {"data": file_sha256(args.data), "model": _folder_digest(model),
             "corpus": file_sha256(args.corpus) if args.corpus else None,
             "cross_encoder": _folder_digest(reranker) if reranker else None,
             "keys": [args.anchor_key, args.positive_key],
             # batch_size leaves the result as it is (a text's vector is its own)
             "settings": {**dataclasses.asdict(settings), "batch_size": None}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    """Whole or absent: written beside `path`, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a sentence-transformers folder or hub id")
    parser.add_argument("--data", required=True, help=".jsonl of (anchor, positive) rows")
    parser.add_argument("--out", required=True, help="the mined rows, .jsonl")
    parser.add_argument("--corpus", default=None, help="more passages: .jsonl (`text`) or lines")
    parser.add_argument("--anchor-key", default="query", help="the anchor's key (query)")
    parser.add_argument("--positive-key", default="passage", help="the positive's key (passage)")
    parser.add_argument("--cross-encoder", default=None,
                        help="a cross-encoder folder or reranker run that rescores candidates")
    for name, kind, default, text in (
            ("range-min", int, 0, "skip the first N candidates"),
            ("range-max", int, None, "consider at most the first N (default: derived)"),
            ("max-score", float, None, "skip candidates scored above this"),
            ("min-score", float, None, "skip candidates scored below this"),
            ("absolute-margin", float, None, "skip candidates within this of the positive"),
            ("relative-margin", float, None, "skip candidates within this share of it"),
            ("num-negatives", int, 3, "negatives an anchor"),
            ("batch-size", int, 32, "texts a forward pass"),
            ("seed", int, 0, "--sampling-strategy random: the sample's seed")):
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)
    parser.add_argument("--sampling-strategy", choices=("top", "random"), default="top")
    parser.add_argument("--output-format", default="triplet",
                        choices=("triplet", "n-tuple", "labeled-pair", "labeled-list"))
    parser.add_argument("--cache-dir", default=None,
                        help=f"where results are kept (default: <cache>/{CACHE_FOLDER})")


def main(argv: list[str]) -> int:
    parser = parser_for("mine-negatives", __doc__)
    _arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from mlxlab.cli.embed import model_folder_of
        from mlxlab.runs.hard_negatives import MiningSettings

        if Path(args.out).suffix != ".jsonl":
            raise ValueError(f"--out {args.out}: write a .jsonl file")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        names = {f.name for f in dataclasses.fields(MiningSettings)}
        settings = MiningSettings(**{k: v for k, v in vars(args).items() if k in names})
        keys = (args.anchor_key, args.positive_key)
        anchors, positives = _rows(args.data, keys)
        model = model_folder_of(args.model)
        reranker = model_folder_of(args.cross_encoder) if args.cross_encoder else None
        settings.checked_range_max(1, reranker is not None)  # the numbers, before any model
        corpus = _corpus(args.corpus)
        kept = _cache_dir(args.cache_dir) / cache_key(args, model, reranker, settings)
        cache = kept / ROWS
        if not cache.is_file():
            rows = _mine(model, reranker, anchors, positives, settings, keys, corpus)
            if not rows:  # an empty file would train nothing and pass for a result
                raise ValueError(_nothing_mined(len(anchors), settings))
            _write_jsonl(rows, cache)
            inputs = {"data": str(Path(args.data).resolve()), "model": str(model),
                      "corpus": args.corpus, "cross_encoder": str(reranker) if reranker else None,
                      "settings": dataclasses.asdict(settings)}
            (kept / INPUTS).write_text(json.dumps(inputs, indent=1) + "\n")
            what = "mined"
        else:
            what = "found in the cache"
        with open(cache, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if not count:  # kept by an earlier mlxlab, which wrote empty results
            raise ValueError(_nothing_mined(len(anchors), settings))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache, args.out)
        print(f"{what}: {count} {settings.output_format} rows from {len(anchors)} pairs -> "
              f"{args.out} (kept as {cache})", file=sys.stderr)
        return 0

    return guarded("mine-negatives", body)


def _nothing_mined(pairs: int, settings) -> str:
    """Why no row came out, and what to loosen."""
    given = [f"--{name.replace('_', '-')} {value}" for name, value in (
        ("max_score", settings.max_score), ("min_score", settings.min_score),
        ("absolute_margin", settings.absolute_margin),
        ("relative_margin", settings.relative_margin)) if value is not None]
    loosen = f"loosen {', '.join(given)} or " if given else ""
    rows = "n-tuple rows need every anchor to keep all --num-negatives; " \
        if settings.output_format == "n-tuple" else ""
    return (f"no negative was mined from {pairs} pairs: every candidate passage was a positive "
            f"or was skipped; {rows}{loosen}give more passages (--corpus, or more distinct "
            "pairs)")


def cached_results(root: Path) -> list:
    """`mlxlab cache list`'s entries of the mined rows kept under the cache root `root`."""
    from mlxlab.runtime.files.cache import CacheEntry, disk_size

    found = []
    for kept in sorted((root / CACHE_FOLDER).glob(f"*/{ROWS}")):
        inputs = json.loads((kept.parent / INPUTS).read_text()) \
            if (kept.parent / INPUTS).is_file() else {}
        source = (f"{inputs.get('settings', {}).get('output_format', '?')} rows of "
                  f"{inputs.get('data', '?')} by {Path(inputs.get('model', '?')).name}")
        found.append(CacheEntry(kept.parent, "mined negatives", disk_size(kept.parent), source,
                                kept.stat().st_mtime))
    return found


def _cache_dir(given: str | None) -> Path:
    from mlxlab.runtime import settings

    return Path(given) if given else settings.current().cache_dir / CACHE_FOLDER


def _mine(model: Path, reranker: Path | None, anchors: list[str], positives: list[str],
          settings, keys: tuple[str, str], corpus: list[str]) -> list[dict]:
    from mlxlab.models.embedders.sentence_folder import TextEmbedder
    from mlxlab.runs.hard_negatives import mine_hard_negatives
    from mlxlab.runs.reranker import Reranker

    return mine_hard_negatives(TextEmbedder(model), anchors, positives, settings, corpus,
                               Reranker.load(reranker) if reranker else None, keys)
