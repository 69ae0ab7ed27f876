"""What the adapters on a MoE model's routed experts do, at each evaluation: per MoE layer, how
many positions of the validation data its router sent to each expert and each expert's adapter
update norm, so an expert that receives no token (and so never trains) is seen, not guessed.

A run whose adapters reach no expert (or a model without experts) does nothing here. The counts
come from eager forwards over the first `batches` validation batches (padding positions are
routed too and count); the full per-expert table is the artifact
`experts/step_NNNNNNNN.json`, the summary per layer the metrics `experts/<layer>/idle` (experts
that received no position), `experts/<layer>/tokens_min` and `experts/<layer>/norm_max`.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

import mlx.core as mx
import numpy as np

from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.models.adapters.routed_experts import (
    counting_routes,
    expert_blocks,
    expert_update_norms,
)
from mlxlab.objectives.losses import forward
from mlxlab.training.callbacks import Callback
from mlxlab.training.state import TrainContext

log = logging.getLogger("mlxlab.training")


class ExpertReach(Callback):
    """Routed-token counts and adapter norms of every expert at each evaluation (module
    docstring); `batches`: how many validation batches are counted (0: off)."""

    def __init__(self, batches: int = 8):
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ConfigError(f"callbacks.experts.batches={batches!r}: a number of validation "
                              "batches >= 0 (0 turns the expert counts off)")
        self.batches = batches
        self.model: Any = None

    def setup(self, context: TrainContext, model: Any, data: Any) -> None:
        self.model = model if self.batches and expert_blocks(model) else None
        self.data, self.context = data, context

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.model is None or not self.context.world.is_main:
            return
        tokens = self.routed_tokens()
        norms = expert_update_norms(self.model)
        table, summary = {}, {}
        for block, counts in tokens.items():
            layer = block.removeprefix("lm.").removeprefix("model.")
            idle = np.flatnonzero(counts == 0)
            table[layer] = {"tokens": counts.tolist(), "norms": norms[block].tolist()}
            summary[f"experts/{layer}/idle"] = float(len(idle))
            summary[f"experts/{layer}/tokens_min"] = float(counts.min())
            summary[f"experts/{layer}/norm_max"] = float(norms[block].max())
        self.context.tracker.log_metrics(summary, step)
        self.context.tracker.log_dict(table, f"experts/step_{step:08d}.json")
        log.info("experts at step %d: %s", step, said(tokens, norms))

    def routed_tokens(self) -> dict[str, np.ndarray]:
        """Per MoE block, the positions its router sent to each expert over the first
        `batches` validation batches."""
        model = self.model
        model.eval()
        try:
            with counting_routes(model) as counts:
                batches = self.data.val_batches(Batching(batch_size=self.context.batch_size))
                for batch in islice(batches, self.batches):
                    mx.eval(forward(model, batch))
        finally:
            model.train()
        return {block: c.tokens for block, c in counts.items()}


def said(tokens: dict[str, np.ndarray], norms: dict[str, np.ndarray]) -> str:
    """One line: the layers, the experts routed, the fewest positions an expert got, which
    received none, and the adapter norms (of the idle experts' too: zero if they never
    trained)."""
    experts = sum(len(c) for c in tokens.values())
    routed = sum(int((c > 0).sum()) for c in tokens.values())
    idle = {b.removeprefix("lm.").removeprefix("model."): np.flatnonzero(c == 0).tolist()
            for b, c in tokens.items() if (c == 0).any()}
    every = np.concatenate([n for n in norms.values()])
    idle_norm = max((float(norms[b].max(initial=0.0, where=tokens[b] == 0))
                     for b in tokens if (tokens[b] == 0).any()), default=0.0)
    line = (f"{len(tokens)} MoE layers, {routed}/{experts} experts received tokens (the fewest "
            f"{min(int(c.min()) for c in tokens.values())} positions); adapter norms "
            f"{every.min():.3g}..{every.max():.3g}")
    if idle:
        line += (f"; no tokens: {'; '.join(f'{b}: experts {e}' for b, e in idle.items())} "
                 f"(their adapters' norm at most {idle_norm:.3g})")
    return line
