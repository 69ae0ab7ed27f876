"""A text embedder written as a sentence-transformers folder, and proved by reading it back.

    export_embedder("path/to/embedder", "exported/embedder") -> report dict

The embedder is what mlxlab loads from a sentence-transformers folder
(models/embedders/sentence_folder.py: a BERT, RoBERTa / XLM-R or decoder Transformer, Pooling, Dense
layers, Normalize), or from an embedder run's sentence_transformer/ folder (its best weights,
written at its end). The folder is written from the model in memory by
models/embedders/sentence_folder_save.py, the writer a run's end uses too (float32, laid out as
sentence-transformers saves one). Then it proves itself before it is renamed into place: mlxlab
reads the written folder, and sentence-transformers too where it is installed, and both must give
the embedder's own vectors on a probe of texts (every named prompt too) within 1e-5, else the export
is refused with the measured gap and nothing is moved to `out`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxlab.export.hf import ExportError
from mlxlab.models.embedders.embedder_model import NATIVE_FOLDER
from mlxlab.models.embedders.sentence_folder import TextEmbedder, is_sentence_folder
from mlxlab.models.embedders.sentence_folder_save import write_sentence_folder
from mlxlab.runtime.files.staging import staged_folder

PROBE = ["The cat sat on the mat.", "A man is riding a horse.", "Café naïve résumé, ÀÉÎ",
         "中文 text 日本語", "", "word " * 200, "Is this the query or the document?"]
ALLOWED_GAP = 1e-5  # float32 written as float32: the read-back's own rounding is ~1e-7


def export_embedder(source: str | Path, out: str | Path, overwrite: bool = False,
                    check: bool = True) -> dict:
    """The sentence-transformers folder `source` written afresh at `out` and read back
    (module docstring); returns the report also saved as out/export_report.json.
    `check=False`: sentence-transformers is not asked (mlxlab's own read-back still is)."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    embedder = load_embedder_source(source)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: pick a new --out or pass --overwrite")
    report: dict = {"source": str(source), "format": "sentence-transformers", "dtype": "float32",
                    "dimension": embedder.dimension, "max_seq_length": embedder.max_length}
    with staged_folder(out) as tmp:
        write_sentence_folder(embedder.model, embedder.folder, tmp)
        report["check"] = prove(embedder, tmp, check)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_embedder_source(source: Path) -> TextEmbedder:
    """The embedder at `source` (a sentence-transformers folder, or an embedder run: its
    sentence_transformer/ folder, the best weights), or one line saying what is."""
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a sentence-transformers folder "
                                "or an embedder run")
    if is_embedder_run(source):
        return TextEmbedder(source / NATIVE_FOLDER)
    if not is_sentence_folder(source):
        raise ExportError(f"{source} is not a sentence-transformers folder (no modules.json); "
                          "--format sentence-transformers exports an embedder")
    return TextEmbedder(source)


def is_embedder_run(path: Path) -> bool:
    """Whether `path` is an embedder run: its end wrote the best weights as a
    sentence-transformers folder (models/embedders/embedder_model.py)."""
    return is_sentence_folder(path / NATIVE_FOLDER)


def prove(embedder: TextEmbedder, folder: Path, with_library: bool = True) -> dict:
    """The written folder read back by mlxlab (and sentence-transformers, where installed and
    `with_library`) against the embedder's own vectors on PROBE, under every named prompt;
    refused past ALLOWED_GAP."""
    names = [None, *embedder.prompts]
    ours = {name: embedder.encode(PROBE, prompt_name=name) for name in names}
    readers = {"mlxlab": _mlxlab_reader(folder)}
    library = _library_reader(folder) if with_library else None
    if library is not None:
        readers[f"sentence-transformers {library[0]}"] = library[1]
    gaps = {who: max(float(np.abs(read(name) - ours[name]).max()) for name in names)
            for who, read in readers.items()}
    worst = max(gaps, key=gaps.get)
    if gaps[worst] > ALLOWED_GAP:
        raise ExportError(f"the written folder read back by {worst} gives vectors {gaps[worst]:.3g} "
                          f"away from the embedder's (allowed {ALLOWED_GAP:g}): not exported")
    record = {"status": "checked", "max_abs_gap": gaps, "allowed_gap": ALLOWED_GAP,
              "texts": len(PROBE), "prompts": names[1:]}
    if library is None:
        record["why_not_sentence_transformers"] = ("--no-check" if not with_library else
                                                   "sentence-transformers is not installed")
    return record


def _mlxlab_reader(folder: Path):
    written = TextEmbedder(folder)
    return lambda name: written.encode(PROBE, prompt_name=name)


def _library_reader(folder: Path):
    """(version, read) of sentence-transformers over the written folder, None when absent."""
    try:
        import sentence_transformers
    except ImportError:
        return None
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    return sentence_transformers.__version__, lambda name: model.encode(PROBE, prompt_name=name)
