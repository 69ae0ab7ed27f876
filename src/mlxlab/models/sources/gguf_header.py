"""A GGUF header checked against the tensors the file holds, before anything is converted.

The header's sizes (block count, head counts, widths, vocabulary) are what the model is built
from; the tensors are what it loads. A file whose header says otherwise than its tensors (edited
by hand, written by a broken converter, spliced from two models) cannot load, and fails deep in
a reshape or in mlx-lm's weight loading, naming neither the file nor the key. These checks read
only the header and the tensors' shapes (nothing is dequantized) and say which key disagrees
with which tensor:

- `block_count` equals the blocks `blk.0 .. blk.N-1` present, each once;
- the token embedding has the header's width and at least a row per token of the vocabulary
  (`vocab_size`, where the header states it, is its row count);
- `attention.head_count` / `head_count_kv` divide the attention projections' rows into heads of
  one size (`attention.key_length` where stated), and the key/value heads divide the query heads;
- `rope.dimension_count` is at most the head size;
- then every tensor has the shape the model built from the header's config expects
  (`check_shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mlxlab.errors import ConfigError

# (rows, columns) of a 2-D tensor as the model holds it; a 1-D one is (length,)
Shape = tuple[int, ...]
SHOWN = 3  # contradictions named in the one line
# the header's sizes the checks read (after `<arch>.`): whole numbers (head counts may be one a layer)
SIZES = ("block_count", "vocab_size", "embedding_length", "feed_forward_length",
         "attention.head_count", "attention.head_count_kv", "attention.key_length",
         "attention.value_length", "rope.dimension_count")


def _whole(value: object) -> bool:
    if isinstance(value, list):
        return all(_whole(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_shapes(tensors: list) -> dict[str, Shape]:
    """{name: shape} of gguf-py's tensors, slowest-moving dimension first (GGUF lists the
    fastest first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in tensors}


def check_header(metadata: Mapping, shapes: Mapping[str, Shape], path: Path) -> None:
    """One ConfigError naming the file and every contradiction between its header and its
    tensors (module docstring), or nothing."""
    arch = metadata["general.architecture"]
    problems = [f"{key}={metadata[key]!r} is not a whole number" for key in
                (f"{arch}.{name}" for name in SIZES) if key in metadata
                and not _whole(metadata[key])]
    if not problems:
        problems = [*_blocks(metadata, shapes, arch), *_embedding(metadata, shapes, arch),
                    *_heads(metadata, shapes, arch)]
    if problems:
        raise contradiction(path, problems)


def check_shapes(expected: Mapping[str, Shape], names: Mapping[str, str],
                 shapes: Mapping[str, Shape], metadata: Mapping, path: Path) -> None:
    """Every tensor of the file has the shape of the parameter it loads into (`expected`, by
    Hugging Face name, from the model built from the header's config; `names` maps the file's
    names to those). A parameter without a tensor is mlx-lm's to judge (its `sanitize` drops a
    tied output layer): the converted folder's strict load says so."""
    arch = metadata["general.architecture"]
    wrong = [f"{name} is {_dims(shape)}, not {_dims(want)}" for name, shape in shapes.items()
             if (want := expected.get(names.get(name, ""))) is not None and tuple(want) != shape]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors have other shapes than the header's sizes "
                        f"({_sizes(metadata, arch)}) make them: "
                        f"{', '.join(sorted(wrong)[:SHOWN])}{', ...' if len(wrong) > SHOWN else ''}")
    if problems:
        raise contradiction(path, problems)


def contradiction(path: Path, problems: list[str]) -> ConfigError:
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return ConfigError(f"model.pretrained={path}: the GGUF header contradicts its tensors: "
                       f"{'; '.join(problems[:SHOWN])}{more}; the file is damaged or was written "
                       "wrong: convert or download it again")


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def _sizes(metadata: Mapping, arch: str) -> str:
    return ", ".join(f"{key} {metadata[f'{arch}.{key}']}" for key in SIZES[2:]
                     if f"{arch}.{key}" in metadata)


