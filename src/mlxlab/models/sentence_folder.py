"""A sentence-transformers model folder as an mlxlab SentenceEmbedder with its tokenizer.

The folder's modules.json lists its modules in order: a Transformer (a BERT encoder: config.json
and *.safetensors in its path, model_type 'bert'), a Pooling (1_Pooling/config.json: the modes),
any number of Dense layers (their config.json and model.safetensors) and a last Normalize. The
tokenizer is the Transformer path's tokenizer.json, truncated where sentence-transformers
truncates (sentence_bert_config.json's max_seq_length, else tokenizer_config.json's
model_max_length, at most the encoder's max_position_embeddings) and padded to the longest text
of a batch; a text is prefixed with the folder's default prompt when it names one. A folder
that is no such model is one ConfigError / MissingFileError naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, normalizers

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.embedder import ACTIVATIONS, SentenceEmbedder
from mlxlab.models.hf import assign_weights, bert_config_from_hf, hf_to_mlxlab_name, weight_files
from mlxlab.models.pooling import pooling_modes
from mlxlab.runtime.io_threads import load_arrays

MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
ENCODER_TYPES = ("bert",)  # model_type values mlxlab's BertEncoder reads
# encoders sentence-transformers ships that BertEncoder does not cover (position ids, layout)
OTHER_ENCODERS = ("roberta", "xlm-roberta", "modernbert", "mpnet", "distilbert", "deberta-v2",
                  "electra", "nomic_bert", "new")


def _json(path: Path) -> dict | list:
    if not path.is_file():
        raise MissingFileError(f"{path} is missing; a sentence-transformers folder has one")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None


def _json_or_empty(path: Path) -> dict:
    return _json(path) if path.is_file() else {}


def is_sentence_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a sentence-transformers model (its modules.json)."""
    return (Path(folder) / "modules.json").is_file()


def read_modules(folder: Path) -> list[tuple[str, Path]]:
    """(module kind, its folder) in order, each kind one of MODULES, checked for a usable order:
    one Transformer first, one Pooling, Dense layers, at most a last Normalize."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such model folder")
    if not is_sentence_folder(folder):
        raise ConfigError(f"{folder} is not a sentence-transformers folder (no modules.json); "
                          "give a folder with modules.json, a Transformer and a Pooling module")
    listed = _json(folder / "modules.json")
    if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
        raise ConfigError(f"{folder}/modules.json is not a list of modules ({{type, path}} each)")
    modules = []
    for entry in listed:
        kind = str(entry.get("type", "")).rsplit(".", 1)[-1]
        if not str(entry.get("type", "")).startswith("sentence_transformers.") or kind not in MODULES:
            raise ConfigError(f"{folder}/modules.json has a {entry.get('type')!r} module; mlxlab "
                              f"reads sentence-transformers' {', '.join(MODULES)}")
        modules.append((kind, folder / entry.get("path", "")))
    kinds = [kind for kind, _ in modules]
    order_ok = (kinds[:2] == ["Transformer", "Pooling"]
                and all(k == "Dense" for k in kinds[2:len(kinds) - (kinds[-1] == "Normalize")]))
    if not order_ok:
        raise ConfigError(f"{folder}/modules.json lists {kinds}; mlxlab reads Transformer, Pooling, "
                          "Dense layers, then an optional Normalize")
    return modules


def encoder_sizes(path: Path) -> dict:
    """BertEncoder's keyword arguments from the Transformer module's config.json; a decoder's or
    another encoder family's config is one line naming what is supported."""
    config = _json(path / "config.json")
    model_type = config.get("model_type", "bert")  # as bert_config_from_hf reads an old config
    if model_type not in ENCODER_TYPES:
        what = ("another encoder family" if model_type in OTHER_ENCODERS
                else "not an encoder (a decoder or another kind of model)")
        raise ConfigError(f"{path}/config.json has model_type={model_type!r}, {what}; mlxlab embeds "
                          f"with BERT encoders (model_type {', '.join(map(repr, ENCODER_TYPES))}); "
                          "RoBERTa, XLM-R and ModernBERT are not supported yet")
    if config.get("is_decoder"):
        raise ConfigError(f"{path}/config.json has is_decoder=true; an embedder needs a bidirectional "
                          "BERT encoder")
    sizes = bert_config_from_hf(path)
    return dict(vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"],
                num_layers=sizes["num_layers"], num_heads=sizes["num_heads"],
                intermediate_size=sizes["intermediate_size"], max_position=sizes["max_position"],
                type_vocab_size=sizes["type_vocab_size"], dropout=sizes["dropout"],
                norm_position=sizes["norm_position"], eps=sizes["layer_norm_eps"])


