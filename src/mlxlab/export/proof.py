"""An export that proves itself where it is made: the written folder, loaded by transformers,
gives the fine-tune's logits on a short fixed probe, or the export is refused.

The probe is PROBE_ROWS x PROBE_TOKENS token ids drawn with PROBE_SEED from the model's whole
vocabulary (the same ids for every export of a model of that vocabulary size). mlxlab's side is
the model exactly as written (LoRA fused, a quantized base dequantized, cast to the export's
dtype) computed in float32; transformers' side is the folder loaded in float32 on the CPU, so
both compute in float32 over the same weight values, whatever dtype the folder stores.

The gap allowed is TOLERANCE (1e-3) times the logits' scale (their largest magnitude on the
probe, at least 1): float32 leaves between two right implementations (the same weights summed in
another order, another attention kernel) an error that grows with the logits, and the scale
keeps a real model as far from the limit as a tiny one. Measured: gap / scale <= 2e-6 on the
tiny checkpoints of every type the tests export (gaps 2e-7 to 1.2e-5, scales 1.4 to 7.6), 3.5e-6
on a LoRA fine-tune of SmolLM2-135M (gap 1.2e-4 at scale 34; 1.9e-4 in bfloat16), some 300
times under the limit; a wrong layout or a forward that differs shows 0.05 of the scale and
more (a swapped or transposed tensor, a norm offset, a missing logit scale; OLMo 3's forward in
mlx-lm against transformers': 0.55 of the scale on the tiny checkpoint, 0.38 absolute on the
untrained model, whose logits are under 1). A gap above the limit, a non-finite logit, or a
weight transformers found no tensor for, refuses the export in one line.

Without PyTorch (transformers loads no model without it) nothing is checked: `checker_version`
is None, and export/__init__.py decides what is written (docs/guide/huggingface.md, Export).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxlab.export.hf import ExportError

log = logging.getLogger(__name__)

PROBE_ROWS, PROBE_TOKENS, PROBE_SEED = 2, 16, 0
TOLERANCE = 1e-3


def checker_version() -> str | None:
    """'transformers <version>' when transformers can load a model here (it needs PyTorch),
    else None."""
    try:  # ~2 s: only when an export is checked
        import torch  # noqa: F401 - what transformers loads a model with
        import transformers
    except ImportError:
        return None
    return f"transformers {transformers.__version__}"


def peft_available() -> bool:
    try:
        import peft  # noqa: F401 - what puts a PEFT adapter folder on its base
    except ImportError:
        return False
    return True


def peft_base(model_config: Mapping) -> Path | None:
    """The base folder a PEFT export's check loads (model.pretrained as a Hugging Face folder),
    None when it is not one here (a hub id, a GGUF file, an Ollama name)."""
    pretrained = model_config.get("pretrained")
    folder = Path(str(pretrained)).expanduser() if pretrained else None
    if folder is None or not (folder / "config.json").is_file() or not any(
            folder.glob("*.safetensors")):
        return None
    return folder


def round_adapters(model: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """The model with its LoRA / DoRA weights rounded to `dtype`, as a PEFT folder stores them
    (the base keeps its own weights, which transformers reads from the base folder)."""
    leaves = (".lora_a", ".lora_b", ".m")
    rounded = [(name, value.astype(dtype).astype(value.dtype))
               for name, value in tree_flatten(model.parameters()) if name.endswith(leaves)]
    model.update(tree_unflatten(rounded))
    return model


def probe_ids(vocab_size: int) -> np.ndarray:
    """The probe: (PROBE_ROWS, PROBE_TOKENS) ids in [0, vocab_size), the same for every call."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.integers(0, vocab_size, size=(PROBE_ROWS, PROBE_TOKENS))


def mlxlab_logits(model: nn.Module, input_ids: Any, **inputs: mx.array) -> np.ndarray:
    """The model's float32 logits for the ids with no padding (and `inputs`, a vision model's
    pictures): (B, T, vocab), a classifier's (B, labels). The model's weights are upcast to
    float32 in place (exactly: every export dtype widens to it); the writer casts them back to
    the export's dtype."""
    model.set_dtype(mx.float32)
    model.eval()
    ids = mx.array(np.asarray(input_ids), dtype=mx.int32)
    return np.array(model(ids, **inputs).astype(mx.float32))


