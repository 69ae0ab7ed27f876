"""A sentence-transformers model folder as an mlxlab SentenceEmbedder with its tokenizer.

The folder's modules.json lists its modules in order: a Transformer (config.json and
*.safetensors in its path: a BERT, RoBERTa or XLM-RoBERTa encoder, a ModernBERT through
mlx-embeddings, or a decoder mlx-lm has, as Qwen3-Embedding's), a Pooling (1_Pooling/config.json:
the modes), any number of Dense layers (their config.json and model.safetensors) and a last
Normalize. The tokenizer is the Transformer
path's tokenizer.json, truncated where sentence-transformers truncates (sentence_bert_config.json's
max_seq_length, else tokenizer_config.json's model_max_length, at most the positions the
encoder has) and padded on the right to the longest text of a batch; a text is prefixed with
the prompt named at encode time, else the folder's default prompt when it names one. A folder
that is no such model is one ConfigError / MissingFileError naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer, normalizers

from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.embedders.embedder import ACTIVATIONS, SentenceEmbedder
from mlxlab.models.embedders.pooling import pooling_modes
from mlxlab.models.encoders.bert import BertEncoder
from mlxlab.models.encoders.bert_hf import assign_weights, bert_config_from_hf, hf_to_mlxlab_name
from mlxlab.models.encoders.decoder_encoder import DecoderEncoder
from mlxlab.models.encoders.modernbert_config import check_modernbert_config, require_mlx_embeddings
from mlxlab.models.hf import weight_files
from mlxlab.runtime.memory.io_threads import load_arrays

MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# model_type values mlxlab's BertEncoder reads; RoBERTa's count positions from pad_token_id + 1
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")
OFFSET_POSITIONS = ("roberta", "xlm-roberta")
# encoders sentence-transformers ships that BertEncoder does not cover (attention, layout)
OTHER_ENCODERS = ("mpnet", "distilbert", "deberta-v2", "electra", "nomic_bert", "new")
MODERNBERT = "modernbert"  # through mlx-embeddings (encoders/modernbert_encoder.py)


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
    """SentenceEmbedder's `encoder` settings from the Transformer module's config.json:
    BertEncoder's keyword arguments for a BERT-layout encoder, {"hf_config": config} for a
    decoder mlx-lm has, {"modernbert": config} for ModernBERT (mlx-embeddings installed);
    another encoder family is one line naming what is supported."""
    config = _json(path / "config.json")
    model_type = config.get("model_type", "bert")  # as bert_config_from_hf reads an old config
    if model_type in OTHER_ENCODERS:
        raise ConfigError(f"{path}/config.json has model_type={model_type!r}, another encoder "
                          f"family; mlxlab embeds with {', '.join(ENCODER_TYPES)} and "
                          "ModernBERT encoders and mlx-lm's decoders (Qwen3-Embedding); MPNet "
                          "and DeBERTa are not supported")
    if model_type == MODERNBERT:
        check_modernbert_config(config, f"{path}/config.json")
        require_mlx_embeddings()
        return {"modernbert": config}
    if model_type not in ENCODER_TYPES:
        return _decoder_settings(path, config)
    if config.get("is_decoder"):
        raise ConfigError(f"{path}/config.json has is_decoder=true; an embedder needs a bidirectional "
                          "encoder")
    sizes = bert_config_from_hf(path, ENCODER_TYPES)
    padding_idx = int(config.get("pad_token_id", 1)) if model_type in OFFSET_POSITIONS else None
    return dict(vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"],
                num_layers=sizes["num_layers"], num_heads=sizes["num_heads"],
                intermediate_size=sizes["intermediate_size"], max_position=sizes["max_position"],
                type_vocab_size=sizes["type_vocab_size"], dropout=sizes["dropout"],
                norm_position=sizes["norm_position"], eps=sizes["layer_norm_eps"],
                padding_idx=padding_idx)


def _decoder_settings(path: Path, config: dict) -> dict:
    """A decoder's config.json, checked to be one mlx-lm builds (else one line)."""
    from mlxlab.models.mlx_lm_classes import model_classes

    try:
        _, args_class = model_classes(config, path)
    except ConfigError:
        raise ConfigError(f"{path}/config.json has model_type={config.get('model_type')!r}, "
                          f"neither an encoder mlxlab reads ({', '.join(ENCODER_TYPES)}) nor a "
                          "decoder mlx-lm has") from None
    try:
        args_class.from_dict(config)
    except TypeError as err:  # the dataclass names the fields the config lacks
        raise ConfigError(f"{path}/config.json is not a whole {config.get('model_type')} config "
                          f"({str(err).split(': ', 1)[-1]})") from None
    return {"hf_config": config}


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


def _encoder_name(name: str) -> str | None:
    """A BERT-layout checkpoint's name as ours (RoBERTa's `roberta.` prefix as BERT's)."""
    return name if name.startswith("dense.") else hf_to_mlxlab_name(name.removeprefix("roberta."))


def _decoder_name(name: str) -> str | None:
    """A decoder checkpoint's name (its base model's, or a causal LM's `model.`-prefixed) as
    ours; the language-model head is not an embedder's."""
    if name.startswith("dense."):
        return name
    return None if name.startswith("lm_head.") else f"encoder.decoder.{name.removeprefix('model.')}"


def _modernbert_name(name: str) -> str | None:
    """A ModernBERT checkpoint's name (its base model's, or a masked LM's `model.`-prefixed) as
    ours; the masked LM's head is not an embedder's."""
    if name.startswith("dense."):
        return name
    return None if name.startswith(("head.", "decoder.")) \
        else f"encoder.{name.removeprefix('model.')}"


