"""An importance matrix recorded on mlx-lm's modules (imatrix.py) on the tensors of the GGUF file,
as llama-imatrix records it on the file's own tensors and llama-quantize reads it.

llama-imatrix names each vector by the tensor the input multiplies (`blk.0.attn_qkv.weight`),
so every written part of a projection the writer splits or regroups reads the input of the
projection it came from: Qwen3-Next's `in_proj_qkvz` gives `attn_qkv` and `attn_gate` one
vector, Granite's fused `shared_mlp.input_linear` gives its gate and up halves one, and a MoE
layer's routed experts (one vector per expert, imatrix.py) give the `ffn_*_exps` stack, expert
e's rows quantized with expert e's vector. mlx-lm's names are the checkpoint's but for Qwen3.5
(its text model under `language_model.`) and the experts (mlx-lm's `switch_mlp` stacks, whose
projection named fc1 / fc2 in Nemotron-H are up / down); where the file reorders a matrix's input
columns (Qwen3.5's value heads tiled: `ssm_out`), its vector is reordered alike
(`Architecture.columns`).

A latent attention's `attn_k_b` (mlx-lm's embed_q) gets its per-head vectors of the query
(imatrix.py). What llama.cpp itself never weights stays unweighted: the token embedding (a row
lookup, never a product). So does the latent attention's `attn_v_b` (DeepSeek-V3's,
Kimi-Linear's): llama.cpp multiplies it by the attention's output in the latent space (its
absorbed attention), which mlx-lm's forward over a prompt never computes (it runs the
unabsorbed form, multiplying the latent by v_b before attending).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from mlxlab.export.gguf_mamba import granite_shared_mlp

# an expert stack of mlx-lm (`...layers.<n>.<block>.switch_mlp.<proj>.weight`) -> llama.cpp's
# stacked tensor of that projection
_EXPERTS = re.compile(r"(?:.+\.)?layers\.(?P<layer>\d+)\..+\.switch_mlp\.(?P<proj>\w+)\.weight")
_EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                   "down_proj": "ffn_down_exps", "fc1": "ffn_up_exps", "fc2": "ffn_down_exps"}

# the tensors llama.cpp never weights by an importance matrix, by kind: why
NEVER_WEIGHTED = {"token_embd": "a row lookup, which llama.cpp never weights"}
# the tensors whose input in llama.cpp's graph mlx-lm's forward never computes: why
NOT_RECORDED = {
    "attn_v_b": "its input is llama.cpp's absorbed latent attention's output in the latent "
                "space, which mlx-lm's forward over a prompt (the unabsorbed form) never "
                "computes",
}


def _written_names(name: str, config: dict) -> tuple[str, ...]:
    """The checkpoint names (as the writer's regrouping yields them) that the mlx-lm weight
    `name` is written as: itself, or the parts of a fused projection the writer splits."""
    name = name.removeprefix("language_model.")  # Qwen3.5's text model, as its export names it
    if name.endswith(".self_attn.embed_q.weight"):  # a latent attention's k_b, by head
        return (name.replace(".embed_q.", ".k_b_proj."),)
    if name.endswith(".linear_attn.in_proj_qkvz.weight"):  # Qwen3-Next: q, k, v apart from z
        prefix = name.removesuffix("in_proj_qkvz.weight")
        return f"{prefix}in_proj_qkv.weight", f"{prefix}in_proj_z.weight"
    mlp = granite_shared_mlp(config)
    if name.endswith(".shared_mlp.input_linear.weight"):  # Granite: gate rows over up rows
        prefix = name.removesuffix("shared_mlp.input_linear.weight")
        return f"{prefix}{mlp}.gate_proj.weight", f"{prefix}{mlp}.up_proj.weight"
    if name.endswith(".shared_mlp.output_linear.weight"):
        return (name.replace("shared_mlp.output_linear", f"{mlp}.down_proj"),)
    return (name,)


def file_importance(importance: dict[str, np.ndarray], config: dict,
                    llama_cpp_name: Callable[[str], str | None],
                    columns: Callable[[str, np.ndarray, dict], np.ndarray] | None = None
                    ) -> dict[str, np.ndarray]:
    """{llama.cpp tensor name: its vector (in,), or one per expert (experts, in)} of an
    importance matrix by mlx-lm weight name (imatrix.py), for a file of transformers `config`
    whose names `llama_cpp_name` gives and whose input columns `columns` reorders (module
    docstring). A vector with no tensor in the file is left out."""
    out: dict[str, np.ndarray] = {}
    for name, vector in importance.items():
        expert = _EXPERTS.fullmatch(name)
        if expert is not None and expert["proj"] in _EXPERT_TENSORS:
            targets = [f"blk.{expert['layer']}.{_EXPERT_TENSORS[expert['proj']]}.weight"]
        else:
            targets = [llama_cpp_name(n) for n in _written_names(name, config)]
        for target in targets:
            if target is not None:
                out[target] = vector if columns is None else columns(target, vector, config)
    return out


def unweighted_reason(full_name: str) -> str:
    """Why the K-quantized tensor `full_name` has no vector."""
    tokens = full_name.split(".")
    kind = tokens[2] if tokens[0] == "blk" else tokens[0]
    if kind in NEVER_WEIGHTED:
        return NEVER_WEIGHTED[kind]
    return NOT_RECORDED.get(kind, "no input recorded for it")
