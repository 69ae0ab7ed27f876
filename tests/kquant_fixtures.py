"""llama.cpp's own choice of tensor types for K-quant files (kquant_reference.json), so the
default run checks mlxlab's mixture against llama-quantize without a llama.cpp that has it: the
xllamacpp wheel links no `llama_model_quantize`. The reference was made by writing each tiny
model of CASES as an F32 GGUF (mlxlab's writer) and quantizing it with `llama_model_quantize`;
the file's tensor types are what it holds. Its "written_by" says which llama.cpp wrote which
cases: b11739 (the libllama of the llama-cpp-py-sync 0.11739 wheel, which needs glibc 2.38) the
dense decoders; the hybrids, the MoE decoders and LFM2 a libllama built from the llama.cpp
sources xllamacpp 2026.10.11549's sdist vendors (b11549; cmake -DGGML_NATIVE=OFF
-DBUILD_SHARED_LIBS=ON, target llama; it builds on glibc 2.36), which writes b11739's types for
every dense case too.
`LLAMA_QUANTIZE_LIB=<folder with libllama.so> LLAMA_CPP_BUILD=bNNNN python
tests/kquant_fixtures.py [case ...]` rewrites the named cases (all without names); the slow test
recomputes some where that library loads."""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

REFERENCE = Path(__file__).with_name("kquant_reference.json")
LLAMA_CPP = "b11739"
QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.h's LLAMA_FTYPE_MOSTLY_*
_WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def _layers(n: int, **more) -> dict:
    return {**_WIDE, "num_hidden_layers": n, **more}


def _eighty_layers(kv_heads: int) -> dict:
    """80 narrow layers (rows of 64: every matrix falls back, which shows each one's type)."""
    return {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 80,
            "num_attention_heads": 4, "num_key_value_heads": kv_heads}


# name: (save_tiny_model kind, overrides). 12 layers: use_more_bits' picks (0, 1, 4, 7, 10, 11)
# and two-digit layers, whose names sort before blk.2 in the writer's order but not in
# llama.cpp's; rows of 320 or 96 values: the fallbacks of rows that are not whole 256-blocks;
# rows of 48: F16 even for the output;
# 80 layers: what llama.cpp calls a 70B (Llama with grouped heads, Qwen2), whose attn_v gets
# more bits, against a Llama of 80 layers without grouped heads (a 65B), which does not.
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", _layers(12)),
    "llama3_tied": ("llama3", _layers(12)),
    "mistral": ("mistral", _layers(12, num_key_value_heads=1)),
    "qwen2": ("qwen2", _layers(12)),
    "qwen3": ("qwen3", _layers(12)),
    "gemma3_text": ("gemma3_text", _layers(12, layer_types=["sliding_attention"] * 5
                                           + ["full_attention"] + ["sliding_attention"] * 5
                                           + ["full_attention"])),
    "phi3": ("phi3", _layers(12)),
    "gemma2": ("gemma2", _layers(12)),
    "granite": ("granite", _layers(12)),
    "olmo2": ("olmo2", _layers(12)),
    "starcoder2": ("starcoder2", _layers(12)),
    "llama_rows_320": ("llama", _layers(9, intermediate_size=320)),
    "phi3_rows_96": ("phi3", _layers(4, hidden_size=96, intermediate_size=192)),
    "llama_rows_48": ("llama", _layers(2, hidden_size=48, intermediate_size=96)),
    "llama_80_layers": ("llama", _eighty_layers(2)),
    "llama_80_layers_no_gqa": ("llama", _eighty_layers(4)),
    "qwen2_80_layers": ("qwen2", _eighty_layers(2)),
    "phi3_80_layers": ("phi3", _eighty_layers(2)),
}

_NEMOTRON_12 = ["mamba", "mlp", "mamba", "attention", "mamba", "mlp", "attention", "mlp", "mamba",
                "mlp", "attention", "mamba"]
_WIDE_HYBRID = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
_WIDE_GATED = {**_WIDE_HYBRID, "linear_key_head_dim": 64, "linear_value_head_dim": 64}

