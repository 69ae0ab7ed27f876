"""The importance matrix a K-quant export is weighted by (export/imatrix.py, on the file's tensors
by export/gguf_imatrix.py), as llama-imatrix records it and llama-quantize reads it: every matrix
llama.cpp quantizes and multiplies an input by is weighted, for every family the GGUF writer
takes (the routed experts, Qwen3.5, the fused projections the writer splits among them); a routed
expert's vector is the mean square of the inputs of the tokens its router sent it (ones where
none: llama-quantize's reading of an expert of no tokens), and the file holds each expert's rows
as llama.cpp's ggml_quantize_chunk quantizes them with that expert's vector. Tiny random folders
saved by transformers, real MLX, the real llama.cpp quantizer (xllamacpp), read back with
gguf-py."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from hf_helpers import save_tiny_model
from kquant_fixtures import tiny_folder
from mlxlab.export.gguf import write_gguf
from mlxlab.export.imatrix import importance
from mlxlab.export.retention import read_folder

gguf = pytest.importorskip("gguf")
pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")

# what a file may leave unweighted: the token embedding (a lookup: llama.cpp never weights it)
# and the latent attention's v_b, whose input in llama.cpp's absorbed form (the attention's
# output in the latent space) mlx-lm's forward over a prompt does not compute (gguf_imatrix.py)
ALLOWED = ("token_embd.weight", ".attn_v_b.weight")
FAMILIES = ("mixtral", "qwen3_moe", "granitemoe", "deepseek_v3_8_experts",
            "lfm2", "mamba2", "granitemoehybrid", "granitemoehybrid_dense", "nemotron_h_dense",
            "nemotron_h_moe", "falcon_h1", "qwen3_5", "qwen3_next", "kimi_linear",
            "kimi_linear_mla")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("imatrix"), {}

    def folder(case: str, **overrides) -> Path:
        key = (case, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = (save_tiny_model(case, root / f"{case}-{len(made)}", chat="chatml",
                                         **overrides)
                         if overrides else tiny_folder(case, root))
        return made[key]

    return folder


def _batch(rows: list[int], width: int, seed: int = 0) -> dict:
    """Random token rows of the given real lengths, right-padded to `width` (loss_mask 0)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(rows), width), np.float32)
    for r, n in enumerate(rows):
        mask[r, :n] = 1
    ids = rng.integers(3, 500, (len(rows), width)) * mask
    return {"input_ids": mx.array(ids.astype(np.int32)), "loss_mask": mx.array(mask)}