def _blocks(metadata: Mapping, shapes: Mapping[str, Shape], arch: str) -> list[str]:
    present = sorted({int(part) for name in shapes
                      if name.startswith("blk.") and (part := name.split(".")[1]).isdigit()})
    count = metadata.get(f"{arch}.block_count")
    if count is None:
        return [f"no {arch}.block_count, and {len(present)} blocks of tensors"]
    if present != list(range(int(count))):
        held = (f"blocks {present[0]}..{present[-1]} ({len(present)} of them)" if present
                else "no blocks")
        return [f"{arch}.block_count={count} but the file holds {held}"]
    return []


def _embedding(metadata: Mapping, shapes: Mapping[str, Shape], arch: str) -> list[str]:
    embedding = shapes.get("token_embd.weight")
    if embedding is None or len(embedding) != 2:
        return ["no 2-D token_embd.weight (the token embedding)"]
    rows, width = embedding
    problems = []
    tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
    if tokens > rows:
        problems.append(f"the vocabulary has {tokens} tokens but token_embd.weight has {rows} rows")
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is not None and int(vocab) != rows:
        problems.append(f"{arch}.vocab_size={vocab} but token_embd.weight has {rows} rows")
    hidden = metadata.get(f"{arch}.embedding_length")
    if hidden is not None and int(hidden) != width:
        problems.append(f"{arch}.embedding_length={hidden} but token_embd.weight is {width} wide")
    return problems


def _heads(metadata: Mapping, shapes: Mapping[str, Shape], arch: str) -> list[str]:
    heads = metadata.get(f"{arch}.attention.head_count")
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        return []  # per-layer counts (a list): the shape check below the header's says it
    key = f"{arch}.attention.head_count"
    recurrent = any(".ssm_" in name for name in shapes)  # Mamba: no attention, no heads
    if (heads <= 0 or kv_heads <= 0) and not (recurrent and heads == kv_heads == 0):
        return [f"{key}={heads}, {key}_kv={kv_heads}: a model has at least one head"]
    if heads == 0:
        return []
    key_length = metadata.get(f"{arch}.attention.key_length")
    for block in range(int(metadata.get(f"{arch}.block_count") or 0)):
        found = _head_size(shapes, block, heads, kv_heads, key)
        if isinstance(found, str):
            return [found]
        if found is None:
            continue
        if heads % kv_heads:
            return [f"{key}_kv={kv_heads} does not divide {key}={heads}"]
        if key_length is not None and found != int(key_length):
            return [f"{arch}.attention.key_length={key_length} but blk.{block}'s attention has "
                    f"heads of {found} ({key}={heads})"]
        rope = metadata.get(f"{arch}.rope.dimension_count")
        if rope is not None and int(rope) > found:
            return [f"{arch}.rope.dimension_count={rope} is more than the heads' size {found} "
                    f"({key}={heads}, blk.{block}'s attention)"]
        return []  # the first block with attention tells; check_shapes does the rest
    return []


def _head_size(shapes: Mapping[str, Shape], block: int, heads: int, kv_heads: int,
               key: str) -> int | str | None:
    """The head size block `block`'s attention projections and the head counts give, a
    contradiction, or None (no attention tensors in the block)."""
    q, k = shapes.get(f"blk.{block}.attn_q.weight"), shapes.get(f"blk.{block}.attn_k.weight")
    qkv = shapes.get(f"blk.{block}.attn_qkv.weight")
    if q is not None and k is not None:
        if q[0] % heads:
            return f"{key}={heads} does not divide blk.{block}.attn_q.weight's {q[0]} rows"
        if k[0] % kv_heads:
            return f"{key}_kv={kv_heads} does not divide blk.{block}.attn_k.weight's {k[0]} rows"
        if q[0] // heads != k[0] // kv_heads:
            return (f"{key}={heads} and {key}_kv={kv_heads} make query heads of {q[0] // heads} "
                    f"(blk.{block}.attn_q.weight: {q[0]} rows) and key heads of "
                    f"{k[0] // kv_heads} (attn_k: {k[0]} rows)")
        return q[0] // heads
    if qkv is not None:  # one fused projection: query, key and value heads of one size
        parts = heads + 2 * kv_heads
        if qkv[0] % parts:
            return (f"{key}={heads} and {key}_kv={kv_heads} ({parts} heads in all) do not "
                    f"divide blk.{block}.attn_qkv.weight's {qkv[0]} rows")
        return qkv[0] // parts
    return None