# the hybrids (tests/hybrid_families.py, saved by transformers): each family's tiny folder,
# 64 wide, where every matrix falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0: each rule
# still shows) and the mixer's own tensors (A, D, conv kernels, group norms) stay as they are;
# 12 Nemotron-H layers whose attn_v and ffn_down places differ from their layer numbers
# (attention in blocks 3, 6, 10; MLPs in 1, 5, 7, 9); a Granite hybrid of 8 experts (llama.cpp
# raises attn_v and attn_k to Q8_0 then); and rows of 256 (K-quant tensors themselves, the
# experts' 3-D stacks too)
HYBRID_CASES: dict[str, tuple[str, dict]] = {
    **{kind: (kind, {}) for kind in (
        "mamba2", "granitemoehybrid", "granitemoehybrid_dense", "nemotron_h_dense",
        "nemotron_h_moe", "falcon_h1", "qwen3_5", "qwen3_next", "kimi_linear",
        "kimi_linear_mla")},
    "nemotron_h_12_layers": ("nemotron_h_dense", {"num_hidden_layers": 12,
                                                  "layers_block_type": _NEMOTRON_12}),
    "granitemoehybrid_8_experts": ("granitemoehybrid", {
        "num_hidden_layers": 4, "layer_types": ["mamba", "attention"] * 2,
        "num_local_experts": 8}),
    "mamba2_wide": ("mamba2", {"hidden_size": 256, "num_hidden_layers": 4, "head_dim": 64}),
    "qwen3_5_wide": ("qwen3_5", {**_WIDE_GATED, "num_hidden_layers": 4, "layer_types": [
        "linear_attention"] * 3 + ["full_attention"]}),
    "qwen3_next_wide": ("qwen3_next", {**_WIDE_GATED, "moe_intermediate_size": 256,
                                       "shared_expert_intermediate_size": 256}),
}
CASES.update(HYBRID_CASES)

_LFM2_12 = ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
            "full_attention", "conv", "full_attention", "conv"]
# the MoE decoders and LFM2 (regrouped: stacked experts, DeepSeek-V3's split latent attention,
# LFM2's short convolutions): each family's tiny folder (64 wide: every matrix falls back); 8
# experts, where llama.cpp raises attn_v and attn_k to Q8_0 and, at Q4_K_M, attn_output to
# Q5_K (Mixtral's and DeepSeek-V3's own count); and 12 layers of 256-wide rows, the experts'
# too (K-quant stacks, ffn_down_exps / _shexp by layer number, blk.10 and blk.11 before blk.2 in
# the writer's order), LFM2's attention in 4 of them (attn_v ranked among those: blocks 8 and
# 10 get more bits, not by their layer number)
REGROUPED_CASES: dict[str, tuple[str, dict]] = {
    **{kind: (kind, {}) for kind in ("qwen3_moe", "mixtral", "granitemoe", "lfm2")},
    "mixtral_8_experts": ("mixtral", {"num_hidden_layers": 4, "num_local_experts": 8}),
    "deepseek_v3_8_experts": ("deepseek_v3", {"num_hidden_layers": 4, "n_routed_experts": 8,
                                              "n_group": 2, "topk_group": 1}),
    "qwen3_moe_wide": ("qwen3_moe", _layers(12, head_dim=64, moe_intermediate_size=256)),
    "mixtral_wide": ("mixtral", _layers(12, head_dim=64, intermediate_size=256)),
    "granitemoe_wide": ("granitemoe", _layers(12, intermediate_size=256)),
    "deepseek_v3_wide": ("deepseek_v3", _layers(
        12, num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, moe_intermediate_size=256)),
    "lfm2_wide": ("lfm2", _layers(12, block_ff_dim=512, layer_types=_LFM2_12)),
}
CASES.update(REGROUPED_CASES)
# the MoE decoders' 256-wide rows in 4 layers, which llama.cpp runs (test_export_gguf_mamba.py):
# through 12 random layers, llama.cpp's K-quant arithmetic alone moves their log-probabilities by
# whole units where a routing is near a tie
RUN_CASES = {f"{kind}_4_layers": (kind, {**REGROUPED_CASES[f"{kind}_wide"][1],
                                         "num_hidden_layers": 4})
             for kind in ("qwen3_moe", "mixtral", "granitemoe", "deepseek_v3")}
CASES.update(RUN_CASES)


class _QuantizeParams(ctypes.Structure):
    """llama.h's llama_model_quantize_params as b11739 lays it out."""

    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int),
                ("output_tensor_type", ctypes.c_int), ("token_embedding_type", ctypes.c_int),
                ("allow_requantize", ctypes.c_bool), ("quantize_output_tensor", ctypes.c_bool),
                ("only_copy", ctypes.c_bool), ("pure", ctypes.c_bool),
                ("keep_split", ctypes.c_bool), ("dry_run", ctypes.c_bool),
                ("imatrix", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p),
                ("tt_overrides", ctypes.c_void_p), ("prune_layers", ctypes.c_void_p),
                ("max_buf_size", ctypes.c_size_t)]


