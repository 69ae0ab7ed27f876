"""A cross-encoder reranker: a (query, passage) pair in, relevance scores out.

A Hugging Face `BertForSequenceClassification` folder (config.json with `architectures`,
`num_labels` or `id2label`, the classifier head in *.safetensors), which is what
sentence-transformers' CrossEncoder saves and loads, runs on mlxlab's BERT: BertClassifier's
encoder, pooler and classifier, with one output allowed (a reranker's single score) and the
activation CrossEncoder.predict applies to the logits. That activation is, in order: the
`activation` given, the folder's `config_sentence_transformers.json` `activation_fn`
(sentence-transformers 6), config.json's `sentence_transformers.activation_fn` (4 and 5) or
`sbert_ce_default_activation_function` (older), else Sigmoid for one label and Identity for more,
as CrossEncoder picks it. A bare BERT encoder folder (BertModel, a sentence-transformers
embedder) starts a reranker with a fresh head, as `CrossEncoder("bert-base-uncased")` does; a
folder of any other model is one ConfigError line. The pair's tokens come from the data side
(data/rerank.py pair_tokenizer); runs/reranker.py puts the two together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.embedders.embedder import ACTIVATIONS
from mlxlab.models.encoders.bert import BertClassifier
from mlxlab.models.hf import weight_files
from mlxlab.models.sources import as_local, describe

TORCH_ACTIVATION = "torch.nn.modules.activation."
# architectures a folder may name: a sequence classifier (its head loads), or a BERT encoder
# without one (a fresh head, as CrossEncoder starts from an encoder)
CLASSIFIER_SUFFIX = "ForSequenceClassification"
ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


def folder_config(folder: str | Path) -> dict:
    """config.json of a reranker folder, or one line saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such model folder; give a cross-encoder folder "
                               "(config.json of a BertForSequenceClassification, its weights "
                               "and tokenizer.json)")
    config = _json(folder / "config.json")
    if not config:
        raise MissingFileError(f"{folder}/config.json is missing; a cross-encoder folder has one")
    return config


def is_sequence_classifier(folder: str | Path) -> bool:
    """Whether the folder's config.json names a sequence classifier (a reranker's head)."""
    config = _json(Path(folder) / "config.json")
    return any(str(a).endswith(CLASSIFIER_SUFFIX) for a in config.get("architectures") or ())


def check_reranker_folder(folder: str | Path, fresh_head: bool = False) -> dict:
    """The folder's config.json when it holds a BERT sequence classifier (or, `fresh_head`, a
    BERT encoder a new head goes on); else one ConfigError line naming what it is."""
    config = folder_config(folder)
    architectures = [str(a) for a in config.get("architectures") or ()]
    model_type = config.get("model_type", "bert")
    classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in architectures)
    encoder = not architectures or any(a in ENCODER_ARCHITECTURES for a in architectures)
    if model_type != "bert" or not (classifier or (fresh_head and encoder)):
        what = ", ".join(architectures) or f"model_type {model_type!r}"
        wanted = ("a BertForSequenceClassification (a cross-encoder) or a BERT encoder to put "
                  "a fresh head on" if fresh_head else "a BertForSequenceClassification (what "
                  "sentence-transformers' CrossEncoder saves)")
        raise ConfigError(f"{folder} holds {what}, not a sequence classifier mlxlab reranks "
                          f"with: give {wanted}")
    return config


def folder_labels(config: Mapping) -> int:
    """The classifier's outputs a config.json declares (num_labels, else id2label's size)."""
    return int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)


def folder_activation(folder: str | Path, num_labels: int) -> str:
    """The activation CrossEncoder.predict applies for this folder (the module's order), as
    torch's class name (Sigmoid, Identity, ...)."""
    folder = Path(folder)
    config = _json(folder / "config.json")
    named = (_json(folder / "config_sentence_transformers.json").get("activation_fn")
             or (config.get("sentence_transformers") or {}).get("activation_fn")
             or config.get("sbert_ce_default_activation_function"))
    if named is None:
        return "Sigmoid" if num_labels == 1 else "Identity"
    return check_activation(str(named), f"{folder}'s activation_fn")


