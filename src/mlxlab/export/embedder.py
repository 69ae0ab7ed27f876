"""A text embedder written as a sentence-transformers folder, and proved by reading it back.

    export_embedder("path/to/embedder", "exported/embedder") -> report dict

The embedder is what mlxlab loads from a sentence-transformers folder (models/sentence_folder.py:
a BERT, RoBERTa / XLM-R or decoder Transformer, Pooling, Dense layers, Normalize). The folder is
written from the model in memory, laid out as sentence-transformers saves one: modules.json; the
Transformer at the top (config.json, model.safetensors in the Hugging Face base model's names,
float32, BERT's unused pooler kept as the source has it, the tokenizer files,
sentence_bert_config.json); 1_Pooling/config.json; N_Dense/
(config.json, model.safetensors); N_Normalize/; config_sentence_transformers.json (the named
prompts and the default one). Then it proves itself before it is renamed into place: mlxlab
reads the written folder, and sentence-transformers too where it is installed, and both must
give the embedder's own vectors on a probe of texts (every named prompt too) within 1e-5, else
the export is refused with the measured gap and nothing is moved to `out`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlxlab.export.hf import ExportError
from mlxlab.export.staging import staged_folder
from mlxlab.models.bert import BertEncoder
from mlxlab.models.decoder_encoder import DecoderEncoder
from mlxlab.models.embedder import SentenceEmbedder
from mlxlab.models.hf import mlxlab_to_hf_name, weight_files
from mlxlab.models.pooling import LEGACY_FLAGS
from mlxlab.models.sentence_folder import TextEmbedder, is_sentence_folder
from mlxlab.runtime.memory.io_threads import load_arrays

PROBE = ["The cat sat on the mat.", "A man is riding a horse.", "Café naïve résumé, ÀÉÎ",
         "中文 text 日本語", "", "word " * 200, "Is this the query or the document?"]
ALLOWED_GAP = 1e-5  # float32 written as float32: the read-back's own rounding is ~1e-7
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")
TORCH_ACTIVATIONS = {"Identity": "torch.nn.modules.linear.Identity"}  # else activation.<name>
ST_TYPE = "sentence_transformers.models."  # the module paths every sentence-transformers reads


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
        write_sentence_folder(embedder, tmp)
        report["check"] = prove(embedder, tmp, check)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_embedder_source(source: Path) -> TextEmbedder:
    """The embedder at `source` (a sentence-transformers folder), or one line saying what is."""
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a sentence-transformers folder")
    if not is_sentence_folder(source):
        raise ExportError(f"{source} is not a sentence-transformers folder (no modules.json); "
                          "--format sentence-transformers exports an embedder")
    return TextEmbedder(source)


def write_sentence_folder(embedder: TextEmbedder, folder: Path) -> None:
    """The embedder's modules into `folder` (an empty one), as the module docstring lays out."""
    model = embedder.model
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    _write_transformer(embedder, folder)
    _write_json(folder / "1_Pooling" / "config.json", pooling_config(model))
    for layer in model.dense:
        path = f"{len(modules)}_Dense"
        _write_dense(layer, folder / path)
        modules.append((path, "Dense"))
    if model.normalize:
        path = f"{len(modules)}_Normalize"
        (folder / path).mkdir()
        modules.append((path, "Normalize"))
    _write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": ST_TYPE + kind}
        for i, (path, kind) in enumerate(modules)])
    named = [n for n, p in embedder.prompts.items() if p == embedder.default_prompt]
    _write_json(folder / "config_sentence_transformers.json", {
        "prompts": embedder.prompts,
        "default_prompt_name": named[0] if embedder.default_prompt and named else None,
        "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})


def _write_transformer(embedder: TextEmbedder, folder: Path) -> None:
    """config.json (the source's, its dtype float32), the encoder's weights, the tokenizer's
    files and sentence_bert_config.json."""
    source = embedder.transformer
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    _write_json(folder / "config.json", config)
    weights = {**_unused_source_tensors(source), **encoder_weights(embedder.model)}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    settings_file = source / "sentence_bert_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    _write_json(folder / "sentence_bert_config.json",
                {"do_lower_case": False, **settings, "max_seq_length": embedder.max_length})


def encoder_weights(model: SentenceEmbedder) -> dict[str, mx.array]:
    """The encoder's parameters under the Hugging Face base model's names (BertModel's,
    RobertaModel's, a decoder's Qwen3Model's, ModernBertModel's: its own), float32."""
    params = tree_flatten(model.encoder.parameters())
    if isinstance(model.encoder, DecoderEncoder):
        return {name.removeprefix("decoder."): value.astype(mx.float32) for name, value in params}
    if not isinstance(model.encoder, BertEncoder):  # ModernBERT: transformers' names already
        return {name: value.astype(mx.float32) for name, value in params}
    try:
        return {mlxlab_to_hf_name(f"encoder.{name}").removeprefix("bert."): value.astype(mx.float32)
                for name, value in params}
    except ValueError as err:  # a pre-norm encoder's final norm
        raise ExportError(f"this encoder has no Hugging Face layout: {err}") from None


def _unused_source_tensors(source: Path) -> dict[str, mx.array]:
    """BERT's pooler as the source holds it: no embedding reads it, but transformers' BertModel
    has one and would report it missing (and draw it at random) without it."""
    kept = {}
    for file in weight_files(source):
        for name, value in load_arrays(file).items():
            plain = name.removeprefix("bert.").removeprefix("roberta.")
            if plain.startswith("pooler."):
                kept[plain] = value.astype(mx.float32)
    return kept


def pooling_config(model: SentenceEmbedder) -> dict:
    """1_Pooling/config.json: the legacy flags every sentence-transformers reads, or (modes in
    another order than the flags concatenate) the `pooling_mode` list of version 5 and later."""
    config: dict = {"word_embedding_dimension": model.encoder.hidden_size, "include_prompt": True}
    canonical = [mode for mode in LEGACY_FLAGS.values() if mode in model.pooling]
    if canonical == list(model.pooling):
        config.update({flag: mode in model.pooling for flag, mode in LEGACY_FLAGS.items()})
    else:
        config["pooling_mode"] = list(model.pooling)
    return config


def _write_dense(layer, folder: Path) -> None:
    out_features, in_features = layer.linear.weight.shape
    name = layer.activation_name
    _write_json(folder / "config.json", {
        "in_features": int(in_features), "out_features": int(out_features),
        "bias": "bias" in layer.linear, "use_residual": bool(layer.use_residual),
        "activation_function": TORCH_ACTIVATIONS.get(name, f"torch.nn.modules.activation.{name}")})
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in tree_flatten(layer.parameters())},
                        metadata={"format": "pt"})


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


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
