"""Export of a run trained on a shrunken vocabulary (`data.vocab_remap`, data/vocab_remap.py).

Inside mlxlab such a run speaks the tokenizer's full vocabulary through `RemappedLM`, whose
dropped ids share UNK's probability (UNK's logit - log n). A Llama/mlx-lm layout cannot express
that offset (no output bias), so the export goes the other way: the small model keeps its own
ids and the tokenizer is remapped to them.

    ids 0..n-1   the kept tokens, in the run's order (the model's rows, bit for bit)
    id  n        UNK (`<|unk|>`): the model's UNK row; the BPE model's unk_token
    ids n+1..    BPE intermediates: tokens the kept tokens' merges pass through that were
                 dropped themselves ("th" on the way to "the"); their rows are copies of UNK's,
                 so reading one is reading UNK, as mlxlab reads every dropped id

The tokenizer keeps the merges whose result is a kept token or an intermediate (and so every
merge any kept token is built by): a text the run's tokenizer encodes in kept tokens only is
encoded to the same tokens, renumbered. A text that needs a dropped token gets it split into the
smaller pieces those merges still make, and a character the run never kept becomes UNK.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxlab.export.hf import ExportError

UNK = "<|unk|>"


def _merge_parts(merge: Any) -> tuple[str, str]:
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge  # tokenizers <0.20: "a b"
    return a, b


def _made(a: str, b: str, prefix: str) -> str:
    """The token a merge makes (a WordPiece-style prefix on b is dropped, as tokenizers does)."""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def closure(vocab: dict[str, int], merges: list, kept: set[str], prefix: str = "") -> set[str]:
    """The kept tokens and every token a merge producing one of them (recursively) starts from."""
    makers: dict[str, list[tuple[str, str]]] = {}
    for merge in merges:
        a, b = _merge_parts(merge)
        makers.setdefault(_made(a, b, prefix), []).append((a, b))
    needed, todo = set(kept), list(kept)
    while todo:
        for pair in makers.get(todo.pop(), ()):
            for part in pair:
                if part not in needed and part in vocab:
                    needed.add(part)
                    todo.append(part)
    return needed


def remap_tokenizer(tokenizer: dict, keep: Sequence[int]) -> tuple[dict, list[str]]:
    """tokenizer.json (as a dict) on the model's ids: kept token `keep[i]` -> i, UNK -> n, the
    intermediates after it (returned, in that order). Only BPE tokenizers can be remapped."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"a {model.get('type')} tokenizer cannot be remapped: export of a "
                          "data.vocab_remap run needs a BPE tokenizer.json")
    if model.get("end_of_word_suffix"):
        raise ExportError("a BPE tokenizer with end_of_word_suffix cannot be remapped")
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for added in tokenizer.get("added_tokens", []):
        by_id.setdefault(added["id"], added["content"])
    missing = [i for i in keep if i not in by_id]
    if missing:
        raise ExportError(f"the run kept ids {missing[:5]} that its tokenizer.json does not have")
    kept = [by_id[int(i)] for i in keep]
    unk = UNK
    while unk in vocab or unk in kept:  # a tokenizer that has the name already: a fresh one
        unk = f"<{unk}>"
    prefix = model.get("continuing_subword_prefix") or ""
    needed = closure(vocab, model.get("merges", []), set(kept), prefix)
    extra = sorted(needed - set(kept), key=vocab.__getitem__)  # in the tokenizer's own order
    new_vocab = {t: i for i, t in enumerate([*kept, unk, *extra])}
    out = json.loads(json.dumps(tokenizer))
    out["model"]["vocab"] = {t: i for t, i in new_vocab.items() if t in vocab or t == unk}
    # a merge that makes a dropped token goes: that token is split into what the others make
    out["model"]["merges"] = [m for m in model.get("merges", [])
                              if _made(*_merge_parts(m), prefix) in needed]
    out["model"]["unk_token"] = unk
    template = {k: v for k, v in (tokenizer.get("added_tokens") or [{}])[0].items()
                if k not in ("id", "content")} or {"special": True}
    out["added_tokens"] = [{**a, "id": new_vocab[a["content"]]}
                           for a in tokenizer.get("added_tokens", []) if a["content"] in new_vocab]
    out["added_tokens"].append({**template, "id": new_vocab[unk], "content": unk, "special": True})
    out["post_processor"] = _remap_ids(tokenizer.get("post_processor"), new_vocab)
    return out, extra


def _remap_ids(node: Any, vocab: dict[str, int]) -> Any:
    """A post-processor's special tokens on the new ids (TemplateProcessing: {id, ids, tokens};
    Bert/RobertaProcessing: [token, id] pairs); one that names a dropped token cannot be kept."""
    if isinstance(node, list):
        return [_remap_ids(v, vocab) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") in ("BertProcessing", "RobertaProcessing"):  # sep, cls: [token, id]
        pairs = {k: node[k] for k in ("sep", "cls") if k in node}
        if any(t not in vocab for t, _ in pairs.values()):
            raise ExportError(f"the tokenizer's post-processor adds {[t for t, _ in pairs.values()]}"
                              ", which the run dropped: it cannot be exported")
        return {**node, **{k: [t, vocab[t]] for k, (t, _) in pairs.items()}}
    if "ids" in node and "tokens" in node:
        if any(t not in vocab for t in node["tokens"]):
            raise ExportError(f"the tokenizer's post-processor adds {node['tokens']}, which the "
                              "run dropped: it cannot be exported")
        return {**node, "ids": [vocab[t] for t in node["tokens"]]}
    return {k: _remap_ids(v, vocab) for k, v in node.items()}


def add_unk_rows(model: Any, count: int) -> None:
    """`count` more rows on the embedding (and an untied lm_head), each a copy of UNK's (the
    last): the model's vocabulary then covers the intermediates' ids."""
    if count == 0:
        return

    def grown(weight: mx.array) -> mx.array:
        return mx.concatenate([weight, mx.repeat(weight[-1:], count, axis=0)])

    model.embed_tokens.weight = grown(model.embed_tokens.weight)
    if not model.tie_embeddings:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.update_architecture(vocab_size=model.architecture["vocab_size"] + count)


def write_remapped_tokenizer(tokenizer_path: Path, keep: Sequence[int], folder: Path) -> tuple[
        Path, dict]:
    """folder/tokenizer.json remapped to the model's ids; returns it and what the README of the
    export (export_report.json) records about it."""
    remapped, extra = remap_tokenizer(json.loads(Path(tokenizer_path).read_text()), keep)
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(remapped, ensure_ascii=False))
    return path, {"kept_tokens": len(keep), "unk_id": len(keep), "unk_token":
                  remapped["model"]["unk_token"], "intermediate_tokens": len(extra)}
