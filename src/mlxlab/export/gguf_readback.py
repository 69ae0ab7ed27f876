"""A GGUF file this export wrote, read back into a model that is judged (retention.py) and
compared with the fine-tune on the probe: every architecture gguf.py writes is read.

The file's tensors are put back by undoing exactly what the writer did to the float folder it
was written from: the writer's own regrouping and per-tensor layout (gguf.py `Architecture`)
are run once over the folder's element positions instead of its values, which gives, for every
element of every GGUF tensor, the Hugging Face tensor and position it came from (and the
constant the writer added: Gemma's norm `1 +`). The file's tensors, dequantized by gguf-py as
written (and mapped back where the writer stored a function of the value: Mamba's
A = -exp(A_log) gives A_log = log(-A)), are scattered back there; config.json and the tokenizer
come from that folder, and the file's header is checked against its tensors
(models/sources/gguf_header.py: block count, widths, heads, vocabulary). Every position must be
filled exactly once and every tensor of the file must have a place, else the read-back fails
(and the export is refused). At f32 the read-back is the folder, bit for bit, for every
architecture whose tiny test folder keeps its norms at their initial value; a hybrid's A_log and
a perturbed 1 + w norm come back to float32 round-off (tests/test_export_gguf_readback.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mlxlab.export.gguf import (
    GGUFExportError,
    _dequantize,
    _read_tensors,
    architecture_of,
    tensor_names,
)
from mlxlab.models.base import Model

# written by the writer beside the model's tensors (llama3 rope scaling): derived, no weight
DERIVED = ("rope_freqs.weight",)
# the float folder's files the read-back folder takes (the tokenizer and its settings)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json")


def read_written_gguf(path: Path, folder: Path, work: Path, lora: Path | None = None) -> Model:
    """The .gguf at `path`, written from the Hugging Face or mlx-lm `folder`, as a float model
    (loaded from `work`, a folder that is filled here: module docstring); with `lora`, a GGUF
    LoRA adapter written for it (gguf_lora.py), its update (alpha / rank) * B @ A added to the
    weights it adapts, as llama.cpp adds it to their output. Raises GGUFExportError when the
    files cannot be read back."""
    from mlxlab.export.retention import read_folder

    config = json.loads((folder / "config.json").read_text())
    arch = architecture_of(config)  # refuses what the writer does not write; else its variant
    work.mkdir(parents=True, exist_ok=True)
    weights = _placed(path, folder, config, arch, _lora_updates(lora) if lora else {})
    import mlx.core as mx

    mx.save_safetensors(str(work / "model.safetensors"),
                        {n: mx.array(w) for n, w in weights.items()}, metadata={"format": "pt"})
    floats = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    (work / "config.json").write_text(json.dumps(floats, indent=2) + "\n")
    for name in SIDE_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, work / name)
    try:
        return read_folder(work)
    except Exception as err:  # noqa: BLE001 - whatever mlx-lm raises, the read-back failed
        raise GGUFExportError(f"the GGUF read back from {path.name} does not load in mlx-lm "
                              f"({type(err).__name__}: {str(err)[:160]})") from None


def _lora_updates(lora: Path) -> dict[str, np.ndarray]:
    """{base tensor's GGUF name: (alpha / rank) * B @ A} of a GGUF LoRA adapter file, in the base
    tensor's GGUF layout (numpy (out, in))."""
    import gguf

    reader = gguf.GGUFReader(str(lora))
    field = reader.fields.get("adapter.lora.alpha")
    if field is None:
        raise GGUFExportError(f"{lora.name} has no adapter.lora.alpha: not a LoRA adapter")
    alpha = float(field.contents())
    tensors = {t.name: np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type),
                                  dtype=np.float32).reshape(tuple(reversed(t.shape)))
               for t in reader.tensors}
    updates = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            b = tensors.get(f"{base}.lora_b")
            if b is None:
                raise GGUFExportError(f"{lora.name} has {name} without its lora_b")
            updates[base] = (alpha / a.shape[0]) * (b @ a)
    return updates


def _placed(path: Path, folder: Path, config: dict, arch,
            updates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The folder's tensors (float32, by the folder's names) with the file's values in place,
    plus `updates` (by GGUF name) on the tensors they adapt."""
    import gguf

    from mlxlab.models.sources.gguf_header import check_header, tensor_shapes

    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    try:
        check_header(metadata, tensor_shapes(reader.tensors), path)
    except ValueError as err:  # the header contradicts the tensors written under it
        raise GGUFExportError(str(err)) from None
    shapes, places = _places(folder, config, arch)
    total = sum(int(np.prod(s)) for s in shapes.values())
    flat = np.zeros(total, dtype=np.float32)
    filled = np.zeros(total, dtype=bool)
    for tensor in reader.tensors:
        if tensor.name in DERIVED:
            continue
        if tensor.name not in places:
            raise GGUFExportError(f"the written GGUF holds {tensor.name}, which the writer does "
                                  f"not write for {config['model_type']}: not read back")
        positions, offset = places.pop(tensor.name)
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        if values.size != positions.size:
            raise GGUFExportError(f"{tensor.name} holds {values.size} values in the written "
                                  f"GGUF, {positions.size} in the folder: not read back")
        if tensor.name in updates:  # a LoRA pair's update, on the tensor as llama.cpp holds it
            values = values + updates.pop(tensor.name).reshape(values.shape)
        if arch.values is not None:  # the checkpoint's values back (Mamba's A_log from A, a
            # Falcon-H1 multiplier taken out of the weight and of its update alike)
            values = arch.values.restored(tensor.name, values, config)
        values = values.astype(np.float32).reshape(positions.shape) - offset
        flat[positions.ravel()] = values.ravel()
        filled[positions.ravel()] = True
    if places or updates:
        missing = sorted(places) or sorted(updates)
        raise GGUFExportError(f"the written GGUF lacks {missing[0]}: not read back")
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if not filled[start:start + size].all():
            raise GGUFExportError(f"{name} is not whole in the written GGUF: not read back")
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


def _places(folder: Path, config: dict, arch) -> tuple[dict, dict]:
    """({Hugging Face name: shape}, {GGUF tensor name: (the flat position of each of its
    elements in the folder's tensors, the constant the writer added)}): the writer's
    regrouping and per-tensor layout run over element positions."""
    llama_cpp_name = tensor_names(arch, config)
    tied = config.get("tie_word_embeddings", False)
    shapes: dict[str, tuple] = {}
    indexed = []
    start = 0
    for name, w, packed in _read_tensors(folder, config.get("quantization")):
        if packed is not None:  # mlx-lm's packed weight (a QLoRA base): its float shape
            w = _dequantize(packed)
        if tied and name == "lm_head.weight":
            continue  # not written: the GGUF reads the embedding as the output
        shapes[name] = tuple(w.shape)
        indexed.append((name, np.arange(start, start + w.size, dtype=np.int64).reshape(w.shape)))
        start += w.size
    if arch.regroup is not None:
        indexed = arch.regroup(iter(indexed), config)
    places = {}
    for name, positions in indexed:
        full = llama_cpp_name(name)
        if full is None:
            raise GGUFExportError(f"tensor {name} has no llama.cpp name: not read back")
        offset = np.asarray(arch.tensor(name, np.zeros(positions.shape, np.float32), config),
                            dtype=np.float32)
        moved = np.asarray(arch.tensor(name, positions, config)) - offset.astype(np.int64)
        places[full] = (moved, offset)
    return shapes, places
