"""A model the user names, as a local folder mlx-lm loads: the one place every verb (train, eval,
generate, serve, teachers, references) turns `model.pretrained` into files.

A source is, in the order they are tried:
- a local folder (a Hugging Face or mlx-lm model folder): itself;
- a GGUF file (`*.gguf`, what llama.cpp, LM Studio and Ollama hold): converted once into a
  folder under the model cache (gguf.py), Q4_0/Q4_1/Q8_0 tensors as MLX quantized layers bit for
  bit, the tokenizer and chat template from the file;
- `ollama:NAME[:TAG]`: the GGUF blob of a model the local Ollama store holds (ollama.py);
- a hub id `ORG/NAME` (hub.py): huggingface_hub's download and cache, `revision` pinned; only
  this touches the network, and not under HF_HUB_OFFLINE=1.

`resolve` returns the folder and its provenance (what the run records so it names exactly which
weights it trained). A source that cannot be read is one ConfigError / MissingFileError naming it
and what would work, raised before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.sources.source import ModelSource

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OLLAMA_PREFIX = "ollama:"
WHAT_WORKS = ("a local Hugging Face or mlx-lm model folder, a .gguf file, ollama:NAME[:TAG], or a "
              "hub id ORG/NAME")


_resolved: dict[tuple[str, str | None], ModelSource] = {}


def resolve(source: str | Path, revision: str | None = None) -> ModelSource:
    """The local folder behind `source` (module docstring), resolved once per process."""
    key = (str(source), revision)
    if key not in _resolved:
        _resolved[key] = _resolve(str(source).strip(), revision)
    return _resolved[key]


def source_of(model_cfg: Mapping) -> ModelSource | None:
    """The resolved `model.pretrained` (+ `model.revision`) of a model config, if it names one."""
    pretrained = model_cfg.get("pretrained")
    return resolve(pretrained, model_cfg.get("revision")) if pretrained else None


def source_tags(source: ModelSource | None) -> dict[str, str]:
    """The MLflow tags that name exactly which weights a run started from."""
    if source is None:
        return {}
    return {f"mlxlab.model.{key}": str(value) for key, value in source.provenance.items()}


def model_folder(source: str | Path, revision: str | None = None) -> Path:
    """resolve(source, revision).folder."""
    return resolve(source, revision).folder


def as_local(source: str | Path) -> str:
    """`source` as a local path: a GGUF file, an Ollama name or a hub id resolved to its folder;
    anything else (a folder, a run, a checkpoint) as given, for the caller to read."""
    return str(model_folder(source)) if describe(source) in ("gguf", "ollama", "hub") else str(source)


def describe(source: str | Path) -> str:
    """What kind of source a string names, without reading it: folder | gguf | ollama | hub |
    unknown (for messages and checks that must not download or convert)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if text.lower().endswith(".gguf"):
        return "gguf"
    if text.startswith(OLLAMA_PREFIX):
        return "ollama"
    if HUB_ID.match(text) and not path.exists():
        return "hub"
    return "unknown"


def _resolve(source: str, revision: str | None) -> ModelSource:
    kind = describe(source)
    if revision and kind != "hub":
        raise ConfigError(f"model.revision={revision} pins a hub revision, and {source} is not a "
                          "hub id (ORG/NAME): drop model.revision")
    if kind == "folder":
        folder = Path(source).expanduser().resolve()
        return ModelSource(folder, "folder", {"source": source, "kind": "folder"})
    if kind == "gguf":
        from mlxlab.models.sources.gguf import gguf_folder

        path = Path(source).expanduser()
        if not path.is_file():
            raise MissingFileError(f"model.pretrained={source}: no such GGUF file; give "
                                   f"{WHAT_WORKS}")
        return gguf_folder(path, {"source": source, "kind": "gguf"})
    if kind == "ollama":
        from mlxlab.models.sources.gguf import gguf_folder
        from mlxlab.models.sources.ollama import ollama_blob

        blob = ollama_blob(source[len(OLLAMA_PREFIX):])
        return gguf_folder(blob, {"source": source, "kind": "ollama", "blob": str(blob)})
    if kind == "hub":
        from mlxlab.models.sources.hub import hub_folder

        return hub_folder(source, revision)
    raise MissingFileError(f"model.pretrained={source}: no such folder or file; give {WHAT_WORKS}")
