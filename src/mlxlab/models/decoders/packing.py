"""Packed rows: several examples in one sequence, each attending only to itself.

A packed batch (data/completions.py, `data.pack=true`) carries `segment_ids` (B, T): the example
each position belongs to, numbered from 1 in each sequence, 0 for the padding after the last
example. Here, in one place, the models turn them into what attention needs:

- `segment_mask`: the block-diagonal causal mask, (B, 1, T, T) additive 0 / -inf: position i
  attends to j when j <= i and both are in the same example;
- `segment_positions`: each position's place in its own example (0, 1, ... restarting at every
  example), for models that add learned absolute positions;
- `attention_segments`: a context in which the masks mlx-lm's decoders build
  (`create_attention_mask`, wrapped by models/decoders/mlx_lm_fused.py) are combined with that mask
  (`packed_mask`), and the attention calls that receive one are counted (`count_packed_mask`),
  so a model whose layers mix positions elsewhere is refused instead of letting its rows see
  each other.

Why RoPE models need no position restart: a rotary score depends on the two positions' distance
only, so an example starting at position p scores as it would at 0 (the tests check the packed
logits against the unpacked ones on real models). Sliding windows are relative too: the window
mask mlx-lm builds is AND-ed with the segment mask. Learned absolute positions are not relative
(mlx-lm's GPT-2-style models are refused; mlxlab's own Transformer restarts them). A hybrid's
short convolutions and gated-delta or Mamba-2 rules carry each token into the next; they start
each example afresh through models/layers/packed_rows.py (inside attention_segments), and each
rule and convolution that did counts (sequence_mixers: the count a model's layers must reach). A
model whose layers mix rows otherwise (an attention with a mask of its own making, mlx-lm's
Mamba-2 scan) is refused by that count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlxlab.errors import ConfigError
from mlxlab.models.layers import packed_rows
from mlxlab.models.layers.packed_rows import positions_in_rows

# module names that hold learned absolute position embeddings in mlx-lm's and mlxlab's models
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def segment_mask(segment_ids: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(B, T) segment ids -> (B, 1, T, T) additive mask: 0 where query i may attend key j (j <= i,
    the same segment), -inf elsewhere. Padding (segment 0) attends to itself only."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = mx.arange(t)[:, None] >= mx.arange(t)[None, :]
    allowed = (same & causal)[:, None]
    return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


# (B, T) each position's index inside its own segment (0 at every segment's first token)
segment_positions = positions_in_rows


def combine_masks(segments: mx.array, mask: mx.array | str | None) -> mx.array:
    """The segment mask (additive, (B, 1, T, T)) AND the mask a model built for the unpacked
    sequence: "causal" or None (already in the segment mask), or a (T, T) / (..., T, T) array,
    boolean (True = may attend: a sliding window) or additive."""
    if mask is None or isinstance(mask, str):
        return segments
    if mask.dtype == mx.bool_:
        return mx.where(mask, segments, mx.array(-mx.inf, segments.dtype))
    return segments + mask.astype(segments.dtype)


class _Segments(threading.local):
    mask: mx.array | None = None  # the segment mask of the packed forward pass under way
    made: list                   # the masks packed_mask handed out in it
    calls: int = 0               # attention calls that received one of them


_ACTIVE = _Segments()


def packed_mask(mask: mx.array | str | None, dtype: mx.Dtype | None = None
                ) -> mx.array | str | None:
    """The attention mask a model built for its sequence, combined with the segment mask inside
    a packed forward pass (attention_segments); `mask` itself outside one. mlx-lm's decoders get
    their masks through this (models/decoders/mlx_lm_fused.py wraps create_attention_mask), so the
    mask reaches each layer as an argument and gradient checkpointing's recompute sees it too.
    `dtype`: the hidden states' (a bf16 model's attention takes no float32 additive mask)."""
    if _ACTIVE.mask is None:
        return mask
    segments = _ACTIVE.mask if dtype is None else _ACTIVE.mask.astype(dtype)
    combined = combine_masks(segments, mask)
    _ACTIVE.made.append(combined)
    return combined


def count_packed_mask(mask: object) -> bool:
    """Called by each attention with the mask it received: one layer more that kept a packed
    batch's rows apart, when it is a mask packed_mask made in this forward pass (True)."""
    if _ACTIVE.mask is not None and any(mask is m for m in _ACTIVE.made):
        _ACTIVE.calls += 1
        return True
    return False


@contextmanager
def attention_segments(segment_ids: mx.array, layers: int, model_type: str) -> Iterator[None]:
    """Within this context mlx-lm's attention masks are combined with `segment_ids`'
    block-diagonal mask (packed_mask), and a hybrid's convolutions and gated-delta or Mamba-2
    rules start each row afresh (models/layers/packed_rows.py); on leaving, a count of attention
    calls that received that mask and rules that reset their state other than `layers`
    (sequence_mixers) is a ConfigError (the rows of a packed batch would have seen each other)."""
    if _ACTIVE.mask is not None:
        raise RuntimeError("attention_segments does not nest")
    _ACTIVE.mask, _ACTIVE.made, _ACTIVE.calls = segment_mask(segment_ids), [], 0
    packed_rows.kept_apart(clear=True)
    try:
        with packed_rows.rows(segment_ids):
            yield
        calls, (rules, convolutions) = _ACTIVE.calls, packed_rows.kept_apart(clear=True)
    finally:
        _ACTIVE.mask, _ACTIVE.made = None, []
    if calls + rules + convolutions != layers:
        kept = ", ".join(f"{n} {kind}" for n, kind in ((calls, "attention"), (rules, "recurrent"),
                                                       (convolutions, "convolution")) if n)
        raise ConfigError(
            f"data.pack=true: {model_type}'s layers are not computed where packed rows can be "
            f"kept apart ({kept or 'none'} of {layers} sequence mixers kept the rows apart: "
            "its layers mix positions in other ways); set data.pack=false for this model")


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n != o and n.startswith(f"{o}.") for o in names)]


def sequence_mixers(layers: list[nn.Module]) -> int:
    """How many calls a packed pass through `layers` must see keep its rows apart: one a layer;
    in a hybrid (a layer with a recurrent mixer, a module holding `A_log` as every gated-delta
    and Mamba mixer does, or with a convolution), layer by layer its recurrent mixers, its
    convolutions and its attention modules (mlx-lm names their classes *Attention): none in a
    layer of an MLP alone (Nemotron-H), a rule and a convolution in a gated-delta layer, an
    attention and Mamba's rule and convolution side by side in Falcon-H1's."""
    found = [list(layer.named_modules()) for layer in layers]
    if not any("A_log" in m or isinstance(m, nn.Conv1d) for ms in found for _, m in ms):
        return len(layers)
    count = 0
    for modules in found:
        recurrent = _outermost([name for name, module in modules if "A_log" in module])
        attention = _outermost([
            name for name, module in modules if type(module).__name__.endswith("Attention")
            and not any(name == r or name.startswith(f"{r}.") for r in recurrent)])
        convolutions = [name for name, module in modules if isinstance(module, nn.Conv1d)]
        count += len(recurrent) + len(attention) + len(convolutions)
    return count


def check_packable(model: nn.Module, model_type: str) -> None:
    """One line when a model cannot keep packed rows apart by masking alone: learned absolute
    positions (each row would continue the previous row's positions)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS and isinstance(module, nn.Embedding):
            raise ConfigError(
                f"data.pack=true: {model_type} adds learned absolute positions ({name}), so a "
                "packed row would not start at position 0; set data.pack=false for this model")
