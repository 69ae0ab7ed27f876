"""A language model's output head and its cross-entropy a chunk of rows at a time
(objective.head_chunk): only `chunk` tokens' logits exist at once, in the forward and in the
backward, never the whole (tokens, vocabulary) float32 logits and their gradient.

Why: at a 2026 vocabulary (Qwen3.5's 248,320 tokens) the float32 logits are 0.95 MB a token,
and the loss keeps them and their gradient: 8 GB at 4,096 tokens, more than a 0.8B model's
weights and its recomputed activations together. The head and loss over all chunks are one
mx.custom_function: its forward keeps the hidden states alone; its backward recomputes each
chunk's logits and differentiates that chunk, one chunk after the other (each waits for the one
before it: MLX would otherwise schedule every chunk's logits at once), adding up the head's
gradient. The loss is the whole head's to float32 rounding; the head's product runs once more.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.models.base import HeadSplit


def chunked_head_cross_entropy(split: HeadSplit, input_ids: mx.array,
                               segment_ids: mx.array | None, targets: mx.array, chunk: int,
                               cross_entropy: Callable[[mx.array, mx.array], mx.array]
                               ) -> mx.array:
    """Per-token cross_entropy(logits, targets) (B, T) of the model `split` divides, its
    logits computed `chunk` rows of the flattened (B * T) tokens at a time."""
    hidden = split.hidden(input_ids, segment_ids)
    batch, length, width = hidden.shape
    rows, flat_targets = hidden.reshape(batch * length, width), targets.reshape(-1)
    head = split.head
    trained = tree_flatten(head.trainable_parameters())  # none: a frozen head (LoRA)
    names = [name for name, _ in trained]
    spans = [(s, min(s + chunk, batch * length)) for s in range(0, batch * length, chunk)]

    def piece(span: tuple[int, int]) -> Callable[..., mx.array]:
        def loss(h: mx.array, *weights: mx.array) -> mx.array:
            head.update(tree_unflatten(list(zip(names, weights))))
            return cross_entropy(split.apply(head, h), flat_targets[span[0]:span[1]])

        return loss

    def after(x: mx.array, done: list[mx.array]) -> mx.array:
        return mx.depends([x], done)[0] if done else x

    @mx.custom_function
    def head_loss(rows: mx.array, *weights: mx.array) -> mx.array:
        out: list[mx.array] = []
        for span in spans:
            out.append(piece(span)(after(rows[span[0]:span[1]], out[-1:]), *weights))
        return mx.concatenate(out)

    @head_loss.vjp
    def head_loss_vjp(primals: tuple | mx.array, cotangent: mx.array, output: mx.array
                      ) -> tuple | mx.array:
        if isinstance(primals, mx.array):  # a frozen head (LoRA): the rows alone, not a tuple
            primals = (primals,)
        rows, weights = primals[0], primals[1:]
        d_rows, d_weights = [], [mx.zeros_like(w) for w in weights]
        for span in spans:  # after the chunk before, its head's gradient added up too
            done = [*d_rows[-1:], *(d_weights if d_rows else [])]
            _, grads = mx.vjp(piece(span), [after(rows[span[0]:span[1]], done), *weights],
                              [cotangent[span[0]:span[1]]])
            d_rows.append(grads[0])
            d_weights = [total + g for total, g in zip(d_weights, grads[1:])]
        return (mx.concatenate(d_rows), *d_weights) if weights else mx.concatenate(d_rows)

    return head_loss(rows, *[w for _, w in trained]).reshape(batch, length)
