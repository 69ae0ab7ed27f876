"""What one export writes: the request (format, dtype, quantization, adapters, retention, --out),
one frozen value handed down the pipeline (export/pipeline.py), and the run it is made from once
loaded. Nothing here reads a file or writes one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

from mlxlab.export.hf import DTYPES, ExportError
from mlxlab.export.retention import Retention

FORMATS = ("hf", "mlx-lm", "peft")
METHODS = ("rtn", "gptq", "awq")


class ExportOptions(TypedDict, total=False):
    """export_run's keywords beside the run, --out, the format and the dtype (ExportRequest says
    what each is): one typed set, so the public call takes them by name and hands them on whole."""

    quantize: int | None
    quantize_method: str
    lora: str
    overwrite: bool
    check: bool
    retention: Retention | None
    refuse: Callable[[object, object], None] | None


class GGUFOptions(TypedDict, total=False):
    """export_gguf's keywords beside the source, --out and the quant (gguf_run.py)."""

    overwrite: bool
    check: bool
    retention: Retention | None
    imatrix_rows: int


class DraftGGUFOptions(GGUFOptions, total=False):
    """export_gguf_with_draft's: export_gguf's and the draft tokens llama-server proposes."""

    num_draft_tokens: int


def known_options(options: dict[str, Any], kind: type, call: str) -> dict[str, Any]:
    """`options` when every key is one of `kind`'s (a TypedDict), else the TypeError Python
    raises for an unexpected keyword."""
    unknown = sorted(set(options) - set(kind.__annotations__))
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    return options


@dataclass(frozen=True)
class Quantization:
    """mlx-lm's quantization of the written weights: `bits` (4 or 8) by `method` (rtn:
    mlx_lm.convert's rounding; gptq, awq: mlx_lm.quant's, calibrated on the run's own rows)."""

    bits: int
    method: str = "rtn"

    @classmethod
    def of(cls, bits: int | None, method: str = "rtn") -> Quantization | None:
        """The quantization `--quantize bits --quantize-method method` asks for (None: none);
        a calibrated method without bits is one line."""
        if not bits:
            if method != "rtn":
                raise ExportError(f"--quantize-method {method} calibrates mlx-lm's quantization: "
                                  "add --format mlx-lm --quantize 4 (or 8)")
            return None
        return cls(int(bits), method)


@dataclass(frozen=True)
class ExportRequest:
    """One export of a run: what is written (`fmt`, `dtype`, `quantization`, `lora`: "fuse" or
    "adapters"), where (`out`, replaced only with `overwrite`), checked in transformers unless
    not `check`, and judged on `retention`'s tasks (refused on a loss unless its accept_loss).
    `refuse(model, state)` is a caller's own refusals on the loaded run (raising ExportError);
    `gguf_next`: the folder is the float step of a GGUF export, so it is not judged itself: the
    GGUF written from it is (export/gguf_run.py), against the reference built here, with the
    run's logits on the probe."""

    run: Path
    out: Path
    fmt: str = "hf"
    dtype: str | None = None  # None: the pretrained checkpoint's own, else float32
    quantization: Quantization | None = None
    lora: str = "fuse"
    overwrite: bool = False
    check: bool = True
    retention: Retention = field(default_factory=Retention)
    refuse: Callable[[object, object], None] | None = None
    gguf_next: bool = False

    def with_dtype_of(self, model) -> ExportRequest:
        """The request with its dtype settled: the one asked for, else the pretrained
        checkpoint's own, else float32 (what mlxlab trained in)."""
        if self.dtype is not None:
            return self
        source_config = model.hf_config or {}
        source = source_config.get("torch_dtype", source_config.get("dtype"))
        return replace(self, dtype=source if source in DTYPES else "float32")

    @property
    def bits(self) -> int | None:
        return self.quantization.bits if self.quantization else None


@dataclass(frozen=True)
class LoadedRun:
    """The run as loaded for its export: the model (a vocab-remapped run's small model, its
    wrapper in `remapped`), its checkpoint state, the checkpoint chosen, the note an unfinished
    run gets, and the run's tokenizer.json."""

    model: object
    state: object
    checkpoint: Path
    note: str | None
    tokenizer_path: Path
    remapped: object = None
