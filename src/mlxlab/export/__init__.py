"""Export a finished run for other tools: a Hugging Face folder (transformers), mlx-lm's layout,
a PEFT adapter folder, or GGUF (llama.cpp, Ollama, LM Studio).

    export_run(run, out, fmt="hf" | "mlx-lm" | "peft", dtype=None | "float16" | ...,
               quantize=None | 4 | 8, lora="fuse" | "adapters")

    export_gguf(run_or_folder, "model.gguf", quant="f16" | "bf16" | "q8_0" | "q4_0" | "q4_1"
                | "q4_k_m" | "q5_k_m" | "q6_k")

This package's face: the names callers use. The pipeline is pipeline.py (request.py: what to
write; validate.py: checked before anything is written; writers.py, vision.py, gguf.py,
gguf_adapters.py, peft_adapter.py: the writers; judgement.py, proof.py, retention.py,
gguf_readback.py: read-back and judgement; the commit last), gguf_run.py for a GGUF file.
"""

from __future__ import annotations

from mlxlab.export.gguf_run import export_gguf, is_model_folder
from mlxlab.export.hf import ExportError
from mlxlab.export.pipeline import export_run

__all__ = ["ExportError", "export_gguf", "export_run", "is_model_folder"]
