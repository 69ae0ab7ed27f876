"""A lora node's QAT settings (qat_bits, qat_group_size), checked for every model before a run
starts (Model.check_node), whether or not its own check_config reads the lora node: it sits at
the bottom of models/ so that the Model contract (base.py) can ask it."""

from __future__ import annotations

from collections.abc import Mapping

from mlxlab.errors import ConfigError

QAT_BITS = (0, 4, 8)
QAT_GROUP_SIZES = (32, 64, 128)


def check_qat(lora: Mapping) -> None:
    """qat_bits / qat_group_size: values lora_qat.py takes, on plain LoRA without dropout (the
    quantized forward has no separate adapter path for dropout to act on). Every model's lora
    node is asked this before a run starts (Model.check_node)."""
    kind = lora.get("kind", "lora")
    bits, group = lora.get("qat_bits", 0) or 0, lora.get("qat_group_size", 64)
    if bits not in QAT_BITS:
        raise ConfigError(f"model.lora.qat_bits={bits}: use 4 or 8 (the export's bits), or 0 "
                          "for plain LoRA")
    if group not in QAT_GROUP_SIZES:
        raise ConfigError(f"model.lora.qat_group_size={group}: use 64 (mlxlab export "
                          "--quantize), 32 (GGUF Q4_1 / Q4_0 blocks) or 128")
    if bits and kind != "lora":
        raise ConfigError(f"model.lora.qat_bits={bits} trains plain LoRA through the quantized "
                          f"grid; model.lora.kind={kind} has no such form: use kind=lora")
    if bits and float(lora.get("dropout", 0.0) or 0.0) > 0:
        raise ConfigError(f"model.lora.qat_bits={bits} computes with the fused weight, where "
                          "adapter dropout has nothing to act on: set model.lora.dropout=0")
