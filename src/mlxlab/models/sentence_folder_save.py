"""A SentenceEmbedder written back as a sentence-transformers folder: the folder it was read from
(modules.json, configs, tokenizer, pooling) with the model's weights in place of the
Transformer's and each Dense's, so sentence-transformers and `load_sentence_embedder` read the
fine-tune as they read the base. LoRA adapters are merged into their layers; tensors the model
does not hold (BERT's pooler) keep the source's values. The folder is written beside its
destination and renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxlab.models.adapter_layer import AdapterLayer
from mlxlab.models.embedder import SentenceEmbedder
from mlxlab.models.hf import weight_files
from mlxlab.models.sentence_folder import checkpoint_renamer, read_modules
from mlxlab.runtime.memory.io_threads import load_arrays


def merged_weights(model: SentenceEmbedder) -> dict[str, mx.array]:
    """The model's weights under their plain names, every adapter merged into its base."""
    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            weights = {k: v for k, v in weights.items() if not k.startswith(f"{name}.")}
            weights.update({f"{name}.{k}": v
                            for k, v in tree_flatten(module.fuse(dequantize=True).parameters())})
    return weights


def _transformer_weights(path: Path, ours: dict[str, mx.array],
                         rename: Callable[[str], str | None]) -> dict[str, mx.array]:
    """The Transformer module's tensors under their own names, ours where the model has them
    (`rename`: a checkpoint name -> the model's, sentence_folder.checkpoint_renamer)."""
    out = {}
    for file in weight_files(path):
        for name, value in load_arrays(file).items():
            mine = rename(name)
            out[name] = ours[mine].astype(value.dtype) if mine in ours else value
    return out


def save_sentence_folder(model: SentenceEmbedder, source: str | Path, out: str | Path) -> Path:
    """`model` (read from the sentence-transformers folder `source`) as such a folder at `out`."""
    source, out = Path(source), Path(out)
    modules = read_modules(source)
    ours = merged_weights(model)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin",
                                                               "model.safetensors.index.json"))
    dense = 0
    for kind, path in modules:
        where = tmp / path.relative_to(source)
        if kind == "Transformer":
            mx.save_safetensors(str(where / "model.safetensors"),
                                _transformer_weights(path, ours, checkpoint_renamer(model)),
                                metadata={"format": "pt"})
        elif kind == "Dense":
            prefix = f"dense.{dense}."
            mx.save_safetensors(str(where / "model.safetensors"),
                                {k[len(prefix):]: v for k, v in ours.items()
                                 if k.startswith(prefix)}, metadata={"format": "pt"})
            dense += 1
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