def torch_path(name: str) -> str:
    """The import path sentence-transformers reads an activation by (Identity is torch's
    linear module's)."""
    return ("torch.nn.modules.linear." if name == "Identity" else TORCH_ACTIVATION) + name


def check_activation(name: str, where: str = "model.activation") -> str:
    """torch's activation class name of `name` (its full path or the name alone)."""
    short = name.rsplit(".", 1)[-1]
    if short not in ACTIVATIONS or (name != short and not name.startswith("torch.")):
        raise ConfigError(f"{where}={name!r}; mlxlab applies torch's "
                          f"{', '.join(ACTIVATIONS)}")
    return short


class CrossEncoderModel(BertClassifier):
    """BertClassifier whose head may have one output, plus the activation of its scores.

    `pretrained`: a cross-encoder folder, or a BERT encoder folder for a fresh head (num_labels
    from the data); None rebuilds a finished run from its checkpoint's sizes. `activation`:
    torch's name of the activation `scores` applies (None: the folder's, see the module)."""

    min_labels = 1

    def __init__(self, vocab_size: int, num_labels: int, pretrained: str | None = None,
                 activation: str | None = None, dropout: float | None = None,
                 lora: Mapping | None = None, **sizes: Any):
        folder = as_local(pretrained) if pretrained else None
        super().__init__(vocab_size, num_labels, pretrained=folder, dropout=dropout, lora=lora,
                         **sizes)
        if activation is not None:
            activation = check_activation(activation)
        elif folder is not None:
            activation = folder_activation(folder, num_labels)
        else:
            activation = "Sigmoid" if num_labels == 1 else "Identity"
        self._checkpoint_init["activation"] = activation
        self._architecture["activation"] = activation

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> None:
        """model.pretrained is a cross-encoder or BERT encoder folder (else one line), and
        model.activation one mlxlab applies."""
        pretrained = node.get("pretrained")
        if not pretrained:
            raise ConfigError("model=cross_encoder needs model.pretrained: a cross-encoder folder "
                              "(BertForSequenceClassification) or a BERT encoder folder")
        if node.get("activation") is not None:
            check_activation(str(node["activation"]))
        kind = describe(str(pretrained))  # read, never downloaded or converted, here
        if kind in ("gguf", "ollama", "unknown"):
            raise ConfigError(f"model.pretrained={pretrained} is no cross-encoder: give a folder "
                              "(or hub id) of a BertForSequenceClassification or a BERT encoder")
        if kind == "folder":
            check_reranker_folder(Path(str(pretrained)).expanduser(), fresh_head=True)

    @property
    def activation(self) -> str:
        """torch's name of the activation `scores` applies (Sigmoid, Identity, ...)."""
        return self._architecture["activation"]

    def scores(self, input_ids: mx.array, attention_mask: mx.array,
               token_type_ids: mx.array | None = None) -> mx.array:
        """CrossEncoder.predict's scores: the activation of the logits, (B,) for one label,
        else (B, num_labels)."""
        out = ACTIVATIONS[self.activation](self(input_ids, attention_mask, token_type_ids))
        return out[:, 0] if out.shape[-1] == 1 else out


def _tensor_names(folder: Path) -> list[set[str]]:
    """The tensor names of each weight file (headers only)."""
    from safetensors import safe_open

    names = []
    for file in weight_files(folder):
        with safe_open(str(file), framework="numpy") as f:
            names.append(set(f.keys()))
    return names


def load_cross_encoder(folder: str | Path) -> CrossEncoderModel:
    """The reranker of a cross-encoder folder (a sequence classifier, else one line), its
    weights loaded (the head included), in eval mode."""
    folder = Path(as_local(str(folder)))
    config = check_reranker_folder(folder)
    num_labels = folder_labels(config)
    if not any("classifier.weight" in names for names in _tensor_names(folder)):
        raise ConfigError(f"{folder} names a sequence classifier but its weights hold no "
                          "classifier head (classifier.weight): save the model again")
    model = CrossEncoderModel(int(config["vocab_size"]), num_labels, pretrained=str(folder))
    model.eval()
    return model