def checkpoint_renamer(model: SentenceEmbedder) -> Callable[[str], str | None]:
    """A checkpoint name -> the model's name (None: a tensor an embedder does not hold), for
    the model's encoder."""
    if isinstance(model.encoder, DecoderEncoder):
        return _decoder_name
    if isinstance(model.encoder, BertEncoder):
        return _encoder_name
    return _modernbert_name


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
    loaded, _, missing = assign_weights(model, _weights(modules), checkpoint_renamer(model))
    if missing:
        raise ConfigError(f"{folder} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_weights(list(loaded.items()), strict=False)
    # read now, on this thread's stream: a server's request threads compute on their own, and
    # MLX evaluates an array only on a stream of the thread that made it
    mx.eval(model.parameters())


class TextEmbedder:
    """A sentence-transformers folder's model and tokenizer: texts (or their token ids) in,
    vectors out. `transformer` is the folder of its Transformer module (tokenizer files and
    config.json); `prompts` the folder's named prompts (config_sentence_transformers.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        modules = read_modules(self.folder)
        self.transformer = modules[0][1]
        self.model = _embedder(self.folder, modules)
        self.tokenizer, self.max_length, self.pad_id = _tokenizer(self.transformer,
                                                                  self.model.encoder.max_length)
        self.prompts, self.default_prompt = _prompts(self.folder, modules[1][1])

    @property
    def dimension(self) -> int:
        return self.model.dimension

    @property
    def vocab_size(self) -> int:
        """The ids its embedding table has (a token id input is one of 0 .. vocab_size - 1)."""
        return int(self.model.encoder.vocab_size)

    @property
    def normalizes(self) -> bool:
        """Whether the folder ends in a Normalize (its vectors are unit length by default)."""
        return bool(self.model.normalize)

    def prompt(self, name: str | None = None) -> str:
        """The text put before each text: the named prompt, else the folder's default."""
        if name is None:
            return self.default_prompt
        if name not in self.prompts:
            raise ConfigError(f"prompt {name!r} is not one of {self.folder}'s prompts "
                              f"({', '.join(self.prompts) or 'it names none'})")
        return self.prompts[name]

    def token_ids(self, texts: Sequence[str], prompt_name: str | None = None) -> list[list[int]]:
        """Each text's ids as the model reads them: prompt prefixed, special tokens added,
        truncated to max_length."""
        prompt = self.prompt(prompt_name)
        return [e.ids for e in self.tokenizer.encode_batch([prompt + t for t in texts])]

    def encode(self, texts: Sequence[str], batch_size: int = 32, normalize: bool | None = None,
               prompt_name: str | None = None) -> np.ndarray:
        """(len(texts), dimension) float32 vectors, row i = texts[i]; `normalize` None = as the
        folder says; `prompt_name` one of the folder's prompts (None: its default)."""
        return self.encode_ids(self.token_ids(texts, prompt_name), batch_size, normalize)

    def encode_ids(self, rows: Sequence[Sequence[int]], batch_size: int = 32,
                   normalize: bool | None = None) -> np.ndarray:
        """(len(rows), dimension) float32 vectors of token id rows (as token_ids gives them).
        Rows are batched longest first (as sentence-transformers does: less padding) and
        right-padded; a row's vector does not depend on its batch."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = np.zeros((len(rows), self.dimension), np.float32)
        for start in range(0, len(rows), batch_size):
            chosen = order[start:start + batch_size]
            out[chosen] = self._batch([rows[i] for i in chosen], normalize)
        return out

    def _batch(self, rows: Sequence[Sequence[int]], normalize: bool | None) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        vectors = self.model(mx.array(ids), mx.array(mask), mx.zeros(ids.shape, mx.int32),
                             normalize=normalize)
        return np.array(vectors.astype(mx.float32))


def _prompts(folder: Path, pooling_path: Path) -> tuple[dict[str, str], str]:
    """The folder's named prompts and the one sentence-transformers puts before every text by
    default (its default_prompt_name's, else none)."""
    settings = sentence_settings(folder)
    prompts = {str(k): str(v) for k, v in (settings.get("prompts") or {}).items()}
    name = settings.get("default_prompt_name")
    if any(prompts.values()) and _json(pooling_path / "config.json").get("include_prompt") is False:
        raise ConfigError(f"{folder} pools without its prompt (include_prompt=false); mlxlab "
                          "pools every token of a text, prompt included")
    return prompts, prompts.get(name, "") if name else ""


def sentence_settings(folder: Path) -> dict:
    """The folder's config_sentence_transformers.json (prompts, default prompt, similarity
    function), {} when it has none."""
    return _json_or_empty(folder / "config_sentence_transformers.json")


def truncation_length(path: Path, max_position: int) -> int:
    """Where sentence-transformers truncates a text of the Transformer module at `path`: its
    sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length,
    at most the `max_position` positions the encoder has."""
    st_config = _json_or_empty(path / "sentence_bert_config.json")
    tok_config = _json_or_empty(path / "tokenizer_config.json")
    max_length = st_config.get("max_seq_length") or tok_config.get("model_max_length") or max_position
    return min(int(max_length), max_position)


def _tokenizer(path: Path, max_position: int) -> tuple[Tokenizer, int, int]:
    """The Transformer module's tokenizer.json (in its `path`, beside its
    sentence_bert_config.json) set up as sentence-transformers uses it, its truncation length
    and its pad token's id."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingFileError(f"{file} is missing; mlxlab reads a fast tokenizer's tokenizer.json "
                               "(save the model again with a current sentence-transformers)")
    tok = Tokenizer.from_file(str(file))
    st_config = _json_or_empty(path / "sentence_bert_config.json")
    tok_config = _json_or_empty(path / "tokenizer_config.json")
    max_length = truncation_length(path, max_position)
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
    tok.no_padding()  # TextEmbedder pads its batches (on the right) itself
    return tok, max_length, pad_id
