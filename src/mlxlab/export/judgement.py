"""Read-back and judgement: what is written is read back from the files and judged before it is
moved into --out (the commit, export/pipeline.py). A transformers folder is proven in
transformers (proof.py); an export that changes a decoder's weights is scored against the run
and its base (retention.py): the folder through mlx-lm's loader, a GGUF through
gguf_readback.py. A refusal is an ExportError (GGUFExportError for a GGUF): nothing is moved."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.export.proof import (
    Checker,
    checker_version,
    compare,
    mlxlab_logits,
    probe_ids,
    transformers_logits,
)
from mlxlab.export.quality import validation_batches
from mlxlab.export.request import ExportRequest
from mlxlab.export.retention import Reference, build_reference, judge_export, read_folder
from mlxlab.models.adapters.adapter_layer import AdapterLayer
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.decoders.transformer import Transformer
from mlxlab.models.encoders.bert import BertClassifier


def reference_for(request: ExportRequest, model, state, tokenizer_path: Path
                  ) -> Reference | None:
    """The run and its base scored before the export touches the model, where the written
    weights will differ from the run's (or a GGUF is written from this folder next); None
    where nothing is judged. --tasks on an export that changes nothing is one line."""
    judged = isinstance(model, (MLXLMDecoder, Transformer)) and (request.gguf_next or (
        changes_weights(model, request.dtype, request.bits, request.fmt, request.lora)))
    if request.retention.tasks and not judged:
        raise ExportError("--tasks judges an export that changes the weights (--quantize, a "
                          "narrower --dtype, a GGUF quant other than f32); this one writes the "
                          "run's weights as they are: drop --tasks")
    if not judged:
        return None
    return build_reference(model, state, tokenizer_path, validation_batches(state, tokenizer_path),
                           request.retention, probe=request.gguf_next)


def judge_folder(request: ExportRequest, model, reference: Reference | None, tmp: Path,
                 report: dict) -> None:
    """The written folder `tmp` judged into `report`: a transformers folder proven in
    transformers (unless report["check"] says why not), and its retention where `reference`
    is given (read back through mlx-lm's loader, its adapters through load_adapters). A GGUF's
    float step is judged as the GGUF (gguf_run.py), not here."""
    if request.fmt == "hf" and "check" not in report:
        report["check"] = prove(model, tmp)
    if reference is not None and not request.gguf_next:
        adapters = tmp / "adapters"
        exported = read_folder(tmp, adapters if adapters.is_dir() else None)
        report["retention"] = judge_export(reference, request.retention.accept_loss, exported,
                                           str(request.out), instead(request.fmt, request.lora))


def changes_weights(model, dtype: str, bits: int | None, fmt: str, lora: str) -> bool:
    """Whether the written weights differ from the run's: a quantization, a float type that
    does not hold every value of the one the model holds (narrower, or as wide with another
    range and precision: bfloat16 <-> float16; only float32 holds both), or adapters fused into
    a quantized base that stays quantized (mlx-lm's layout: the fused weight is quantized
    again)."""
    from mlx.utils import tree_flatten

    target = DTYPES[dtype]
    floats = {v.dtype for _, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating)}
    requantized = fmt == "mlx-lm" and lora == "fuse" and any(
        isinstance(m, AdapterLayer) and isinstance(m.linear, nn.QuantizedLinear)
        for m in model.modules())
    return bool(bits) or requantized or any(
        t != target and target != mx.float32 for t in floats)


FLOAT16_MAX = 65504.0  # float16's largest finite value: anything above it becomes inf


def refuse_overflow(model, dtype: str) -> None:
    """--dtype float16 of weights float16 cannot hold (a bfloat16 or float32 run can hold
    values past 65,504) is refused, naming the largest; the cast would write inf."""
    from mlx.utils import tree_flatten

    if DTYPES[dtype] != mx.float16:
        return
    for name, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != mx.float16 and v.size:
            peak = float(mx.abs(v.astype(mx.float32)).max())
            if peak > FLOAT16_MAX:
                raise ExportError(f"--dtype float16: {name} holds {peak:.6g}, past float16's "
                                  f"largest value {FLOAT16_MAX:,.0f} (it would be written as "
                                  "inf): export --dtype bfloat16 or float32")



def prove(model, folder: Path) -> dict:
    """The written folder in transformers against mlxlab's forward of the same weights."""
    ids = probe_ids(int(model.architecture["vocab_size"]))
    theirs = transformers_logits(folder, ids, classifier=isinstance(model, BertClassifier))
    return compare(mlxlab_logits(model, ids), theirs, ids,
                   Checker(checker_version() or "transformers"))


def instead(fmt: str, lora: str) -> str:
    """What keeps the gain, for the refusal of an export that lost it."""
    if fmt == "gguf":
        return ("export --format gguf --adapters (the base as it is and the LoRA as a GGUF "
                "adapter) or --quant q8_0")
    if lora == "fuse":
        return ("export with --adapters (the quantized base plus the adapters as trained), "
                "or --quantize 8, or no --quantize")
    return "export with --quantize 8, or without --quantize"


def judge_gguf(reference: Reference, accept_loss: bool, written: tuple[Path, Path, Path], quant: str,
               work: Path, report: dict) -> None:
    """The written GGUF (`written`: the file, the float folder it was written from, and where
    it goes) read back: its logits on the probe against the fine-tune's (the check at f32; the quantization's
    own gap otherwise), and its retention unless it is f32. A file that does not read back is
    refused (GGUFExportError): it would go out unjudged."""
    from mlxlab.export.gguf import GGUFExportError
    from mlxlab.export.gguf_readback import read_written_gguf

    try:
        exported = read_written_gguf(written[0], written[1], work)
    except ValueError as err:  # GGUFExportError and the reader's ConfigError
        raise GGUFExportError(f"refused: the written GGUF was not read back, so it cannot be "
                              f"judged ({err}); export --format hf or mlx-lm") from None
    logits = mlxlab_logits(exported, reference.ids)
    if quant == "f32":  # the same weights: the layout's check, on the file
        report["file_check"] = compare(
            reference.probe, logits, reference.ids, Checker(
                "mlxlab's GGUF reader", differs="the GGUF's tensors or metadata for this model "
                "type are not what mlxlab wrote them from: export --format hf or mlx-lm"))
        return
    scale = max(1.0, float(np.abs(reference.probe).max()))
    gap = float(np.abs(logits - reference.probe).max())
    report["file_check"] = {"status": "measured", "max_abs_logit_gap": gap,
                            "logit_scale": scale, "read_back": "the .gguf as written, "
                            "dequantized by mlxlab's GGUF reader"}
    try:
        report["retention"] = judge_export(reference, accept_loss, exported, str(written[2]),
                                           instead("gguf", "fuse"))
    except ExportError as err:
        raise GGUFExportError(str(err)) from None
