"""GGUF K-quants (Q4_K_M, Q5_K_M, Q6_K): llama.cpp's own quantizer through the xllamacpp wheel,
llama-quantize's per-tensor mixture (tensor for tensor what llama.cpp's llama_model_quantize
wrote for tiny models of every architecture the writer takes: kquant_fixtures.py), an
importance matrix on the run's rows, and the file run in llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hf_helpers import save_tiny_model
from kquant_fixtures import (
    file_types,
    live_reference,
    llama_quantize_library,
    quantized,
    stored_reference,
    tiny_folder,
)
from mlxlab.export.gguf import write_gguf

gguf = pytest.importorskip("gguf")
xl = pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
T = gguf.GGMLQuantizationType


def test_llama_cpps_quantizer_writes_the_legacy_types_as_gguf_py_does():
    """ggml_quantize_chunk called through ctypes (rows, columns, byte layout) gives, for the
    types gguf-py also implements bit for bit, the very bytes gguf-py writes; its K-quants
    dequantize (gguf-py's own reader) to within their step, closer with more bits; an
    importance matrix changes the choice of codes."""
    from mlxlab.export.gguf_kquants import quantize

    w = np.random.default_rng(0).normal(size=(6, 512)).astype(np.float32)
    for kind in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0):
        assert np.array_equal(quantize(w, kind), gguf.quants.quantize(w, kind)), kind.name
    errors = [np.abs(gguf.quants.dequantize(quantize(w, k), k) - w).mean()
              for k in (T.Q4_K, T.Q5_K, T.Q6_K)]
    assert errors[0] > errors[1] > errors[2] and errors[0] < 0.1
    importance = np.random.default_rng(1).random(512).astype(np.float32) ** 4
    weighted = quantize(w, T.Q4_K, importance)
    assert not np.array_equal(weighted, quantize(w, T.Q4_K))
    err = np.abs(gguf.quants.dequantize(weighted, T.Q4_K) - w)  # better where it weighs most
    plain = np.abs(gguf.quants.dequantize(quantize(w, T.Q4_K), T.Q4_K) - w)
    assert (err ** 2 * importance).sum() < (plain ** 2 * importance).sum()


def _layout(layers: int, tied: bool, *tensors: str, **more) -> object:
    """A file of `layers` blocks, each holding `tensors`."""
    from mlxlab.export.gguf_kquants import FileLayout

    names = [f"blk.{i}.{t}.weight" for i in range(layers) for t in tensors]
    return FileLayout(("token_embd.weight", *names, *(() if tied else ("output.weight",))),
                      layers, **more)


def test_the_mixture_is_llama_quantizes():
    """Q4_K_M on 8 layers: attn_v (and Phi-3's fused attn_qkv) and ffn_down Q6_K on the layers
    use_more_bits picks (0, 3, 6, 7), by their place in llama.cpp's order whatever order they
    come in; the tied embedding Q6_K, the rest Q4_K; rows that are not whole 256-blocks fall
    back as llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0); what llama.cpp calls a 70B raises the
    other attn_v to Q5_K; an output whose rows are not whole 32-blocks F16."""
    from mlxlab.export.gguf_kquants import Mixture, is_70b

    picks = ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    for tensor in ("attn_v", "attn_qkv", "ffn_down"):
        m = Mixture("q4_k_m", _layout(8, True, tensor))
        order = [7, 0, 3, 1, 6, 2, 5, 4]  # the types follow the layer, not the visit
        got = {i: m.type_of(f"blk.{i}.{tensor}.weight", 512).name for i in order}
        assert [got[i] for i in range(8)] == picks, tensor
    m = Mixture("q4_k_m", _layout(8, True, "attn_q"))
    assert m.type_of("token_embd.weight", 512) == T.Q6_K
    assert m.type_of("token_embd.weight", 576) == T.Q8_0  # SmolLM2's 576: not 256-blocks
    assert m.type_of("blk.0.attn_q.weight", 576) == T.Q5_0
    assert m.type_of("blk.0.attn_q.weight", 100) == T.F16
    assert m.type_of("token_embd.weight", 100) == T.F16
    untied = _layout(8, False, "attn_q")
    assert Mixture("q6_k", untied).type_of("blk.0.attn_q.weight", 576) == T.Q8_0
    assert Mixture("q4_k_m", untied).type_of("token_embd.weight", 512) == T.Q4_K
    big = Mixture("q4_k_m", _layout(80, False, "attn_v", seventy_b=True))
    assert [big.type_of(f"blk.{i}.attn_v.weight", 512).name for i in (0, 10, 12)] == [
        "Q6_K", "Q5_K", "Q6_K"]
    llama = {"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}
    assert is_70b("LLAMA", llama) and is_70b("QWEN2", {**llama, "num_key_value_heads": 64})
    assert not is_70b("LLAMA", {**llama, "num_key_value_heads": 64})  # a 65B
    assert not is_70b("PHI3", llama) and not is_70b("LLAMA", {**llama, "num_hidden_layers": 40})


def test_a_hybrids_counts_are_llama_cpps():
    """On a hybrid, attn_v counts among the attention layers alone (i_attention_wv of
    n_attention_wv), ffn_down among the layers that hold one (i_ffn_down, of the block count)
    where the file has no experts, by its layer number where it has; 8 experts raise attn_v and
    attn_k to Q8_0 and, at Q4_K_M, attn_output to Q5_K."""
    from mlxlab.export.gguf_kquants import FileLayout, Mixture

    # 16 blocks, attention on every 4th (3, 7, 11, 15): attn_v's places 0-3 of 4, so the last
    # two get more bits (by layer number of 16, blocks 7 and 15 would)
    names = ("output.weight", *(f"blk.{i}.attn_v.weight" for i in (3, 7, 11, 15)),
             *(f"blk.{i}.ffn_down.weight" for i in (1, 5, 9, 13)))
    m = Mixture("q4_k_m", FileLayout(names, 16))
    assert [m.type_of(f"blk.{i}.attn_v.weight", 512).name for i in (3, 7, 11, 15)] == [
        "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    # ffn_down in 4 of 16 blocks, places 0-3 of 16: 0, 1 (first eighth), 2 ((2 - 2) % 3 != 2)
    assert [m.type_of(f"blk.{i}.ffn_down.weight", 512).name for i in (1, 5, 9, 13)] == [
        "Q6_K", "Q6_K", "Q4_K", "Q4_K"]
    experts = Mixture("q4_k_m", FileLayout(names, 16, experts=4))  # by layer: 1 and 13
    assert [experts.type_of(f"blk.{i}.ffn_down.weight", 512).name for i in (1, 5, 9, 13)] == [
        "Q6_K", "Q4_K", "Q4_K", "Q6_K"]
    eight = Mixture("q4_k_m", FileLayout(names, 16, experts=8))
    assert eight.type_of("blk.3.attn_v.weight", 512) == T.Q8_0
    assert eight.type_of("blk.3.attn_k.weight", 512) == T.Q8_0
    assert eight.type_of("blk.3.attn_output.weight", 512) == T.Q5_K
    assert Mixture("q5_k_m", FileLayout(names, 16, experts=8)).type_of(
        "blk.3.attn_output.weight", 512) == T.Q5_K  # the file type's own


# (case, quant) of kquant_reference.json written in the default run: Phi-3's fused attn_qkv, a
# Llama of 12 layers (blk.10 and blk.11 come before blk.2 in its safetensors), Nemotron-H's
# attn_v and ffn_down counted among its attention and MLP layers, a Granite hybrid of 8 experts,
# Kimi-Linear's latent attention beside its delta layers, Qwen3-Next's experts as Q4_K stacks,
# Mixtral of 8 experts (attn_v, attn_k Q8_0, attn_output Q5_K falling back to Q5_1; ffn_down_exps
# by layer number), DeepSeek-V3's split latent attention (k_b's rows of 16 F16) and shared expert
FAST = {("phi3", "q4_k_m"), ("llama", "q5_k_m"), ("nemotron_h_12_layers", "q4_k_m"),
        ("granitemoehybrid_8_experts", "q4_k_m"), ("kimi_linear_mla", "q5_k_m"),
        ("qwen3_next_wide", "q4_k_m"), ("mixtral_8_experts", "q4_k_m"),
        ("deepseek_v3_8_experts", "q4_k_m")}
REFERENCE_CASES = [pytest.param(case, quant, marks=() if (case, quant) in FAST
                                else pytest.mark.slow, id=f"{case}-{quant}")
                   for case, quants in stored_reference().items() for quant in quants]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict:
    """Each case's tiny folder, written once per module."""
    root, folders = tmp_path_factory.mktemp("kquant-cases"), {}

    def folder(case: str) -> Path:
        if case not in folders:
            folders[case] = tiny_folder(case, root)
        return folders[case]

    return folder


@pytest.mark.parametrize("case, quant", REFERENCE_CASES)
def test_every_tensor_gets_the_type_llama_quantize_gives_it(case, quant, tiny_folders, tmp_path):
    """The file mlxlab writes holds, tensor for tensor, the types llama.cpp's
    llama_model_quantize gave the same model's F32 file (kquant_reference.json): for every
    dense architecture the GGUF writer takes, every hybrid family, the MoE decoders (Mixtral,
    Qwen3-MoE, Granite MoE, DeepSeek-V3) and LFM2, at Q4_K_M, Q5_K_M and Q6_K, with rows that
    are not whole blocks, tied embeddings, what llama.cpp calls a 70B, experts (8 of them too),
    and the tensors it leaves in F32 (the mixers' A, D, convolution kernels and norms, routers,
    single rows: absent from the reference, F32 in both)."""
    out = tmp_path / f"{case}.gguf"
    report = write_gguf(tiny_folders(case), out, quant, name=case)
    written = quantized(file_types(out))
    expected = stored_reference()[case][quant]
    assert written.keys() == expected.keys()
    differ = {name: (written[name], kind) for name, kind in expected.items()
              if written[name] != kind}
    assert not differ, f"(mlxlab, llama-quantize) types: {differ}"
    assert sum(n for kind, n in report["tensor_types"].items() if kind != "F32") == len(expected)


@pytest.mark.slow  # a libllama with llama_model_quantize: llama-cpp-py-sync's needs glibc 2.38
def test_the_reference_is_what_llama_quantize_writes_now(tmp_path):
    """kquant_reference.json is what the llama.cpp at hand writes for the cases that tell the
    mixture's rules apart."""
    library = llama_quantize_library()
    if library is None:
        pytest.skip("no libllama with llama_model_quantize loads here (LLAMA_QUANTIZE_LIB)")
    names = ("phi3", "llama", "llama3_tied", "llama_rows_320", "llama_80_layers",
             "nemotron_h_12_layers", "granitemoehybrid_8_experts", "kimi_linear_mla",
             "qwen3_next", "qwen3_5_wide", "mixtral_8_experts", "deepseek_v3_wide", "lfm2_wide")
    live = live_reference(library, tmp_path, names)
    assert live == {name: stored_reference()[name] for name in names}


@pytest.mark.slow  # the real Gemma 3 file: 238 MB from the package index once
def test_the_mixture_matches_a_q4_k_m_file_llama_quantize_wrote():
    """Every tensor of the Gemma 3 270M Q4_K_M GGUF (written by llama-quantize) gets, in the
    file's order, the type Mixture gives it."""
    from mlxlab.export.gguf_kquants import FileLayout, Mixture
    from real_models import GEMMA3, packaged_model

    reader = gguf.GGUFReader(str(packaged_model(GEMMA3)))
    layers = int(reader.fields["gemma3.block_count"].contents())
    mixture = Mixture("q4_k_m", FileLayout(tuple(t.name for t in reader.tensors), layers))
    matrices = [t for t in reader.tensors if len(t.shape) == 2 and "norm" not in t.name]
    ours = [mixture.type_of(t.name, int(t.shape[0])).name for t in matrices]
    assert ours == [t.tensor_type.name for t in matrices]
    assert len(set(ours)) >= 3


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_a_q4_k_m_file_runs_in_llama_cpp_as_mlxlab_reads_it(tmp_path):
    """A llama of 256-wide rows written as Q4_K_M: K-quant tensors where the mixture says, and
    llama.cpp computes from the file what mlxlab's reading of the file computes: its top
    log-probabilities after each prefix sit far closer to those of the file read back than to
    the float model's (measured: 0.69 against 5.9 at most; llama.cpp's CPU also rounds the
    activations to 8 bits for K-quant products, so they are not equal)."""
    import mlx.core as mx

    from mlxlab.export.retention import read_folder, read_gguf

    folder = save_tiny_model("llama", tmp_path / "llama", hidden_size=256,
                             intermediate_size=512, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2)
    report = write_gguf(folder, tmp_path / "k.gguf", "q4_k_m", name="tiny")
    assert {"Q4_K", "Q6_K"} <= set(report["tensor_types"])
    ids = [1, 17, 99, 250, 31, 400, 77, 12]
    read = _log_softmax(np.array(read_gguf(tmp_path / "k.gguf", tmp_path / "read")(
        mx.array([ids])).astype(mx.float32))[0])
    float_ = _log_softmax(np.array(read_folder(folder)(mx.array([ids])).astype(mx.float32))[0])
    params = xl.CommonParams()
    params.model.path = str(tmp_path / "k.gguf")
    params.n_ctx = 64
    params.cpuparams.n_threads = 1
    server = xl.Server(params)
    to_file, to_float = [], []
    for end in range(1, len(ids) + 1):
        answer = server.handle_completions({"prompt": ids[:end], "n_predict": 1,
                                            "temperature": 0, "n_probs": 3,
                                            "cache_prompt": False})
        logprobs = answer["choices"][0]["logprobs"]
        for t in (logprobs["content"][0]["top_logprobs"] if logprobs else []):
            to_file.append(abs(t["logprob"] - read[end - 1, t["id"]]))
            to_float.append(abs(t["logprob"] - float_[end - 1, t["id"]]))
    assert len(to_file) >= 3 * len(ids) // 2
    assert max(to_file) < 0.25 * max(to_float)


def test_stored_values_are_written_in_a_k_quant_file_too(tmp_path, monkeypatch):
    """An architecture that stores other values than the checkpoint's (Architecture.values:
    Mamba's A = -exp(A_log), Falcon-H1's folded multipliers) stores them whatever the matrix is
    quantized as: here a llama told to store its embedding doubled, written as Q4_K_M, holds the
    doubled embedding in its K-quant tensor (within the quantization step)."""
    from dataclasses import replace

    from safetensors.numpy import load_file

    from mlxlab.export import gguf as writer
    from mlxlab.export.gguf_regroup import StoredValues

    def doubled(name, w, config):
        return w * 2 if name == "token_embd.weight" else w

    def halved(name, w, config):
        return w / 2 if name == "token_embd.weight" else w

    arch = replace(writer.ARCHITECTURES["llama"], values=StoredValues(doubled, halved))
    monkeypatch.setitem(writer.ARCHITECTURES, "llama", arch)
    folder = save_tiny_model("llama", tmp_path / "llama", hidden_size=256, intermediate_size=512,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    write_gguf(folder, tmp_path / "k.gguf", "q4_k_m", name="tiny")
    embd = next(t for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors
                if t.name == "token_embd.weight")
    assert embd.tensor_type in (T.Q4_K, T.Q6_K)
    stored = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type)
    source = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
    step = np.abs(stored - 2 * source).max()
    assert step < 0.1 * np.abs(2 * source).max(), step  # the plain embedding is off by half
