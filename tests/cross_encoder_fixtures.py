"""Tiny cross-encoder folders written without torch, and what sentence-transformers computes on
them (cross_encoder_reference.json): CrossEncoder.predict's scores and its reranker losses, so
the default run checks parity without importing sentence-transformers (~10 s on 2 cores). A
folder is embedder_fixtures' 2-layer, 32-wide random BERT (its WordPiece tokenizer, pairs as
[CLS] a [SEP] b [SEP] with token types) under BertForSequenceClassification's names with a
random head, in three variants: `one` (1 label: CrossEncoder's Sigmoid), `three` (3 labels:
Identity), `identity` (1 label, activation_fn Identity in config.json's sentence_transformers
section, as sentence-transformers 4 and 5 save it). The slow tests recompute the reference;
`python tests/cross_encoder_fixtures.py` rewrites it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from embedder_fixtures import HIDDEN, LAYERS, VOCAB, _bert_weights, _tokenizer, _write_json
from mlxlab.models.embedders.cross_encoder import torch_path

REFERENCE = Path(__file__).with_name("cross_encoder_reference.json")
MAX_SEQ = 24  # tokenizer_config.json's model_max_length: the long pair is cut longest-first
PAIRS = [("The cat sat on the mat.", "dog"), ("", "a b c d"),
         ("Zebra! " * 12, "the THE  tHe,\tcat " * 6), ("the cat", "sat on the mat"),
         ("dog dog", "")]
LABELS = [1.0, 0.0, 1.0, 0.3, 0.0]  # BinaryCrossEntropyLoss's batch: PAIRS with these
LISTS = [("the cat", ["sat on the mat", "dog", "a b c"], [1.0, 0.0, 0.5]),
         ("zebra", ["mat", "Zebra!"], [0.0, 1.0])]  # ListNetLoss's batch (a padded list)
VARIANTS = {"one": (1, None), "three": (3, None), "identity": (1, "Identity")}


def write_cross_encoder(folder: Path, num_labels: int = 1, activation: str | None = None) -> Path:
    """A tiny BertForSequenceClassification folder (the module); the same weights each time."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    weights = {f"bert.{k}": v for k, v in _bert_weights(rng).items()}
    weights["classifier.weight"] = (rng.standard_normal((num_labels, HIDDEN)) * 0.5).astype(np.float32)
    weights["classifier.bias"] = (rng.standard_normal(num_labels) * 0.5).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    config = {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "vocab_size": len(VOCAB), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
    if activation:
        config["sentence_transformers"] = {"activation_fn": torch_path(activation)}
    _write_json(folder / "config.json", config)
    _tokenizer().save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_SEQ,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]"})
    return folder


def write_variants(root: Path) -> dict[str, Path]:
    return {name: write_cross_encoder(root / name, *spec) for name, spec in VARIANTS.items()}


def sentence_transformers_reference(folders: dict[str, Path]) -> dict:
    """CrossEncoder.predict's scores of PAIRS for each variant, and its losses on `one`:
    BinaryCrossEntropyLoss (pos_weight None and 2.5) on PAIRS with LABELS, ListNetLoss and
    LambdaLoss (its defaults) on LISTS."""
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import (
        BinaryCrossEntropyLoss,
        LambdaLoss,
        ListNetLoss,
    )

    scores = {name: CrossEncoder(str(f), device="cpu").predict(PAIRS, batch_size=2).tolist()
              for name, f in folders.items()}
    model = CrossEncoder(str(folders["one"]), device="cpu")
    model.eval()  # dropout off: the loss of the weights as they are
    queries, passages = [list(c) for c in zip(*PAIRS)]
    with torch.no_grad():
        bce = {str(w): float(BinaryCrossEntropyLoss(
                   model, pos_weight=None if w is None else torch.tensor(w))(
                   [queries, passages], torch.tensor(LABELS)))
               for w in (None, 2.5)}
        inputs = [[q for q, _, _ in LISTS], [d for _, d, _ in LISTS]]
        labels = [torch.tensor(v) for _, _, v in LISTS]
        listnet = float(ListNetLoss(model)(inputs, labels))
        lambda_loss = float(LambdaLoss(model)(inputs, labels))
    return {"scores": scores, "bce": bce, "listnet": listnet, "lambda": lambda_loss}


def stored_reference() -> dict:
    return json.loads(REFERENCE.read_text())


if __name__ == "__main__":  # rewrite cross_encoder_reference.json with the installed versions
    import tempfile
    from importlib.metadata import version

    with tempfile.TemporaryDirectory() as tmp:
        reference = sentence_transformers_reference(write_variants(Path(tmp)))
    REFERENCE.write_text(json.dumps({
        "written_by": {p: version(p) for p in ("sentence-transformers", "transformers", "torch")},
        **reference}, indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
