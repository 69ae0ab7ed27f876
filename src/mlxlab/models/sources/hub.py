"""A Hugging Face hub id (`ORG/NAME`) through huggingface_hub's own download and cache.

Downloaded when the user names it and is online; from the cache when it is there and
HF_HUB_OFFLINE=1 (or the network is down). The files taken are the ones mlx-lm's loader takes
(config, safetensors weights, tokenizer, templates). The resolved commit is recorded, so a run
names exactly the weights it trained; `model.revision` pins a branch, tag or commit.
"""

from __future__ import annotations

from pathlib import Path

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.sources.source import ModelSource

ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken",
                  "*.txt", "*.jsonl",
                  "*_Dense/model.safetensors"]  # a sentence-transformers folder's Dense layers


def hub_folder(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise MissingFileError(
            f"model.pretrained={repo_id}{at}: not in the Hugging Face cache and the hub cannot be "
            "reached (HF_HUB_OFFLINE=1 or no network); run once online to download it, or give a "
            "local folder or .gguf file") from None
    except RevisionNotFoundError:
        raise ConfigError(f"model.revision={revision}: {repo_id} has no such branch, tag or "
                          "commit") from None
    except GatedRepoError:
        raise ConfigError(f"model.pretrained={repo_id}: a gated repository; accept its terms "
                          "on the hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise MissingFileError(f"model.pretrained={repo_id}: no such model on the hub (or it is "
                               "private: log in with `hf auth login`)") from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained={repo_id}: the repository has no config.json (a GGUF "
                          "repository? download its .gguf file and give its path)")
    return ModelSource(folder, "hub", {"source": repo_id, "kind": "hub", "repo_id": repo_id,
                                       "revision": folder.name})