def transformers_logits(folder: Path, ids: np.ndarray, classifier: bool,
                        adapter: Path | None = None) -> np.ndarray:
    """What transformers computes for `ids` from the folder (float32, CPU); with `adapter`, the
    folder is the base and PEFT puts the adapter folder on it. A weight transformers found no
    tensor for (it would start from random values) is refused here, by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = transformers_model(auto, folder, adapter)
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch_logits(model, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})


def torch_logits(model: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """The float32 logits a loaded transformers model (transformers_model) computes from
    `inputs`, its forward's keywords as PyTorch tensors, without gradients."""
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


def transformers_model(auto: Any, folder: Path, adapter: Path | None = None) -> Any:
    """The folder loaded by transformers' `auto` class in float32 on the CPU, in eval mode; with
    `adapter`, PEFT puts the adapter folder on it. A weight transformers found no tensor for
    (it would start from random values) refuses the export in one line, by name."""
    import torch

    try:
        with _quiet_transformers():  # its progress bars and notes are not the export's output
            model, info = auto.from_pretrained(folder, dtype=torch.float32,
                                               output_loading_info=True)
            if adapter is not None and not info.get("missing_keys"):
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
    except Exception as err:  # noqa: BLE001 - any failure to load is the export's refusal
        why = str(err).splitlines()[0] if str(err) else ""
        if "ignore_mismatched_sizes" in why:  # its report went to the log: the tensor, here
            why = _mismatched(auto, folder) or why
        raise ExportError(f"refused: transformers could not load the export to check it "
                          f"({type(err).__name__}: {why}); --no-check writes it unchecked"
                          ) from err
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ExportError(f"refused: transformers found no tensor for {len(missing)} weight(s) "
                          f"of the export (e.g. {missing[0]}): the layout of this model type is "
                          "not the one transformers reads; its weights stay usable in mlxlab")
    return model.eval()


def _mismatched(auto: Any, folder: Path) -> str | None:
    """The first tensor whose shape transformers refused, as "NAME: written (..), expected
    (..)" (and how many more), from a second load that lets it through and reports it."""
    import torch

    with _quiet_transformers():
        _, info = auto.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                       ignore_mismatched_sizes=True)
    found = sorted(info.get("mismatched_keys") or ())
    if not found:
        return None
    name, written, expected = found[0][0], *(tuple(s) for s in found[0][1:3])
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return (f"tensor {name}: written with shape {written}, transformers expects {expected}"
            f"{more}")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


DIFFERS = ("this model type's forward or layout differs between mlx-lm and transformers: its "
           "weights stay usable in mlxlab (generate, eval, serve) and as --format mlx-lm")


@dataclass(frozen=True)
class Checker:
    """Who computes the export's logits (`name`, e.g. "transformers 5.2"), the gap allowed
    (`tolerance` times the logits' scale), in what precision (`compute`), and what a refusal
    says the gap means and what to use instead (`differs`)."""

    name: str
    tolerance: float = TOLERANCE
    compute: str = "float32, CPU"
    differs: str = DIFFERS


def compare(ours: np.ndarray, theirs: np.ndarray, ids: np.ndarray, checker: Checker) -> dict:
    """The check's record (export_report.json's "check", the model card's section); refuses a
    gap above the checker's tolerance times the logits' scale in one line that names both and
    ends with what the gap means (`checker.differs`)."""
    tolerance, compute, differs = checker.tolerance, checker.compute, checker.differs
    ids = np.asarray(ids)
    gap = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
    if not np.isfinite(gap) or not np.isfinite(ours).all():
        gap = float("inf")
    scale = max(1.0, float(np.abs(ours).max())) if np.isfinite(ours).all() else 1.0
    allowed = tolerance * scale
    record = {"status": "checked", "checker": checker.name, "max_abs_logit_gap": gap,
              "logit_scale": scale, "tolerance": tolerance, "allowed_gap": allowed,
              "probe": ids.tolist(), "compute": compute}
    if gap > allowed:
        shapes = "" if ours.shape == theirs.shape else f" (logits {ours.shape} vs {theirs.shape})"
        raise ExportError(
            f"refused: {checker.name} computes other logits from the export than mlxlab does from "
            f"the fine-tune: max gap {gap:.3g}{shapes} > {allowed:.3g} ({tolerance:g} of the "
            f"logits' scale {scale:.3g}) on a {ids.shape[0]}x{ids.shape[1]}-token probe; "
            f"{differs}")
    log.info("export check: max |logit gap| %.3g <= %.3g (%s)", gap, allowed, checker.name)
    return record


def unchecked(why: str) -> dict:
    """The record of an export written without the check, and why."""
    return {"status": "unchecked", "why": why}
