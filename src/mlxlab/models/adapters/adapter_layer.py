"""What every adapter layer kind has, whatever it wraps (a Linear: lora.py; a MoE layer's
stacked experts: lora_experts.py)."""

from __future__ import annotations

import mlx.nn as nn


class AdapterLayer(nn.Module):
    """An adapter around a frozen base layer `linear` (nn.Linear, nn.QuantizedLinear: QLoRA, or
    mlx-lm's SwitchLinear / QuantizedSwitchLinear: the routed experts) and the `adapter_on`
    switch adapters_off flips. Each kind has `fuse(dequantize)`: the base with the adapter
    merged in. `kind` is the model.lora.kind that made it: the exports write LoRA and DoRA in
    different forms (and refuse some)."""

    adapter_on: bool = True
    kind: str = "lora"