def _file(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("case", ["llama", "phi3", *FAMILIES])
def test_every_matrix_llama_cpp_quantizes_and_multiplies_an_input_by_is_weighted(case, folders,
                                                                                 tmp_path):
    """A Q4_K_M file weighted by the importance matrix of a padded batch: its report counts
    every tensor llama.cpp quantized (read back: each that is not F32 or F16) and names the
    unweighted ones, which are only the token embedding and the latent attention's v_b (none of
    the routed experts, Qwen3.5's, the split or fused projections, the latent k_b)."""
    # two dense decoders (Phi-3's fused attn_qkv and gate_up) of two layers, each MoE and hybrid
    # family's tiny folder
    folder = folders(case, num_hidden_layers=2) if case in ("llama", "phi3") else folders(case)
    recorded = importance(read_folder(folder), [_batch([30, 12, 7], 30)])
    report = write_gguf(folder, tmp_path / "q.gguf", "q4_k_m", name="tiny",
                        importance=recorded.vectors)
    coverage = report["imatrix"]
    quantized = [n for n, t in _file(tmp_path / "q.gguf").items()
                 if t.tensor_type.name not in ("F32", "F16")]
    assert coverage["quantized"] == len(quantized)
    assert coverage["weighted"] == len(quantized) - len(coverage["unweighted"]) > 0
    assert all(name.endswith(ALLOWED) for name in coverage["unweighted"]), coverage["unweighted"]


def _captured(block: nn.Module) -> tuple[nn.Module, list]:
    """`block` (a MoE layer's SwitchGLU) that keeps the (tokens, router picks) of each call."""
    seen: list = []

    class Capture(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = block

        def __call__(self, x, indices):
            seen.append((np.array(x), np.array(indices)))
            return self.inner(x, indices)

    return Capture(), seen


def test_a_routed_expert_records_the_tokens_its_router_sent_it(folders):
    """Qwen3-MoE: each expert's vector of gate_proj / up_proj is the mean square of the inputs
    of the real tokens routed to it (padding left out), down_proj's of the SwiGLU output that
    expert computed for them (numpy from the router's picks); one padded batch (mlx-lm sorts its
    rows by expert) and its rows one by one (unsorted) record the same; an expert no token
    reached gets ones and is named."""
    from mlxlab.objectives.losses import forward

    model = read_folder(folders("qwen3_moe"))
    moe = model.lm.model.layers[0].mlp
    block = moe.switch_mlp
    batch = _batch([30, 12, 7], 30)
    moe.switch_mlp, seen = _captured(block)
    mx.eval(forward(model, batch))
    moe.switch_mlp = block
    (x, picks), = seen
    real = np.array(batch["loss_mask"]) > 0
    x, picks = x[real], picks[real]  # the real tokens' inputs and experts
    gate, up, down = (np.array(getattr(block, p).weight) for p in ("gate_proj", "up_proj",
                                                                      "down_proj"))
    padded = importance(model, [batch])
    one_by_one = importance(model, [  # the same rows without their padding
        {"input_ids": batch["input_ids"][r:r + 1, :n], "loss_mask": mx.ones((1, n))}
        for r, n in enumerate((30, 12, 7))])
    prefix = "model.layers.0.mlp.switch_mlp"
    for e in range(gate.shape[0]):
        rows = x[(picks == e).any(-1)]
        assert len(rows) > 0
        g, u = rows @ gate[e].T, rows @ up[e].T
        hidden = g / (1 + np.exp(-g)) * u
        for proj, inputs in (("gate_proj", rows), ("up_proj", rows), ("down_proj", hidden)):
            want = (inputs.astype(np.float64) ** 2).mean(0)
            for got in (padded, one_by_one):
                np.testing.assert_allclose(got.vectors[f"{prefix}.{proj}.weight"][e], want,
                                           rtol=2e-4, atol=1e-6)
    assert not padded.unreached
    lone = importance(model, [_batch([1], 1)])  # one token: 2 of the 4 experts reached
    vectors = lone.vectors[f"{prefix}.gate_proj.weight"]
    missed = lone.unreached[f"{prefix}.gate_proj.weight"]
    assert len(missed) == 2 and (vectors[missed] == 1).all()
    assert not (vectors[[e for e in range(4) if e not in missed]] == 1).all()


def test_each_experts_rows_are_quantized_with_its_own_vector(folders, tmp_path):
    """A Qwen3-MoE of 256-wide rows as Q4_K_M: the file's ffn_gate_exps (Q4_K) and
    ffn_down_exps (Q6_K) hold, expert by expert, ggml_quantize_chunk of that expert's matrix
    with that expert's vector, the vectors differ between experts, and another expert's vector
    would have given other bytes."""
    from safetensors.numpy import load_file

    from mlxlab.export.gguf_kquants import quantize

    folder = folders("qwen3_moe", hidden_size=256, moe_intermediate_size=256, head_dim=64,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    recorded = importance(read_folder(folder), [_batch([40, 25], 40)])
    write_gguf(folder, tmp_path / "q.gguf", "q4_k_m", name="tiny", importance=recorded.vectors)
    tensors, source = _file(tmp_path / "q.gguf"), load_file(str(folder / "model.safetensors"))
    for proj, stack, kind in (("gate_proj", "ffn_gate_exps", "Q4_K"),
                              ("down_proj", "ffn_down_exps", "Q6_K")):
        written = tensors[f"blk.0.{stack}.weight"]
        assert written.tensor_type.name == kind
        vectors = recorded.vectors[f"model.layers.0.mlp.switch_mlp.{proj}.weight"]
        data = np.asarray(written.data).reshape(len(vectors), -1)
        for e, vector in enumerate(vectors):
            w = source[f"model.layers.0.mlp.experts.{e}.{proj}.weight"]
            mine = quantize(w, written.tensor_type, vector).ravel()
            other = quantize(w, written.tensor_type, vectors[(e + 1) % len(vectors)]).ravel()
            assert np.array_equal(data[e], mine), (stack, e)
            assert not np.array_equal(data[e], other), (stack, e)
            assert not np.allclose(vector, vectors[(e + 1) % len(vectors)])


def _regrouped(folder: Path) -> dict[str, np.ndarray]:
    """{llama.cpp name: float array} as the writer lays the folder out (before quantizing)."""
    from mlxlab.export.gguf import _named_tensors, architecture_of, stored_tensor

    config = json.loads((folder / "config.json").read_text())
    arch = architecture_of(config)
    return {full: stored_tensor(arch, config, name, full, w)
            for name, full, w, _ in _named_tensors(folder, config, arch)}


@pytest.mark.parametrize("case, fused, parts", [
    ("qwen3_next", "model.layers.0.linear_attn.in_proj_qkvz.weight",
     ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight")),
    ("granitemoehybrid", "model.layers.0.shared_mlp.input_linear.weight",
     ("blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight")),
])
def test_each_part_of_a_split_projection_is_weighted_by_the_fused_ones_input(case, fused, parts,
                                                                           folders, tmp_path):
    """Qwen3-Next's in_proj_qkvz, written as attn_qkv and attn_gate, and Granite's fused
    shared_mlp.input_linear, written as the shared expert's gate and up: both parts read the
    fused projection's input, so each is quantized with its recorded vector."""
    from mlxlab.export.gguf_kquants import quantize

    folder = folders(case)
    recorded = importance(read_folder(folder), [_batch([30, 12], 30)])
    write_gguf(folder, tmp_path / "q.gguf", "q4_k_m", name="tiny", importance=recorded.vectors)
    tensors, floats = _file(tmp_path / "q.gguf"), _regrouped(folder)
    for part in parts:
        written = tensors[part]
        assert written.tensor_type.name not in ("F32", "F16")
        want = quantize(floats[part], written.tensor_type, recorded.vectors[fused])
        assert np.array_equal(np.asarray(written.data).ravel(), want.ravel()), part


def test_qwen3_5s_vectors_follow_the_files_column_order(folders, tmp_path):
    """Qwen3.5's mlx-lm modules sit under language_model.; its delta layer's out_proj is written
    with its value heads tiled (ssm_out's columns reordered): the vector it is quantized with is
    the recorded one with its entries moved as the columns moved (found by matching the file's
    columns to the checkpoint's), not the recorded order."""
    from safetensors.numpy import load_file

    from mlxlab.export.gguf_kquants import quantize

    folder = folders("qwen3_5")
    recorded = importance(read_folder(folder), [_batch([30, 12], 30)])
    vector = recorded.vectors["language_model.model.layers.0.linear_attn.out_proj.weight"]
    write_gguf(folder, tmp_path / "q.gguf", "q4_k_m", name="tiny", importance=recorded.vectors)
    source = load_file(str(folder / "model.safetensors"))["model.layers.0.linear_attn.out_proj.weight"]
    stored = _regrouped(folder)["blk.0.ssm_out.weight"]
    moved = [int(np.flatnonzero((source == stored[:, [j]]).all(0))[0])
             for j in range(stored.shape[1])]
    assert moved != sorted(moved)
    written = _file(tmp_path / "q.gguf")["blk.0.ssm_out.weight"]
    data = np.asarray(written.data).ravel()
    assert np.array_equal(data, quantize(stored, written.tensor_type, vector[moved]).ravel())
    assert not np.array_equal(data, quantize(stored, written.tensor_type, vector).ravel())


def test_a_latent_attentions_k_b_is_weighted_per_head_by_its_query(folders, tmp_path):
    """DeepSeek-V3: llama.cpp multiplies each head's k_b (its absorbed attention) by the head's
    query before the rotary part; its vector per head is that part's mean square over the real
    tokens (numpy from the query projection's output), and the file's attn_k_b holds each head's
    rows quantized by ggml_quantize_chunk with its own vector."""
    from mlxlab.export.gguf_kquants import quantize
    from mlxlab.objectives.losses import forward

    folder = folders("deepseek_v3", num_hidden_layers=1, qk_nope_head_dim=32)
    model = read_folder(folder)
    attention = model.lm.model.layers[0].self_attn
    name = "q_b_proj" if "q_b_proj" in attention else "q_proj"
    projection, seen = getattr(attention, name), []

    class Capture(nn.Module):
        def __call__(self, x):
            y = projection(x)
            seen.append(np.array(y))
            return y

    batch = _batch([30, 12], 30)
    setattr(attention, name, Capture())
    mx.eval(forward(model, batch))
    setattr(attention, name, projection)
    heads, size, nope = attention.num_heads, attention.q_head_dim, attention.qk_nope_head_dim
    real = np.array(batch["loss_mask"]) > 0
    queries = seen[0][real].reshape(-1, heads, size)[..., :nope]
    recorded = importance(model, [batch])
    vectors = recorded.vectors["model.layers.0.self_attn.embed_q.weight"]
    np.testing.assert_allclose(vectors, (queries.astype(np.float64) ** 2).mean(0), rtol=2e-4)
    write_gguf(folder, tmp_path / "q.gguf", "q4_k_m", name="tiny", importance=recorded.vectors)
    written = _file(tmp_path / "q.gguf")["blk.0.attn_k_b.weight"]
    assert written.tensor_type.name not in ("F32", "F16")
    k_b = _regrouped(folder)["blk.0.attn_k_b.weight"]
    data = np.asarray(written.data).reshape(heads, -1)
    for h in range(heads):
        assert np.array_equal(data[h], quantize(k_b[h], written.tensor_type, vectors[h]).ravel())