def dense_settings(path: Path) -> dict:
    """Dense's keyword arguments from a Dense module's config.json."""
    config = _json(path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ConfigError(f"{path}/config.json: a Dense on {config['module_input_name']!r}; mlxlab "
                          "applies Dense layers to the pooled sentence embedding only")
    if not activation.startswith("torch.") or activation.rsplit(".", 1)[-1] not in ACTIVATIONS:
        raise ConfigError(f"{path}/config.json: activation {activation!r}; mlxlab has torch's "
                          f"{', '.join(ACTIVATIONS)}")
    return dict(in_features=config["in_features"], out_features=config["out_features"],
                bias=config.get("bias", True), activation=activation.rsplit(".", 1)[-1],
                residual=config.get("use_residual", False))


def _weights(modules: list[tuple[str, Path]]) -> dict[str, mx.array]:
    """Every tensor of the folder under its mlxlab name (unused ones, e.g. BERT's pooler, as
    None-renamed names assign_weights skips)."""
    weights: dict[str, mx.array] = {}
    dense = 0
    for kind, path in modules:
        if kind == "Transformer":
            for file in weight_files(path):
                weights.update(load_arrays(file))
        elif kind == "Dense":
            file = path / "model.safetensors"
            if not file.is_file():
                raise MissingFileError(f"{file} is missing (a pytorch_model.bin Dense: save the "
                                       "model again with a current sentence-transformers)")
            weights.update({f"dense.{dense}.{name}": value
                            for name, value in load_arrays(file).items()})
            dense += 1
    return weights


def _rename(name: str) -> str | None:
    return name if name.startswith("dense.") else hf_to_mlxlab_name(name)


def load_sentence_embedder(folder: str | Path) -> SentenceEmbedder:
    """The SentenceEmbedder of a sentence-transformers folder, its weights loaded, in eval mode."""
    return _embedder(Path(folder), read_modules(Path(folder)))


def _embedder(folder: Path, modules: list[tuple[str, Path]]) -> SentenceEmbedder:
    model = SentenceEmbedder(**embedder_settings(modules))
    load_folder_weights(model, folder, modules)
    model.eval()
    return model


def embedder_settings(modules: list[tuple[str, Path]]) -> dict:
    """SentenceEmbedder's keyword arguments for a folder's modules (read_modules)."""
    pooling_path = modules[1][1]
    return dict(
        encoder=encoder_sizes(modules[0][1]),
        pooling=pooling_modes(_json(pooling_path / "config.json"), f"{pooling_path}/config.json"),
        dense=[dense_settings(path) for kind, path in modules if kind == "Dense"],
        normalize=modules[-1][0] == "Normalize",
    )


def load_folder_weights(model: SentenceEmbedder, folder: Path,
                        modules: list[tuple[str, Path]]) -> None:
    """The folder's weights into `model` (built from embedder_settings; LoRA-wrapped or not)."""
    loaded, _, missing = assign_weights(model, _weights(modules), _rename)
    if missing:
        raise ConfigError(f"{folder} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_weights(list(loaded.items()), strict=False)


class TextEmbedder:
    """A sentence-transformers folder's model and tokenizer: texts in, vectors out."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        modules = read_modules(self.folder)
        self.model = _embedder(self.folder, modules)
        self.tokenizer, self.max_length = _tokenizer(modules[0][1],
                                                     self.model.encoder.embeddings.max_position)
        self.prompt = _default_prompt(self.folder, modules[1][1])

    @property
    def dimension(self) -> int:
        return self.model.dimension

    @property
    def normalizes(self) -> bool:
        """Whether the folder ends in a Normalize (its vectors are unit length by default)."""
        return bool(self.model.normalize)

    def encode(self, texts: Sequence[str], batch_size: int = 32,
               normalize: bool | None = None) -> np.ndarray:
        """(len(texts), dimension) float32 vectors, row i = texts[i]; `normalize` None = as the
        folder says. Texts are batched longest first (as sentence-transformers does: less
        padding); a text's vector does not depend on its batch."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dimension), np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._batch([texts[i] for i in rows], normalize)
        return out

    def _batch(self, texts: Iterable[str], normalize: bool | None) -> np.ndarray:
        encodings = self.tokenizer.encode_batch([self.prompt + t for t in texts])
        ids = mx.array([e.ids for e in encodings], dtype=mx.int32)
        mask = mx.array([e.attention_mask for e in encodings], dtype=mx.int32)
        types = mx.array([e.type_ids for e in encodings], dtype=mx.int32)
        vectors = self.model(ids, mask, types, normalize=normalize)
        return np.array(vectors.astype(mx.float32))


def _default_prompt(folder: Path, pooling_path: Path) -> str:
    """The prompt sentence-transformers puts before every text (its default_prompt_name's)."""
    settings = _json_or_empty(folder / "config_sentence_transformers.json")
    name = settings.get("default_prompt_name")
    prompt = (settings.get("prompts") or {}).get(name, "") if name else ""
    if prompt and _json(pooling_path / "config.json").get("include_prompt") is False:
        raise ConfigError(f"{folder} pools without its prompt (include_prompt=false); mlxlab "
                          "pools every token of a text, prompt included")
    return prompt


def _tokenizer(path: Path, max_position: int) -> tuple[Tokenizer, int]:
    """The Transformer module's tokenizer.json (in its `path`, beside its
    sentence_bert_config.json) set up as sentence-transformers uses it, and its truncation
    length."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingFileError(f"{file} is missing; mlxlab reads a fast tokenizer's tokenizer.json "
                               "(save the model again with a current sentence-transformers)")
    tok = Tokenizer.from_file(str(file))
    st_config = _json_or_empty(path / "sentence_bert_config.json")
    tok_config = _json_or_empty(path / "tokenizer_config.json")
    max_length = st_config.get("max_seq_length") or tok_config.get("model_max_length") or max_position
    max_length = min(int(max_length), max_position)
    if st_config.get("do_lower_case"):
        current = tok.normalizer
        tok.normalizer = normalizers.Sequence(
            [normalizers.Lowercase()] + ([current] if current is not None else []))
    pad = tok_config.get("pad_token", "[PAD]")
    pad = pad["content"] if isinstance(pad, dict) else pad
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ConfigError(f"{file} has no pad token {pad!r}")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    return tok, max_length