def llama_quantize_library() -> ctypes.CDLL | None:
    """libllama with llama_model_quantize: $LLAMA_QUANTIZE_LIB's, else the llama-cpp-py-sync
    wheel's; None where none loads (that wheel needs glibc 2.38)."""
    import importlib.util

    folder = os.environ.get("LLAMA_QUANTIZE_LIB")
    if folder is None:
        spec = importlib.util.find_spec("llama_cpp_py_sync")
        if spec is None or spec.origin is None:
            return None
        folder = str(Path(spec.origin).parent)
    try:
        lib = ctypes.CDLL(str(Path(folder) / "libllama.so"))
    except OSError:
        return None
    lib.llama_model_quantize_default_params.restype = _QuantizeParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.POINTER(_QuantizeParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_backend_init()
    return lib


def llama_quantize(lib: ctypes.CDLL, source: Path, out: Path, quant: str) -> dict[str, str]:
    """{tensor: type name} of the file llama_model_quantize writes from `source` at `quant`."""
    import gguf

    params = lib.llama_model_quantize_default_params()
    # the defaults as b11739 sets them: a struct laid out otherwise would not read so
    assert (params.allow_requantize, params.quantize_output_tensor, params.pure,
            params.imatrix) == (False, True, False, None), "not b11739's params layout"
    params.ftype, params.nthread = QUANTS[quant], 1
    if lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize refused {source} at {quant}")
    return file_types(out, gguf)


def file_types(path: Path, gguf=None) -> dict[str, str]:
    if gguf is None:
        import gguf
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def tiny_folder(name: str, root: Path) -> Path:
    """CASES[name]'s tiny folder under `root`."""
    from hf_helpers import save_tiny_model
    from hybrid_families import save_tiny_hybrid

    kind, overrides = CASES[name]
    save = save_tiny_hybrid if name in HYBRID_CASES else save_tiny_model
    return save(kind, root / name, **overrides)


def tiny_f32_gguf(name: str, root: Path) -> Path:
    """CASES[name] as an F32 GGUF written by mlxlab, its folder beside it."""
    from mlxlab.export.gguf import write_gguf

    folder = tiny_folder(name, root)
    write_gguf(folder, root / f"{name}.f32.gguf", "f32", name=name)
    return folder


def quants_of(name: str) -> tuple[str, ...]:
    """The 80-layer cases are about Q4_K_M's attn_v rule only."""
    return ("q4_k_m",) if "80_layers" in name else tuple(QUANTS)


def quantized(types: dict[str, str]) -> dict[str, str]:
    """The tensors a mixture picks a type for: all but those kept in F32 (norms, biases)."""
    return {name: kind for name, kind in types.items() if kind != "F32"}


def live_reference(lib: ctypes.CDLL, root: Path, names=CASES) -> dict[str, dict[str, dict]]:
    out = {}
    for name in names:
        tiny_f32_gguf(name, root)
        out[name] = {q: quantized(llama_quantize(lib, root / f"{name}.f32.gguf",
                                                 root / f"{name}.{q}.gguf", q))
                     for q in quants_of(name)}
    return out


def stored_reference() -> dict[str, dict[str, dict[str, str]]]:
    """{case: {quant: {tensor: type}}} as kquant_reference.json keeps them (F32 ones left
    out)."""
    return json.loads(REFERENCE.read_text())["types"]


def rewrite_reference(lib: ctypes.CDLL, build: str, names: list[str], root: Path) -> None:
    """kquant_reference.json with `names` written by `lib` (llama.cpp `build`), the other cases
    as they were."""
    stored = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    types, written_by = stored.get("types", {}), stored.get("written_by", {})
    types.update(live_reference(lib, root, names))
    label = f"llama.cpp {build} llama_model_quantize"
    written_by = {who: [n for n in cases if n not in names] for who, cases in written_by.items()}
    written_by[label] = sorted(set(written_by.get(label, [])) | set(names))
    REFERENCE.write_text(json.dumps({"written_by": {w: c for w, c in written_by.items() if c},
                                     "types": types}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # rewrite kquant_reference.json's cases with the library at hand
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    library = llama_quantize_library()
    if library is None:
        sys.exit("no libllama with llama_model_quantize loads: set LLAMA_QUANTIZE_LIB")
    with tempfile.TemporaryDirectory() as tmp:
        rewrite_reference(library, os.environ.get("LLAMA_CPP_BUILD", LLAMA_CPP),
                          sys.argv[1:] or list(CASES), Path(tmp))
