"""Adapters trained on a frozen base: LoRA / DoRA on a Linear, float or quantized (lora.py, the
one entry point every model kind calls: `maybe_apply_lora`, `fuse_lora`, `adapters_off`; the
layers in lora_linear.py and lora_qat.py), and on a MoE layer's routed experts
(routed_experts.py, lora_experts.py), all sharing AdapterLayer (adapter_layer.py). mlx-lm's
names, shapes and math, so its adapter files are mlxlab's."""
