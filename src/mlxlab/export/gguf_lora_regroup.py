"""A LoRA run's adapters on a family whose tensors llama.cpp lays out otherwise (the hybrids'
mixers, fused projections split, Falcon-H1's multipliers folded, MoE experts stacked: gguf.py
`Architecture.regroup`), as GGUF LoRA pairs on the tensors the base export writes.

llama.cpp adds (alpha / rank) * B' (A' x) to a base tensor's output. The base export takes the
run's mlx-lm weights to that tensor through steps that are each linear in a weight (rows or
columns permuted, tiled or split, multipliers folded) or add a constant (a norm's 1 + w): the run
export's map back to transformers' layout (architectures.py `layout_of`), then the family's
regrouping, its per-tensor layout and its stored values (gguf.py `stored_tensor`). So each
adapted weight's update dW = scale * (lora_a @ lora_b).T is pushed through those same steps in
float64, and so are zeros of its shape: the difference f(dW) - f(0) is what the update moves in
each written tensor, of rank at most the adapters' rank r (a permutation, a scaling or a part of
a rank-r matrix), and its factors at rank r (an SVD of its range) are the pair, B' = U S / scale
and A' = Vt, exact to float64 rounding (zero-padded to rank r where the tensor is narrower). A
difference that does not factor at rank r (a step that is not linear), a changed tensor that is
not 2-D (stacked experts, a per-head split) or two adapted weights landing on one tensor is
refused by name.

The base itself is written from the run's weights in transformers' layout (`write_hf_base`,
the run export's map again), the names the family's regrouping reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mlxlab.export.architectures import layout_of
from mlxlab.export.gguf import (
    Architecture,
    GGUFExportError,
    _dequantize,
    _read_tensors,
    stored_tensor,
    tensor_names,
)
from mlxlab.export.hf import SIDE_FILES

FUSED = "export it fused instead (--format gguf without --adapters)"

# |f(dW) - f(0) - scale * B' A'| over |f(dW) - f(0)|: float64 rounding, or float32 where a step
# stores float32 (Falcon-H1's folded multipliers); a step that is not linear leaves far more
RESIDUAL = 1e-5
_OVERSAMPLE = 8  # extra directions of the range finder (exact for a rank <= r + this)
# architectures whose llama.cpp graph adds an adapter's update only to some tensors (by kind,
# the name's token after the layer), multiplying by the others without it: Kimi-Linear's
# feed-forward layers take adapters (its build_ffn), its delta and latent attention do not
ADAPTED_ONLY = {"KIMI_LINEAR": ("ffn_",)}


def transformers_config(config: dict, model_type: str) -> dict:
    """The transformers config.json of the run's model: the run export's (architectures.py
    `hf_config`) from an mlx-lm folder's `config`, whose model_type mlx-lm may name otherwise
    (Qwen3.5's text model) and whose quantization is dropped (the base goes out float)."""
    floats = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return layout_of(model_type).hf_config({**floats, "model_type": model_type})


def write_hf_base(folder: Path, config: dict, out: Path) -> Path:
    """The mlx-lm `folder`'s base weights in transformers' layout (the run export's own map,
    architectures.py), float32 (a QLoRA base dequantized), with the transformers `config` and
    the folder's tokenizer files, at `out`: the folder a regrouped family's base GGUF is written
    from and read back against (its regrouping reads transformers' names)."""
    import mlx.core as mx

    weights = {name: mx.array(w if packed is None else _dequantize(packed))
               for name, w, packed in _read_tensors(folder, _quantization(folder))}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        layout_of(config["model_type"]).to_hf(weights, config),
                        metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", *SIDE_FILES):
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
    return out


def _quantization(folder: Path) -> dict | None:
    return json.loads((folder / "config.json").read_text()).get("quantization")


def regrouped_pairs(weights: dict, rank: int, scale: float, config: dict,
                    arch: Architecture) -> list[tuple[str, np.ndarray]]:
    """(`<GGUF tensor>.lora_a`, (rank, in)) and (`.lora_b`, (out, rank)) F32 arrays of every
    tensor mlx-lm's adapter `weights` (`<module>.lora_a` (in, r), `.lora_b` (r, out), numpy)
    move, for a base of transformers config `config` (module docstring)."""
    landed: dict[str, str] = {}
    pairs: list[tuple[str, np.ndarray]] = []
    for module in sorted({key.rsplit(".", 1)[0] for key in weights}):
        a = np.asarray(weights[f"{module}.lora_a"], np.float64)
        b = np.asarray(weights[f"{module}.lora_b"], np.float64)
        delta = scale * (a @ b).T  # (out, in), the weight's update
        moved = _written(f"{module}.weight", delta, config, arch)
        still = _written(f"{module}.weight", np.zeros_like(delta), config, arch)
        for gguf_name, w in moved.items():
            change = w.astype(np.float64) - still[gguf_name]
            if not change.any():
                continue  # a tensor the update does not reach
            if gguf_name in landed:
                raise GGUFExportError(f"the adapters on {landed[gguf_name]} and {module} both "
                                      f"land on llama.cpp's {gguf_name}: {FUSED}")
            if change.ndim != 2:
                raise GGUFExportError(f"the adapter on {module} lands on llama.cpp's "
                                      f"{gguf_name}, a {change.ndim}-D tensor (not one matrix "
                                      f"a LoRA pair adds to): {FUSED}")
            _check_applied(arch, module, gguf_name)
            landed[gguf_name] = module
            lora_a, lora_b = _factors(change, rank, scale, f"{module} -> {gguf_name}")
            pairs += [(f"{gguf_name}.lora_a", lora_a), (f"{gguf_name}.lora_b", lora_b)]
    return pairs


def _check_applied(arch: Architecture, module: str, gguf_name: str) -> None:
    """One line where llama.cpp's graph would load the pair on `gguf_name` and not apply it."""
    kinds = ADAPTED_ONLY.get(arch.gguf_arch)
    tokens = gguf_name.split(".")
    kind = tokens[2] if tokens[0] == "blk" else tokens[0]
    if kinds is not None and not kind.startswith(kinds):
        raise GGUFExportError(f"the adapter on {module} lands on llama.cpp's {gguf_name}, which "
                              f"its {arch.gguf_arch.lower()} graph multiplies without adapters "
                              f"(it applies them to {', '.join(k + '*' for k in kinds)} "
                              f"only): leave it out of model.lora.targets, or {FUSED}")


def _written(name: str, w: np.ndarray, config: dict, arch: Architecture) -> dict:
    """{llama.cpp name: array} of the mlx-lm weight `name` = `w` alone, through the base
    export's steps (the run export's map to transformers' layout, the regrouping, the layout and
    stored values per tensor), in float64 where they keep it."""
    import mlx.core as mx

    with mx.stream(mx.cpu):  # float64 runs on the CPU
        hf = layout_of(config["model_type"]).to_hf({name: mx.array(w, dtype=mx.float64)},
                                                  config)
        hf = [(n, np.array(v)) for n, v in hf.items()]
    llama_cpp_name = tensor_names(arch, config)
    out = {}
    for hf_name, value in arch.regroup(iter(hf), config):
        full = llama_cpp_name(hf_name)
        if full is None:
            raise GGUFExportError(f"the adapter on {name.removesuffix('.weight')} lands on "
                                  f"{hf_name}, which has no llama.cpp tensor for "
                                  f"{arch.gguf_arch}: {FUSED}")
        out[full] = stored_tensor(arch, config, hf_name, full, value)
    return out


def _factors(change: np.ndarray, rank: int, scale: float,
             what: str) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') with scale * B' @ A' = `change`: an SVD within the change's range (found by
    multiplying it with random directions: exact where its rank is at most rank + _OVERSAMPLE,
    and a rank-r change's is), its first `rank` directions; refused where more is left."""
    probe = np.random.default_rng(0).standard_normal((change.shape[1], rank + _OVERSAMPLE))
    basis, _ = np.linalg.qr(change @ probe)  # (out, k): the change's columns lie in its span
    u, s, vt = np.linalg.svd(basis.T @ change, full_matrices=False)
    kept = min(rank, s.size)
    lora_b = np.zeros((change.shape[0], rank))
    lora_b[:, :kept] = (basis @ u[:, :kept]) * (s[:kept] / scale)
    lora_a = np.zeros((rank, change.shape[1]))
    lora_a[:kept] = vt[:kept]
    left = np.abs(change - scale * (lora_b @ lora_a)).max() / np.abs(change).max()
    if left > RESIDUAL:
        raise GGUFExportError(f"the adapter {what} does not factor at rank {rank} (a residual "
                              f"of {left:.1e} of the update): the base export's layout of it is "
                              f"not linear, so no LoRA pair reproduces it: {FUSED}")
    return (np.ascontiguousarray(lora_a, dtype=np.float32),
            np.ascontiguousarray(lora_b, dtype=np.float32))
