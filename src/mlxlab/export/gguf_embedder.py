"""A BERT text embedder as one GGUF file for llama.cpp's embedding mode (llama-server
--embedding, llama-embedding, Ollama's embed), laid out as llama.cpp's converter
(convert_hf_to_gguf.py, its BertModel) writes one, and checked by llama.cpp itself.

    export_embedder_gguf("path/to/all-MiniLM-L6-v2", "minilm.gguf", quant="f16") -> report
    export_embedder_gguf("outputs/embed_retrieval/<time>", "ft.gguf", quant="q8_0") -> report

What llama.cpp's BERT graph computes is a post-norm BERT with absolute positions, then one
pooling (mean, CLS or last token: `bert.pooling_type`), normalized by the caller (llama-server
scales to unit length by default). So a folder with Dense layers, several pooling modes, another
encoder family (RoBERTa's offset positions, a decoder) or a default prompt (a GGUF carries no
prompts) is refused before anything is written. The vocabulary goes in as llama.cpp's WordPiece
model ("bert": a word-initial piece marked with "▁", a continuation without its "##"). The
tensors keep the Hugging Face names through the `gguf` package's own name map.

The matrices go out in the --quant type, F16 or one of the legacy types gguf-py quantizes (Q8_0,
Q5_1, Q5_0, Q4_1, Q4_0; gguf-py has no K-quants), the token embedding with them; what
convert_hf_to_gguf.py keeps F32 in every file type stays F32: the 1-D tensors (norms, biases)
and the position and token-type tables; a matrix whose rows are not whole blocks falls back to
F16 as the converter's does (gguf.py's encode_tensor). Where the `xllamacpp` wheel is
installed, llama.cpp loads the written f32 or f16 file in embedding mode and embeds a probe of
texts: each vector must have cosine >= 1 - 1e-4 with mlxlab's (both are within 1e-5), else the
file is refused and removed. A quantized file cannot pass that: its retention is measured in
llama.cpp instead and gates it (embedder_retention.py). The source is a sentence-transformers
folder or an embedder run (its best weights; its retrieval set and base for the retention).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from mlxlab.checkpoint import CheckpointState
from mlxlab.export.embedder import PROBE, is_embedder_run, load_embedder_source
from mlxlab.export.gguf import GGUFExportError, encode_tensor, file_types, gguf_package
from mlxlab.models.embedders.sentence_folder import TextEmbedder
from mlxlab.models.embedders.sentence_folder_save import encoder_weights
from mlxlab.models.encoders.bert import BertEncoder

EXACT = ("f32", "f16")  # within the check of llama.cpp's vectors against mlxlab's
LEGACY = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what gguf-py quantizes: judged by retention
QUANTS = (*EXACT, *LEGACY)
POOLING = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}  # gguf.PoolingType members
MIN_COSINE = 1 - 1e-4
# tables llama.cpp's BERT graph adds to float32 activations as they are (its converter keeps them
# F32 in every file type): the position and token-type embeddings
F32_TABLES = ("position_embd.", "token_types.")


def export_embedder_gguf(source: str | Path, out: str | Path, quant: str = "f16",
                         overwrite: bool = False, check: bool = True,
                         accept_loss: bool = False) -> dict:
    """The embedder at `source` (a sentence-transformers folder or an embedder run) as the GGUF
    file `out` (module docstring); the report. `accept_loss` writes a quantized file that lost
    the embedder (embedder_retention.py), flagged."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    _check_options(quant, out, overwrite, check, accept_loss)
    embedder = load_embedder_source(source)
    check_for_llama_cpp(embedder)
    reference = None
    if quant in LEGACY:  # the source's vectors and scores, before the file exists
        from mlxlab.export.embedder_retention import embedder_reference

        reference = embedder_reference(embedder, embedder_run_state(source))
    pending = out.with_name(f".{out.stem}.pending-{os.getpid()}.gguf")
    try:
        types = write_embedder_gguf(embedder, pending, quant, name=source.name)
        report = {"source": str(source), "gguf": str(out), "architecture": "bert",
                  "quant": quant, "pooling": embedder.model.pooling[0], "tensor_types": types,
                  "bytes": pending.stat().st_size}
        if reference is not None:
            from mlxlab.export.embedder_retention import judge_embedder_file

            report["check"] = {"status": "measured", "why": "a quantized file: its retention"}
            report["retention"] = judge_embedder_file(reference, embedder, pending, str(out),
                                                      accept_loss)
        else:
            report["check"] = (llama_cpp_check(embedder, pending) if check else
                               {"status": "unchecked", "why": "--no-check"})
        os.replace(pending, out)
    finally:
        pending.unlink(missing_ok=True)
    if reference is not None:
        report["retention"]["recorded"] = _record(reference.state, out, report["retention"])
    return report


