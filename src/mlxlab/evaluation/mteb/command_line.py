"""`mlxlab eval EMBEDDER --tasks mteb:NAME,...`: MTEB's retrieval tasks on a text embedder.

EMBEDDER is a sentence-transformers folder (what `mlxlab embed` reads), a hub id of one in the
local cache, or an embedder run (its `sentence_transformer/` folder, the best weights). The
entries are checked (tasks.py: mteb installed, retrieval tasks, their data cached) before the
model is loaded or the tracking store is touched; mteb's tasks do not mix with jsonl or lm-eval
tasks (those score a language model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlxlab.errors import ConfigError
from mlxlab.evaluation.mteb.encoder import MlxlabEncoder
from mlxlab.evaluation.mteb.scores import score_mteb
from mlxlab.evaluation.mteb.tasks import check_mteb_entries, is_mteb_entry
from mlxlab.evaluation.scoring import TaskScores
from mlxlab.models.embedders.embedder_model import NATIVE_FOLDER
from mlxlab.models.embedders.sentence_folder import TextEmbedder, is_sentence_folder
from mlxlab.runs.named_model import EvalModel

EMBEDDER_KIND = "sentence-transformers"  # an EvalModel kind: a sentence-transformers folder


def mteb_entries(entries: Sequence[str]) -> list[str]:
    """The `mteb:` entries, checked (tasks.py) and alone in the list (one line otherwise)."""
    chosen = [e for e in entries if is_mteb_entry(e)]
    others = [e for e in entries if not is_mteb_entry(e)]
    if chosen and others:
        raise ConfigError(f"{others[0]} beside {chosen[0]}: MTEB tasks score a text embedder, "
                          "jsonl and lm-eval tasks a language model; run them separately")
    return chosen


def embedder_folder(name: str | Path) -> Path:
    """The sentence-transformers folder `name` gives: itself, an embedder run's
    sentence_transformer/, or a hub id's local snapshot."""
    from mlxlab.models.sources import as_local, describe

    path = Path(str(name)).expanduser()
    if is_sentence_folder(path / NATIVE_FOLDER):
        return path / NATIVE_FOLDER
    if describe(str(name)) not in ("folder", "hub"):
        raise ConfigError(f"{name}: MTEB tasks score a text embedder; give a "
                          "sentence-transformers folder, an embedder run, or a hub id of one")
    folder = Path(as_local(str(name)))
    if not is_sentence_folder(folder):
        raise ConfigError(f"{folder} is not a sentence-transformers folder (no modules.json); "
                          "MTEB tasks score a text embedder")
    return folder


def load_embedder(name: str | Path) -> tuple[TextEmbedder, EvalModel]:
    """The embedder and what the eval run records of it (evaluation/eval_run.py)."""
    folder = embedder_folder(name)
    embedder = TextEmbedder(folder)
    return embedder, EvalModel(embedder.model, embedder.tokenizer, folder, EMBEDDER_KIND)


def score_mteb_entries(embedder: TextEmbedder, entries: Sequence[str], batch_size: int,
                       tasks: Sequence[Any] | None = None) -> list[TaskScores]:
    """The entries' tasks (checked again unless `tasks` are given) scored by mteb."""
    tasks = check_mteb_entries(entries) if tasks is None else tasks
    return score_mteb(MlxlabEncoder(embedder), tasks, batch_size)
