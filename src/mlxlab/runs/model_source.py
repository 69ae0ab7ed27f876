"""What the MODEL a user names to `mlxlab generate|eval MODEL` is: a finished run (its folder,
or one of its checkpoint folders) or a model of its own (a Hugging Face / mlx-lm folder, or
one `mlxlab export` wrote). `open_model_source` is the one place a user's model string becomes
a local folder; the verbs load what it names (runs/named_model.py load_eval_model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlab.errors import MissingFileError
from mlxlab.runs.model import is_pretrained_folder

RUN, PRETRAINED, EXPORT = "run", "pretrained", "export"
EXPORT_REPORT = "export_report.json"  # what `mlxlab export` writes beside the weights


@dataclass(frozen=True)
class ModelSource:
    """`path`: the local folder; `kind`: run | pretrained | export; `provenance`: where a
    model's weights came from (recorded with what is done with them)."""

    name: str
    path: Path
    kind: str
    provenance: dict[str, Any] = field(default_factory=dict)


def open_model_source(name: str | Path) -> ModelSource:
    """The run or model `name` names: a run folder (or checkpoint), or a model as
    models/sources resolves it (a folder, a GGUF file, ollama:NAME, a hub id)."""
    from mlxlab.models.sources import describe, resolve

    if describe(name) in ("gguf", "ollama", "hub"):
        source = resolve(name)
        return ModelSource(str(name), source.folder, PRETRAINED, dict(source.provenance))
    path = Path(name).expanduser().resolve()
    if not path.exists():
        raise MissingFileError(f"{name} does not exist: give a model folder, a .gguf file, "
                               "ollama:NAME, a hub id ORG/NAME, an `mlxlab export` folder or a "
                               "finished run folder")
    if not is_pretrained_folder(path):
        return ModelSource(str(name), path, RUN)
    kind = EXPORT if (path / EXPORT_REPORT).is_file() else PRETRAINED
    return ModelSource(str(name), path, kind, {"source": "folder", "path": str(path)})