def _check_options(quant: str, out: Path, overwrite: bool, check: bool,
                   accept_loss: bool) -> None:
    """What this export cannot do, one line each, before anything is read."""
    if quant not in QUANTS:
        kquant = "; gguf-py has no K-quants" if quant.lower().startswith(("q4_k", "q5_k", "q6_k")
                                                                        ) else ""
        raise GGUFExportError(f"--quant {quant}: an embedder's GGUF is one of "
                              f"{', '.join(QUANTS)} (the types gguf-py writes{kquant})")
    if out.suffix != ".gguf":
        raise GGUFExportError(f"--out {out}: a GGUF export is one file; name it *.gguf")
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{out} exists: pick a new --out or pass --overwrite")
    if quant in EXACT and accept_loss:
        raise GGUFExportError(f"--accept-loss judges a quantized file; --quant {quant} gives the "
                              "source's vectors: drop --accept-loss")
    if quant in LEGACY and not check:
        raise GGUFExportError(f"--no-check: a --quant {quant} file is judged by its retention, "
                              "measured in llama.cpp: drop --no-check (--accept-loss writes a "
                              "loss anyway)")
    if quant in LEGACY and importlib.util.find_spec("xllamacpp") is None:
        raise GGUFExportError(f"--quant {quant}: a quantized embedder is judged in llama.cpp, "
                              "which comes in the xllamacpp wheel: pip install xllamacpp, or "
                              "export --quant f16")


def embedder_run_state(source: Path) -> CheckpointState | None:
    """An embedder run's checkpoint state (its config: the retrieval set, the base, the MLflow
    run), None for a folder."""
    if not is_embedder_run(source):
        return None
    from mlxlab.runs.model import choose_checkpoint

    return CheckpointState.read(choose_checkpoint(source))


def _record(state: CheckpointState | None, out: Path, entry: dict) -> str:
    """The written file's retention recorded on the run's MLflow run (retention.record): where,
    or why not."""
    if state is None:
        return "no: a folder, not a run"
    from mlxlab.export.retention import record

    return record(state, out.name, entry) or "on the run's MLflow run"


def check_for_llama_cpp(embedder: TextEmbedder) -> None:
    """What llama.cpp's BERT graph cannot compute, refused in one line."""
    model = embedder.model
    encoder = model.encoder
    if not isinstance(encoder, BertEncoder) or encoder.embeddings.padding_idx is not None:
        raise GGUFExportError("--format gguf writes BERT embedders (llama.cpp's BERT graph); "
                              "this one's Transformer is another family: export it with "
                              "--format sentence-transformers")
    if "final_norm" in encoder:
        raise GGUFExportError("a pre-norm encoder has no llama.cpp BERT layout")
    if model.dense:
        raise GGUFExportError(f"{len(model.dense)} Dense layer(s) after the pooling: llama.cpp's "
                              "BERT embeddings end at the pooling; export --format "
                              "sentence-transformers")
    if len(model.pooling) != 1 or model.pooling[0] not in POOLING:
        raise GGUFExportError(f"pooling {list(model.pooling)}: llama.cpp pools with one of "
                              f"{', '.join(POOLING)}")
    if embedder.default_prompt:
        raise GGUFExportError("the folder puts a default prompt before every text, which a GGUF "
                              "cannot carry: export --format sentence-transformers")


