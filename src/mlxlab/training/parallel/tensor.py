"""trainer.distributed.mode=tensor: each decoder block's attention heads and MLP width split over
the ranks with MLX's sharded linears (`nn.AllToShardedLinear` for the query/key/value and the
MLP's input projections, `nn.ShardedToAllLinear` for the output projections: one all-reduce after
attention and one after the MLP per block in the forward, one per split input projection in the
backward; mlx-lm's `shard` recipe). Every rank computes the same rows, so the embeddings, norms and head are kept whole on
each rank, with identical gradients.

mlx-lm decoders are sharded by their own `Model.shard(group)` (Llama, Qwen2/3, Mistral, ... the
model files that define it); the house's Transformer by the same recipe below.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from mlxlab.errors import ConfigError
from mlxlab.models.adapters.adapter_layer import AdapterLayer
from mlxlab.models.adapters.routed_experts import is_experts
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.runtime.cluster import distributed
from mlxlab.training.parallel.layout import Layout

TO_SHARDED = (nn.AllToShardedLinear, nn.QuantizedAllToShardedLinear)
TO_ALL = (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear)


def _shard_transformer(model: Transformer, world: distributed.World) -> None:
    n, group = world.size, world.group
    for i, block in enumerate(model.layers):
        att = block.attention
        if att.num_kv_heads % n:
            raise ConfigError(f"trainer.distributed.mode=tensor over {n} ranks: layer {i} has "
                              f"{att.num_kv_heads} key/value heads, which {n} ranks cannot "
                              "split; launch a rank count dividing it")
        for name in ("query", "key", "value"):
            att[name] = shard_linear(att[name], "all-to-sharded", group=group)
        att.out = shard_linear(att.out, "sharded-to-all", group=group)
        att.num_heads //= n
        att.num_kv_heads //= n
        mlp = block.mlp
        for name in ("gate", "up"):
            if name in mlp:
                mlp[name] = shard_linear(mlp[name], "all-to-sharded", group=group)
        mlp.down = shard_linear(mlp.down, "sharded-to-all", group=group)


def _shard_mlx_lm(model: MLXLMDecoder, world: distributed.World) -> None:
    try:
        shard = type(model.lm).shard
    except AttributeError:
        raise ConfigError(f"trainer.distributed.mode=tensor: mlx-lm's {type(model.lm).__module__} "
                          "has no tensor-parallel recipe (Model.shard); use trainer.distributed."
                          "mode=fsdp") from None
    shard(model.lm, world.group)


def shard_tensors(model: nn.Module, world: distributed.World) -> Layout:
    """Split `model`'s decoder linears over `world` in place; returns where each parameter lives."""
    if any(isinstance(m, AdapterLayer) for _, m in model.named_modules()):
        raise ConfigError("trainer.distributed.mode=tensor trains full fine-tuning only: a LoRA, "
                          "DoRA or QLoRA run shards with trainer.distributed.mode=fsdp")
    if any(is_experts(m) for _, m in model.named_modules()):
        raise ConfigError("trainer.distributed.mode=tensor: a model with routed experts (a MoE) "
                          "is split in a way its checkpoints and gradient clip do not follow; "
                          "use trainer.distributed.mode=fsdp or data parallel (auto)")
    if isinstance(model, Transformer):
        _shard_transformer(model, world)
    elif isinstance(model, MLXLMDecoder):
        _shard_mlx_lm(model, world)
    else:
        raise ConfigError(f"trainer.distributed.mode=tensor splits decoders' attention and MLP; a "
                          f"{type(model).__name__} has none: use trainer.distributed.mode=fsdp")
    axis: dict[str, int | None] = {}
    for path, module in model.named_modules():
        if isinstance(module, TO_SHARDED + TO_ALL):
            for key in ("weight", "scales", "biases", "bias"):
                if key in module:
                    whole = key == "bias" and isinstance(module, TO_ALL)
                    axis[f"{path}.{key}"] = None if whole else (
                        0 if isinstance(module, TO_SHARDED) else -1)
    return Layout(world, axis)
