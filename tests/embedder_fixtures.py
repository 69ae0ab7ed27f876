"""A tiny sentence-transformers folder written without torch, and sentence-transformers' own
vectors for it (embedder_reference.json), so the default run checks parity without importing
sentence-transformers (~12 s on 2 cores). The folder is a 2-layer, 32-wide random BERT (seeded
numpy, Hugging Face names), a WordPiece tokenizer, Pooling with all six modes, Dense (tanh) and
Normalize, laid out as sentence-transformers 5+ saves one; `bare` keeps Transformer and Pooling
(legacy flags: CLS and max) only. The slow test recomputes the reference with
sentence-transformers; `python tests/embedder_fixtures.py` rewrites it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

REFERENCE = Path(__file__).with_name("embedder_reference.json")
TEXTS = ["The cat sat on the mat.", "dog", "", "Zebra! " * 40, "the THE  tHe,\tcat", "a b c d"]
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
         + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
         + ["the", "cat", "sat", "on", "mat", "dog", "!", ".", ","])
HIDDEN, LAYERS, FFN, DENSE_OUT, MAX_SEQ = 32, 2, 64, 16, 24
MODES = ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]
ST = "sentence_transformers."


def _bert_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": normal(len(VOCAB), HIDDEN),
         "embeddings.position_embeddings.weight": normal(64, HIDDEN),
         "embeddings.token_type_embeddings.weight": normal(2, HIDDEN),
         "embeddings.LayerNorm.weight": 1 + normal(HIDDEN), "embeddings.LayerNorm.bias": normal(HIDDEN),
         "pooler.dense.weight": normal(HIDDEN, HIDDEN), "pooler.dense.bias": normal(HIDDEN)}
    linears = {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
               "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
               "intermediate.dense": (FFN, HIDDEN), "output.dense": (HIDDEN, FFN)}
    for i in range(LAYERS):
        for name, shape in linears.items():
            w[f"encoder.layer.{i}.{name}.weight"] = normal(*shape)
            w[f"encoder.layer.{i}.{name}.bias"] = normal(shape[0])
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"encoder.layer.{i}.{norm}.weight"] = 1 + normal(HIDDEN)
            w[f"encoder.layer.{i}.{norm}.bias"] = normal(HIDDEN)
    return w


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def write_tiny_folder(folder: Path, bare: bool = False) -> Path:
    """The tiny folder (module docstring) at `folder`; the same weights every time."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    save_file(_bert_weights(rng), str(folder / "model.safetensors"))
    _write_json(folder / "config.json", {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(VOCAB),
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "intermediate_size": FFN, "hidden_act": "gelu", "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0})
    _tokenizer().save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]"})
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ,
                                                       "do_lower_case": False})
    modules = [("", "base.modules.transformer.Transformer"),
               ("1_Pooling", "sentence_transformer.modules.pooling.Pooling")]
    if bare:
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True,
            "pooling_mode_max_tokens": True})
    else:
        _write_json(folder / "1_Pooling" / "config.json", {
            "embedding_dimension": HIDDEN, "pooling_mode": MODES, "include_prompt": True})
        _write_json(folder / "2_Dense" / "config.json", {
            "in_features": HIDDEN * len(MODES), "out_features": DENSE_OUT, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"})
        save_file({"linear.weight": (rng.standard_normal((DENSE_OUT, HIDDEN * len(MODES))) * 0.2
                                     ).astype(np.float32),
                   "linear.bias": (rng.standard_normal(DENSE_OUT) * 0.2).astype(np.float32)},
                  str(folder / "2_Dense" / "model.safetensors"))
        _write_json(folder / "3_Normalize" / "config.json", {})
        modules += [("2_Dense", "base.modules.dense.Dense"),
                    ("3_Normalize", "base.modules.normalize.Normalize")]
    _write_json(folder / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": ST + kind}
        for i, (path, kind) in enumerate(modules)])
    return folder


def sentence_transformers_vectors(folder: Path, texts: list[str]) -> np.ndarray:
    """What sentence-transformers' own encode returns for `texts` (CPU, float32)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=4)


def stored_reference() -> dict[str, np.ndarray]:
    """{"full", "bare"}: sentence-transformers' vectors of TEXTS, as embedder_reference.json
    keeps them."""
    data = json.loads(REFERENCE.read_text())
    return {name: np.array(rows, dtype=np.float32) for name, rows in data["vectors"].items()}


def live_reference(root: Path) -> dict[str, np.ndarray]:
    return {name: sentence_transformers_vectors(write_tiny_folder(root / name, name == "bare"),
                                                TEXTS)
            for name in ("full", "bare")}


if __name__ == "__main__":  # rewrite embedder_reference.json with the installed versions
    import tempfile
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        vectors = live_reference(Path(tmp))
    REFERENCE.write_text(json.dumps({
        "written_by": {p: version(p) for p in ("sentence-transformers", "transformers", "torch")},
        "texts": TEXTS,
        "vectors": {name: [[float(f"{x:.9g}") for x in row] for row in v.tolist()]
                    for name, v in vectors.items()},
    }, indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