def write_embedder_gguf(embedder: TextEmbedder, out: Path, quant: str, name: str
                        ) -> dict[str, int]:
    """The file itself: metadata, the WordPiece vocabulary, the tensors (module docstring on
    which stay F32); returns how many tensors went out as which type."""
    g = gguf_package()
    encoder = embedder.model.encoder
    block = encoder.layers[0]
    writer = g.GGUFWriter(str(out), g.MODEL_ARCH_NAMES[g.MODEL_ARCH.BERT])
    writer.add_name(name)
    writer.add_context_length(encoder.embeddings.max_position)
    writer.add_embedding_length(encoder.hidden_size)
    writer.add_feed_forward_length(int(block.mlp.up.weight.shape[0]))
    writer.add_block_count(len(encoder.layers))
    writer.add_head_count(int(block.attention.num_heads))
    writer.add_layer_norm_eps(float(block.attention_norm.eps))
    writer.add_causal_attention(False)
    writer.add_pooling_type(g.PoolingType[POOLING[embedder.model.pooling[0]]])
    qtype, file_type = file_types()[quant]
    writer.add_file_type(file_type)
    if "token_type_embeddings" in encoder.embeddings:
        writer.add_token_type_count(int(encoder.embeddings.token_type_embeddings.weight.shape[0]))
    _write_wordpiece(writer, embedder, g)
    writer.add_quantization_version(g.GGML_QUANT_VERSION)
    names = g.TensorNameMap(g.MODEL_ARCH.BERT, len(encoder.layers))
    counts: dict[str, int] = {}
    for hf_name, value in encoder_weights(embedder.model).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"{hf_name} has no llama.cpp BERT tensor")
        kept = g.GGMLQuantizationType.F32 if gguf_name.startswith(F32_TABLES) else qtype
        data, kind = encode_tensor(np.array(value, dtype=np.float32), kept)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _write_wordpiece(writer, embedder: TextEmbedder, g) -> None:
    """tokenizer.json's WordPiece vocabulary in llama.cpp's form, its special tokens' ids."""

    spec = json.loads((embedder.transformer / "tokenizer.json").read_text())
    model = spec.get("model") or {}
    if model.get("type") != "WordPiece":
        raise GGUFExportError("llama.cpp's BERT reads a WordPiece vocabulary; this tokenizer is "
                              f"{model.get('type')}: export --format sentence-transformers")
    prefix = model.get("continuing_subword_prefix", "##")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    size = embedder.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [g.TokenType.UNUSED] * size
    for text, index in vocab:
        if index >= size:
            continue
        if text in special:
            tokens[index], types[index] = text, g.TokenType.CONTROL
        else:  # llama.cpp's WPM: a word's first piece after "▁", a continuation bare
            tokens[index] = text[len(prefix):] if text.startswith(prefix) else "\u2581" + text
            types[index] = g.TokenType.NORMAL
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _write_special_ids(writer, embedder, model["vocab"])


def _write_special_ids(writer, embedder: TextEmbedder, vocab: dict[str, int]) -> None:
    """The special tokens' ids, named in tokenizer_config.json: llama.cpp's WordPiece puts its
    BOS (the [CLS]) before a text and its SEP after it, and without the keys falls back to
    bert-base's ids (101, 102, ...)."""
    import json

    file = embedder.transformer / "tokenizer_config.json"
    named = json.loads(file.read_text()) if file.is_file() else {}
    defaults = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "unk_token": "[UNK]", "mask_token": "[MASK]"}
    ids = {}
    for key, default in defaults.items():
        token = named.get(key) or default
        token = token["content"] if isinstance(token, dict) else token
        if token not in vocab:
            raise GGUFExportError(f"the tokenizer has no {key} {token!r}, which llama.cpp's "
                                  "WordPiece needs")
        ids[key] = vocab[token]
    writer.add_bos_token_id(ids["cls_token"])
    writer.add_sep_token_id(ids["sep_token"])
    writer.add_eos_token_id(ids["sep_token"])
    writer.add_pad_token_id(ids["pad_token"])
    writer.add_unk_token_id(ids["unk_token"])
    writer.add_mask_token_id(ids["mask_token"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)


def llama_cpp_check(embedder: TextEmbedder, file: Path) -> dict:
    """llama.cpp (the xllamacpp wheel) embeds PROBE from the written file (a text longer than
    the model takes as mlxlab's truncated ids: llama.cpp does not truncate); each vector's
    cosine with mlxlab's must be >= MIN_COSINE, else the file is refused."""
    try:
        import xllamacpp as xl
    except ImportError:
        return {"status": "unchecked", "why": "xllamacpp (llama.cpp's wheel) is not installed"}
    from mlxlab.export.embedder_retention import cosines, llama_cpp_vectors

    texts = list(PROBE)
    worst = float(cosines(llama_cpp_vectors(embedder, file, texts), embedder.encode(texts)).min())
    if worst < MIN_COSINE:
        raise GGUFExportError(f"llama.cpp's embedding of the written file has cosine {worst:.6f} "
                              f"with mlxlab's (needs >= {MIN_COSINE}): not exported")
    return {"status": "checked", "checker": f"llama.cpp (xllamacpp {xl.__version__})",
            "min_cosine": worst, "texts": len(texts)}
