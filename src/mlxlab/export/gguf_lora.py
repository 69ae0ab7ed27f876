"""A LoRA run's adapters as a GGUF LoRA adapter: the file llama.cpp's `--lora`, Ollama's ADAPTER
and llama.cpp's `convert_lora_to_gguf.py` deal in, laid out as that converter writes it.

    write_gguf_lora(adapter_folder, base_config, "ft.lora.gguf", name="ft") -> report dict

The input is mlx-lm's adapter folder (adapters.safetensors + adapter_config.json, what
`mlxlab export --format mlx-lm --adapters` writes); the output holds

- general.type = "adapter", adapter.type = "lora", general.architecture = the base's;
- adapter.lora.alpha = scale * rank: llama.cpp adds (alpha / rank) * B(A(x)) at --lora's scale 1,
  mlxlab's LoRALinear scale * (x @ lora_a) @ lora_b (scale = model.lora.alpha / rank);
- per adapted weight `<llama.cpp tensor name>.lora_a` (numpy shape (rank, in), GGUF ne [in,
  rank]) and `.lora_b` ((out, rank), ne [rank, out]): PEFT's lora_A / lora_B, i.e. mlxlab's
  lora_a and lora_b transposed, named as the base export names the weight (gguf.py
  tensor_names) and with the same row order (Llama's q/k rotary interleave applies to lora_b's
  rows: the update B @ A lands on the weight's permuted rows);
- F32 tensors (the converter's default --outtype): the adapters as trained, not rounded.

A family whose tensors llama.cpp lays out otherwise (the hybrids' mixers, fused projections
split, multipliers folded: gguf.py `Architecture.regroup`) gets its pairs from each update pushed
through the base export's own steps and factored again (gguf_lora_regroup.py); there the config
is transformers' (the base is written from transformers' layout).

DoRA has no GGUF adapter form (llama.cpp applies W x + s B A x; DoRA rescales each output by a
learned magnitude over the merged weight's norm): refused, pointing to the fused export. So are
adapters on the routed experts, which llama.cpp stacks into one 3-D tensor a projection (no
matrix for a pair to land on).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxlab.export.architectures import layout_of
from mlxlab.export.gguf import (
    GGUFExportError,
    architecture_of,
    gguf_file,
    gguf_package,
    tensor_names,
)
from mlxlab.export.gguf_lora_regroup import FUSED, regrouped_pairs


def check_gguf_lora(config: dict, fine_tune_type: str) -> None:
    """One GGUFExportError line if adapters of `fine_tune_type` on a base of this config.json
    (the model's, as the run export writes it for transformers) have no GGUF adapter form
    (before anything is written)."""
    if fine_tune_type != "lora":
        raise GGUFExportError(f"a {fine_tune_type.upper()} run has no GGUF adapter form "
                              f"(llama.cpp applies plain LoRA only): {FUSED}")
    # refuses a model_type with no GGUF export, or a setting llama.cpp's graph does not compute
    architecture_of(layout_of(config.get("model_type")).hf_config(config))


def write_gguf_lora(adapters: str | Path, config: dict, out: str | Path,
                    name: str | None = None) -> dict:
    """Write the mlx-lm adapter folder `adapters` (for a base of config.json `config`,
    transformers' for a regrouped family) as a GGUF LoRA adapter at `out` (under a temporary
    name, then renamed); returns what was written."""
    import mlx.core as mx

    g = gguf_package()
    adapters, out = Path(adapters), Path(out)
    settings = json.loads((adapters / "adapter_config.json").read_text())
    check_gguf_lora(config, settings.get("fine_tune_type", "lora"))
    arch = architecture_of(config)
    rank = int(settings["lora_parameters"]["rank"])
    scale = float(settings["lora_parameters"]["scale"])
    weights = mx.load(str(adapters / "adapters.safetensors"))
    pairs = sorted({key.rsplit(".", 1)[0] for key in weights})
    if arch.regroup is None:
        tensors = _dense_pairs(weights, arch, config)
    else:

        tensors = regrouped_pairs({k: np.array(v.astype(mx.float32)) for k, v in weights.items()},
                                  rank, scale, config, arch)
    arch_name = g.MODEL_ARCH_NAMES[g.MODEL_ARCH[arch.gguf_arch]]
    with gguf_file(out, arch_name) as writer:
        writer.add_type(g.GGUFType.ADAPTER)
        writer.add_name(name or out.stem)
        writer.add_string(g.Keys.Adapter.TYPE, "lora")
        writer.add_float32(g.Keys.Adapter.LORA_ALPHA, scale * rank)
        writer.add_file_type(g.LlamaFileType.ALL_F32)
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
        for tensor_name, data in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=g.GGMLQuantizationType.F32)
    return {"gguf": str(out), "architecture": arch_name, "rank": rank, "alpha": scale * rank,
            "scale": scale, "pairs": len(pairs), "bytes": out.stat().st_size}


def _dense_pairs(weights: dict, arch, config: dict) -> list[tuple[str, np.ndarray]]:
    """The pairs of a family whose weights llama.cpp keeps one for one: mlxlab's lora_a and
    lora_b transposed, B's rows through the base export's per-architecture row fix."""
    import mlx.core as mx

    llama_cpp_name = tensor_names(arch, config)
    tensors: list[tuple[str, np.ndarray]] = []
    for module in sorted({key.rsplit(".", 1)[0] for key in weights}):
        weight = f"{module}.weight"
        gguf_name = llama_cpp_name(weight)
        if gguf_name is None or ".switch_mlp." in module:
            raise GGUFExportError(f"the adapter on {module} has no llama.cpp tensor for "
                                  f"{arch.gguf_arch}: {FUSED}")
        a = np.array(weights[f"{module}.lora_a"].astype(mx.float32)).T  # (rank, in)
        b = np.array(weights[f"{module}.lora_b"].astype(mx.float32)).T  # (out, rank)
        # the base export's per-architecture row fix (Llama's rotary interleave) on B's rows
        b = arch.tensor(weight, b, config)
        tensors += [(f"{gguf_name}.lora_a", np.ascontiguousarray(a)),
                    (f"{gguf_name}.lora_b", np.ascontiguousarray(b))]
    return tensors
