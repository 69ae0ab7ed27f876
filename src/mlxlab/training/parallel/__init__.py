"""Past one machine's memory with MLX's own engine: trainer.distributed.mode=fsdp
(fully_sharded.py: `nn.FullyShardedModule` units; gather.py: its collective) and mode=tensor
(tensor.py: MLX's sharded linears), how a step reduces each mode's gradients (gradients.py),
and where each parameter lives so checkpoints stay whole (layout.py); sharding.py puts them on a
model and its optimizer."""
