"""Embed texts with a sentence-transformers model: one vector per text.

    mlxlab embed path/to/all-MiniLM-L6-v2 --input texts.txt --out vectors.npy
    mlxlab embed path/to/all-MiniLM-L6-v2 --input docs.jsonl --out vectors.jsonl --batch-size 64
    printf 'first text\nsecond text\n' | mlxlab embed path/to/model --no-normalize

MODEL is a sentence-transformers folder (modules.json: a BERT, RoBERTa / XLM-R or decoder
Transformer such as Qwen3-Embedding's, a Pooling, optional Dense layers and Normalize) or a hub
id ORG/NAME of one; --prompt-name NAME puts one of its named prompts (e.g. query) before each
text. Texts come from --input: a text file, one text
per line (every line, blank ones included, is a row), or a .jsonl file of objects with a `text`
key (and an optional `id`); without --input, lines from stdin. Vectors go to --out: .npy (a
float32 (N, dim) array, row i = text i) or .jsonl ({"id", "embedding"} per text: the input's
id, else the row number); without --out, jsonl on stdout. --normalize / --no-normalize override
whether vectors are scaled to unit length (default: as the folder says, i.e. when it ends in a
Normalize module). Bad input is one `mlxlab embed: error:` line, exit 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlxlab.cli.common import guarded, parser_for

if TYPE_CHECKING:  # `mlxlab embed --help` imports no numpy
    import numpy as np

OUT_SUFFIXES = (".npy", ".jsonl")


def read_texts(source: str | None) -> tuple[list[str], list]:
    """(texts, ids) from a text file, a .jsonl file (`text`, optional `id`), or stdin (None/-)."""
    if source in (None, "-"):
        lines, name = sys.stdin.read().splitlines(), "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--input {source}: no such file (give a text file, one text "
                                    "per line, or a .jsonl file with a `text` key)")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        lines, name = path.read_text(encoding="utf-8").splitlines(), str(path)
    if not lines:
        raise ValueError(f"{name} holds no texts; give one text per line")
    return lines, list(range(len(lines)))


def _read_jsonl(path: Path) -> tuple[list[str], list]:
    texts, ids = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number} is not JSON; a .jsonl input has one object per "
                             "line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{number} has no string `text`; each line needs "
                             '{"text": "..."} (and optionally "id")')
        ids.append(row.get("id", len(texts)))
        texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path} holds no texts; give one JSON object with a `text` per line")
    return texts, ids


def model_folder_of(model: str) -> Path:
    """The local folder of MODEL: a folder, or a hub id through models/sources (no GGUF/Ollama:
    those hold decoders)."""
    from mlxlab.models.sources import as_local, describe

    kind = describe(model)
    if kind in ("gguf", "ollama"):
        raise ValueError(f"{model} is a {kind} model (a decoder), not an embedder; give a "
                         "sentence-transformers folder")
    if kind == "unknown":
        raise FileNotFoundError(f"{model}: no such model folder; give a sentence-transformers "
                                "folder (with modules.json) or a hub id ORG/NAME of one")
    return Path(as_local(model))


def write_vectors(vectors: np.ndarray, ids: list, out: str | None) -> None:
    """.npy or .jsonl at `out` (whole or absent: written beside it, then renamed), or jsonl on
    stdout."""
    import numpy as np

    if out is None:
        for i, v in zip(ids, vectors):
            sys.stdout.write(json.dumps({"id": i, "embedding": v.tolist()}) + "\n")
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npy":
                np.save(f, vectors.astype(np.float32))
            else:
                for i, v in zip(ids, vectors):
                    f.write((json.dumps({"id": i, "embedding": v.tolist()}) + "\n").encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    parser = parser_for("embed", __doc__)
    parser.add_argument("model", metavar="MODEL",
                        help="a sentence-transformers folder (modules.json) or a hub id of one")
    parser.add_argument("--input", default=None,
                        help="texts: a text file (one per line) or .jsonl (`text` key); default stdin")
    parser.add_argument("--out", default=None,
                        help="vectors: .npy or .jsonl (id, embedding); default jsonl on stdout")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="unit-length vectors (default: as the model folder says)")
    parser.add_argument("--prompt-name", default=None, metavar="NAME",
                        help="one of the folder's prompts (config_sentence_transformers.json), "
                        "put before each text, e.g. query (default: the folder's default prompt)")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.out is not None and Path(args.out).suffix not in OUT_SUFFIXES:
            raise ValueError(f"--out {args.out}: write .npy or .jsonl")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        folder = model_folder_of(args.model)
        texts, ids = read_texts(args.input)
        from mlxlab.models.embedders.sentence_folder import TextEmbedder

        embedder = TextEmbedder(folder)
        vectors = embedder.encode(texts, args.batch_size, args.normalize, args.prompt_name)
        write_vectors(vectors, ids, args.out)
        unit = embedder.normalizes if args.normalize is None else args.normalize
        n = len(texts)
        print(f"embedded {n} text{'' if n == 1 else 's'} as {vectors.shape[1]}-dim vectors"
              f"{' (unit length)' if unit else ''} -> {args.out or 'stdout'}", file=sys.stderr)
        return 0

    return guarded("embed", body)
