"""GGUF export of the Mamba-2 families (Mamba-2, Granite 4 hybrids with and without experts,
Nemotron-H with and without experts, Falcon-H1), of the gated delta ones (Qwen3.5's text model,
Qwen3-Next) and of Kimi-Linear (Kimi delta attention, latent attention, MoE), proven by llama.cpp
itself (the xllamacpp wheel, dev extra).

Each family's tiny random folder is written by transformers (tests/hybrid_families.py: every
parameter drawn off its initial value, A_log, D, dt_bias and the grouped norm included; Nemotron-H
with two mixer groups), loaded by mlxlab (mlx-lm), and written as an F32 GGUF by export/gguf.py;
llama.cpp loads the file and, after each prefix of a prompt, picks the next token greedily and
lists its top log-probabilities, held to mlxlab's as test_export_gguf_moe.py holds the MoE
families (its pick is mlxlab's argmax, its log-probabilities within three times the rounding
shift). Measured, largest |llama.cpp - mlxlab| over the listed log-probabilities: mamba2 2.9e-6,
granitemoehybrid 2.4e-6 (without experts 2.4e-6 too), Falcon-H1 2.9e-6 (its multipliers folded
into the weights), Qwen3.5 2.5e-5, Qwen3-Next 4.3e-6, Kimi-Linear 3.9e-5 (its router's bias
drawn too) and 1.1e-4 (its latent sizes all different, two shared experts), Nemotron-H 4.8e-6
(dense) and 6.7e-6 (experts), these two against the model without transformers' time-step
clamp, which llama.cpp does not apply (with it: 2.5e-3 and 3.8e-3, the same picks). A wrong
layout (A_log not negated and exponentiated, the norm not split per group, gate and up swapped,
Qwen3.5's value heads left grouped or its rotary pairs not all rotating, Qwen3-Next's v and z
swapped, Kimi-Linear's latent k_b untransposed or its gates swapped: tested below) changes the
picks. What llama.cpp's graphs do not compute is one line, exit 2, naming the setting or tensor.
A Q4_K_M file (llama-quantize's types: test_export_gguf_kquants.py) runs in llama.cpp within its
own K-quant arithmetic of mlxlab's reading of the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import mlx_logits
from hybrid_families import save_tiny_hybrid
from mlxlab.export.gguf import write_gguf
from test_export_gguf_moe import (
    IDS,
    compare,
    exported_q4_k_m_runs_in_llama_cpp,
    llama_cpp_steps,
    log_softmax,
    rounding_shift,
)

KINDS = ("mamba2", "granitemoehybrid", "granitemoehybrid_dense", "nemotron_h_dense",
         "nemotron_h_moe", "falcon_h1", "qwen3_5", "qwen3_next", "kimi_linear", "kimi_linear_mla")
ARCH = {"mamba2": "mamba2", "granitemoehybrid": "granitehybrid",
        "granitemoehybrid_dense": "granitehybrid", "nemotron_h_dense": "nemotron_h",
        "nemotron_h_moe": "nemotron_h_moe", "falcon_h1": "falcon-h1", "qwen3_5": "qwen35",
        "qwen3_next": "qwen3next", "kimi_linear": "kimi-linear", "kimi_linear_mla": "kimi-linear"}
KIMI_BIAS = "model.layers.1.block_sparse_moe.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root, made = tmp_path_factory.mktemp("gguf-mamba"), {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_hybrid(kind, root / kind)
            if kind.startswith("kimi"):  # the router's bias is a buffer, left at zero: drawn
                bias = np.random.default_rng(0).normal(0.0, 0.5, 4).astype(np.float32)
                made[kind] = _edited_copy(made[kind], root / f"{kind}_biased",
                                          extra={KIMI_BIAS: bias})
        return made[kind]

    return folder


def _mlxlab_model(folder: Path):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    return MLXLMDecoder(vocab_size=1, pretrained=str(folder))


def _unclamped(folder: Path, to: Path) -> Path:
    """Nemotron-H with time_step_min 0: transformers (and mlxlab after it) clamp the time step
    at time_step_min, llama.cpp does not, so its layout is held to the model without the clamp;
    test_llama_cpp_does_not_clamp_nemotron_hs_time_step measures what the clamp moves."""
    return _edited_copy(folder, to, {"time_step_min": 0.0})


def _reference(kind: str, folder: Path, to: Path) -> Path:
    """The folder mlxlab's probabilities are taken from: Nemotron-H's without the time-step
    clamp (_unclamped). (A dense Granite hybrid's tiny folder keeps intermediate_size, the
    experts' width, and its MLP's shared_intermediate_size apart, 96 and 32: mlxlab reads the
    folder as transformers does, so the file must say 32.)"""
    if kind.startswith("nemotron"):
        return _unclamped(folder, to)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_the_f32_export_with_mlxlabs_probabilities(kind, folders, tmp_path):
    folder = folders(kind)
    report = write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    assert report["architecture"] == ARCH[kind]
    reference = _reference(kind, folder, tmp_path / "ref")
    ours, shift = rounding_shift(lambda: _mlxlab_model(reference), "f32", np.array([IDS]))
    theirs, allowed = compare(llama_cpp_steps(tmp_path / "f32.gguf", IDS), ours, shift)
    assert theirs <= 3 * allowed, (kind, theirs, allowed)


def test_llama_cpp_does_not_clamp_nemotron_hs_time_step(folders, tmp_path):
    """Where a random dt falls under time_step_min (0.001), transformers and mlxlab clamp it and
    llama.cpp does not: its picks stay mlxlab's, its log-probabilities move by up to a few
    thousandths (measured 2.5e-3) on this tiny random model."""
    folder = folders("nemotron_h_dense")
    write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    ours = log_softmax(mlx_logits(_mlxlab_model(folder), np.array([IDS]))[0])
    steps = llama_cpp_steps(tmp_path / "f32.gguf", IDS)
    assert all(step["id"] == int(ours[end - 1].argmax()) for end, step in steps)
    gap = max(abs(t["logprob"] - float(ours[end - 1][t["id"]]))
              for end, step in steps for t in step["top_logprobs"])
    assert 1e-4 < gap < 1e-2, gap


def test_the_mixer_tensors_are_llama_cpps_layout(folders, tmp_path):
    """A = -exp(A_log) and D as (heads, 1) columns, the kernel 2-D, the norm one row per group,
    all F32 in an f16 file (llama.cpp's scan reads them so)."""
    import gguf
    from safetensors.numpy import load_file

    folder = folders("nemotron_h_dense")
    write_gguf(folder, tmp_path / "f16.gguf", "f16", name="tiny")
    source = load_file(str(folder / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "f16.gguf")).tensors}
    a, d, conv, norm = (tensors[f"blk.0.{n}"] for n in ("ssm_a", "ssm_d", "ssm_conv1d.weight",
                                                       "ssm_norm.weight"))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in (a, d, conv, norm))
    np.testing.assert_allclose(np.asarray(a.data).ravel(),
                               -np.exp(source["backbone.layers.0.mixer.A_log"]), rtol=1e-6)
    assert list(a.shape) == [1, 8] and list(d.shape) == [1, 8]  # GGUF lists the fastest axis first
    assert list(conv.shape) == [4, 192] and list(norm.shape) == [64, 2]
    assert tensors["blk.0.ssm_in.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_kimi_linears_tensors_and_keys_are_what_llama_cpps_loader_reads(folders, tmp_path):
    """The keys llama.cpp's kimi-linear loader requires (key/value heads per layer: 0 for a
    delta layer), the q/k/v kernels {K, 1, C} and A {1, heads, 1, 1} = -exp(A_log) in F32 in an
    f16 file, dt_bias as the dt bias, the latent k_b {nope, rank, heads} and v_b
    {rank, value, heads}, the dense layer's MLP and the MoE layer's experts and router bias."""
    import gguf
    from safetensors.numpy import load_file

    folder = folders("kimi_linear_mla")
    write_gguf(folder, tmp_path / "f16.gguf", "f16", name="tiny")
    source = load_file(str(folder / "model.safetensors"))
    reader = gguf.GGUFReader(str(tmp_path / "f16.gguf"))
    keys = {k.removeprefix("kimi-linear."): f.contents() for k, f in reader.fields.items()}
    assert keys["attention.head_count_kv"] == [0, 1, 0]
    assert (keys["kda.head_dim"], keys["ssm.conv_kernel"], keys["attention.kv_lora_rank"]) == (
        16, 3, 32)
    assert (keys["attention.key_length_mla"], keys["attention.value_length_mla"]) == (24, 24)
    assert (keys["leading_dense_block_count"], keys["expert_shared_count"],
            keys["expert_gating_func"]) == (1, 2, gguf.ExpertGatingFuncType.SIGMOID)
    tensors = {t.name: t for t in reader.tensors}
    f32 = gguf.GGMLQuantizationType.F32
    for name, shape in (("blk.2.ssm_conv1d_q.weight", [3, 1, 64]), ("blk.2.ssm_a", [1, 4, 1, 1]),
                        ("blk.2.ssm_dt.bias", [64]), ("blk.2.ssm_norm.weight", [16]),
                        ("blk.1.exp_probs_b.bias", [4])):
        assert list(tensors[name].shape) == shape and tensors[name].tensor_type == f32, name
    np.testing.assert_allclose(np.asarray(tensors["blk.2.ssm_a"].data).ravel(),
                               -np.exp(source["model.layers.2.self_attn.A_log"].ravel()),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.exp_probs_b.bias"].data),
                                  source[KIMI_BIAS])
    assert list(tensors["blk.1.attn_k_b.weight"].shape) == [16, 32, 4]
    assert list(tensors["blk.1.attn_v_b.weight"].shape) == [32, 24, 4]
    assert list(tensors["blk.2.ffn_gate_exps.weight"].shape) == [64, 32, 4]
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors


def _untransposed_k_b(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    return name, w.swapaxes(1, 2) if name.endswith("k_b_proj.weight") else w


def _gates_swapped(name: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """The forget gate's projections named as the output gate's, and back (same shapes)."""
    swap = {".f_a_proj.": ".g_a_proj.", ".f_b_proj.": ".g_b_proj.",
            ".g_a_proj.": ".f_a_proj.", ".g_b_proj.": ".f_b_proj."}
    part = next((p for p in swap if p in name), None)
    return (name.replace(part, swap[part]) if part else name), w


@pytest.mark.parametrize("mutation", [_untransposed_k_b, _gates_swapped])
def test_a_wrong_kimi_linear_layout_fails_llama_cpps_score(mutation, folders, tmp_path,
                                                           monkeypatch):
    """The score above is not blind to the layout: the latent k_b left untransposed (square
    here, so llama.cpp loads it), or the forget and output gates' projections swapped, move
    llama.cpp's log-probabilities far past the tolerance (measured: mean gaps 0.40 and 1.8
    against 9.7e-6 for the right layout; 7 of 15 and 12 of 13 greedy picks changed)."""
    from dataclasses import replace

    from mlxlab.export import gguf as export_gguf

    arch = export_gguf.ARCHITECTURES["kimi_linear"]

    def mutated(tensors, config):
        return (mutation(n, w) for n, w in arch.regroup(tensors, config))

    monkeypatch.setitem(export_gguf.ARCHITECTURES, "kimi_linear", replace(arch, regroup=mutated))
    folder = folders("kimi_linear")
    write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    ours, shift = rounding_shift(lambda: _mlxlab_model(folder), "f32", np.array([IDS]))
    steps = llama_cpp_steps(tmp_path / "f32.gguf", IDS)
    assert len(steps) >= len(IDS) // 2, steps
    gaps = [abs(t["logprob"] - float(ours[end - 1][t["id"]]))
            for end, step in steps for t in step["top_logprobs"]]
    assert np.mean(gaps) > 30 * shift.mean(), (np.mean(gaps), shift.mean())


def _edited_copy(source: Path, to: Path, change: dict | None = None,
                 extra: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The folder copied with config keys changed or dropped, or tensors added."""
    from safetensors.numpy import load_file, save_file

    to.mkdir()
    for f in source.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    config = json.loads((to / "config.json").read_text())
    config = {k: v for k, v in {**config, **(change or {})}.items() if k not in drop}
    (to / "config.json").write_text(json.dumps(config))
    if extra:
        save_file({**load_file(str(to / "model.safetensors")), **extra},
                  str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def _metadata(file: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(file)).fields.items()}


@pytest.mark.parametrize("kind, arch", [("qwen3_next", "qwen3next"), ("qwen3_5", "qwen35")])
def test_a_hub_config_with_top_level_rope_keys_and_an_interval_is_written_as_it_says(
        kind, arch, folders, tmp_path):
    """The hub's Qwen3-Next config.json keeps rope_theta and partial_rotary_factor at the top
    level (no rope_parameters) and says full_attention_interval instead of layer_types: the file
    carries that rope base, that rotary width and that interval."""
    folder = _edited_copy(folders(kind), tmp_path / "hub", {
        "rope_theta": 1e7, "partial_rotary_factor": 0.5, "full_attention_interval": 2},
        drop=("rope_parameters", "layer_types"))
    write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    keys = _metadata(tmp_path / "f32.gguf")
    assert keys[f"{arch}.rope.freq_base"] == 1e7
    assert keys[f"{arch}.rope.dimension_count"] == 8  # head_dim 16 x 0.5
    assert keys[f"{arch}.full_attention_interval"] == 2


def test_a_config_without_rope_keys_gets_transformers_defaults(folders, tmp_path):
    """No rope_theta anywhere: transformers' 10000; no partial_rotary_factor: its 0.25."""
    folder = _edited_copy(folders("qwen3_next"), tmp_path / "bare", drop=("rope_parameters",))
    write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    keys = _metadata(tmp_path / "f32.gguf")
    assert keys["qwen3next.rope.freq_base"] == 1e4
    assert keys["qwen3next.rope.dimension_count"] == 4  # head_dim 16 x 0.25


def _refusal(folder: Path, tmp_path: Path, capsys) -> str:
    from mlxlab.cli.export import main

    out = tmp_path / "x.gguf"
    capsys.readouterr()  # transformers' progress bars while the folder was written
    assert main([str(folder), "--format", "gguf", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    return lines[0]


@pytest.mark.parametrize("kind, change, expect", [
    ("nemotron_h", {}, "both dense-MLP and MoE layers"),
    ("mamba2", {"use_bias": True}, "biases on its Mamba-2 projections"),
    ("mamba2", {"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
    ("nemotron_h_dense", {"mlp_hidden_act": "silu"}, "mlp_hidden_act='silu'"),
    ("qwen3_5", {"layer_types": ["full_attention", "linear_attention"]}, "not every n-th"),
    ("qwen3_next", {"mlp_only_layers": [0]}, "dense layers"),
    ("falcon_h1", {"mamba_rms_norm": True}, "gated mixer norm"),
    ("falcon_h1", {"tie_word_embeddings": True}, "tied embeddings"),
    ("granitemoehybrid", {"position_embedding_type": "alibi"}, "position_embedding_type='alibi'"),
    ("kimi_linear", {"linear_num_heads": 2}, "linear_num_heads other than num_attention_heads"),
    ("kimi_linear", {"mlp_layer_types": ["sparse", "dense"]}, "dense layers first"),
    ("kimi_linear", {"moe_renormalize": False}, "moe_renormalize=false"),
    ("kimi_linear", {"num_expert_group": 2, "topk_group": 1}, "topk_group=1"),
    ("kimi_linear", {"tie_word_embeddings": True}, "tied embeddings"),
])
def test_a_setting_llama_cpp_does_not_compute_is_one_line_exit_2(kind, change, expect, folders,
                                                                 tmp_path, capsys):
    folder = folders(kind) if not change else _edited_copy(folders(kind), tmp_path / kind,
                                                            change)
    line = _refusal(folder, tmp_path, capsys)
    assert expect in line and "--format hf or mlx-lm" in line, line


@pytest.mark.parametrize("kind, drop, expect", [
    ("qwen3_next", ("layer_types",), "neither layer_types nor full_attention_interval"),
    ("nemotron_h_dense", ("layers_block_type",),
     "neither layers_block_type nor hybrid_override_pattern"),
])
def test_a_config_that_does_not_say_what_its_layers_are_is_refused_by_key(
        kind, drop, expect, folders, tmp_path, capsys):
    folder = _edited_copy(folders(kind), tmp_path / "q", drop=drop)
    line = _refusal(folder, tmp_path, capsys)
    assert expect in line and "--format hf or mlx-lm" in line, line


def _listed(step: dict) -> dict[int, float]:
    return {t["id"]: t["logprob"] for t in step["top_logprobs"]}


# the MoE decoders (4 layers of 256-wide rows: kquant_fixtures.RUN_CASES) and LFM2 (12) with
# -m slow (2-3 s each)
@pytest.mark.parametrize("case", ["mamba2_wide", "qwen3_5_wide", "qwen3_next_wide", *(
    pytest.param(case, marks=pytest.mark.slow) for case in (
        "qwen3_moe_4_layers", "mixtral_4_layers", "granitemoe_4_layers", "deepseek_v3_4_layers",
        "lfm2_wide"))])
def test_llama_cpp_runs_a_q4_k_m_export_as_mlxlab_reads_it(case, tmp_path):
    """A Q4_K_M file of a hybrid, an MoE decoder or LFM2 (rows of 256: Q4_K and Q6_K tensors,
    the experts as 3-D stacks) holds every tensor within its 4-bit step of the folder's (read back: at most
    0.1 of the tensor's largest value; measured 0.066, a misplaced row would be off by the
    whole range) and loads in llama.cpp, and
    what separates its log-probabilities from mlxlab's reading of the file is llama.cpp's own
    K-quant arithmetic (its CPU rounds the activations to 8 bits per 256 for every K-quant
    product), nothing in the file: llama.cpp computing the file's values in F32 agrees with
    mlxlab to 1e-3 (measured 3.8e-5 Mamba-2, 9.6e-5 Qwen3.5, 2.7e-4 Mixtral); every listed log-probability of
    the Q4_K_M run sits as far from mlxlab's as from llama.cpp's own F32 run of the same values
    (within that 1e-3); a greedy pick differs from mlxlab's only where mlxlab's top two are
    closer than that arithmetic moves the row; and mlxlab's reading sits far closer than the
    float model does (measured mean gaps 0.25 and 0.29 against 1.8 and 2.3; the MoE decoders
    0.04-0.68 against 0.25-4.6, LFM2 0.28 against 3.0)."""
    from safetensors.numpy import load_file

    from kquant_fixtures import tiny_folder
    from mlxlab.export.gguf_readback import read_written_gguf

    folder = tiny_folder(case, tmp_path)
    report = write_gguf(folder, tmp_path / "q4.gguf", "q4_k_m", name="tiny")
    assert {"Q4_K", "Q6_K"} <= set(report["tensor_types"]), report["tensor_types"]
    ids = np.array([IDS])
    back = read_written_gguf(tmp_path / "q4.gguf", folder, tmp_path / "back")
    source, stored = (load_file(str(f / "model.safetensors")) for f in (folder, tmp_path / "back"))
    assert source.keys() == stored.keys()
    for name, w in source.items():
        assert np.abs(stored[name] - w).max() <= 0.1 * np.abs(w).max(), name
    ours = log_softmax(mlx_logits(back, ids)[0])
    float_ = log_softmax(mlx_logits(_mlxlab_model(folder), ids)[0])
    write_gguf(tmp_path / "back", tmp_path / "values.gguf", "f32", name="tiny")
    exact = dict(llama_cpp_steps(tmp_path / "values.gguf", IDS))
    assert max(abs(p - ours[end - 1, i]) for end, step in exact.items()
               for i, p in _listed(step).items()) < 1e-3
    steps = llama_cpp_steps(tmp_path / "q4.gguf", IDS)
    assert len(steps) >= len(IDS) // 2, steps
    to_file, to_float = [], []
    for end, step in steps:
        f32 = _listed(exact[end]) if end in exact else {}  # (a pick ending mid-character: none)
        own = max(abs(p - f32.get(i, ours[end - 1, i]))
                  for i, p in _listed(step).items())  # llama.cpp: K-quant against F32
        gaps = [abs(p - ours[end - 1, i]) for i, p in _listed(step).items()]
        assert max(gaps) <= own + 1e-3, (end, max(gaps), own)
        top = np.sort(ours[end - 1])
        if step["id"] != int(ours[end - 1].argmax()):
            assert top[-1] - top[-2] <= 2 * own, (end, top[-1] - top[-2], own)
        to_file += gaps
        to_float += [abs(p - float_[end - 1, i]) for i, p in _listed(step).items()]
    assert np.mean(to_file) < 0.25 * np.mean(to_float), (np.mean(to_file), np.mean(to_float))


@pytest.mark.parametrize("name, shape, expect", [
    ("backbone.layers.0.mixer.extra.weight", (4, 64), "no llama.cpp name"),
    ("backbone.layers.1.mixer.in_proj.weight", (290, 64),
     "has 290 rows; a Mamba-2 in_proj of this config has 296 (z, x, B, C, dt): not written to "
     "GGUF; use --format hf or mlx-lm"),
])
def test_a_tensor_that_does_not_map_is_refused_by_name(name, shape, expect, folders, tmp_path,
                                                       capsys):
    folder = _edited_copy(folders("mamba2"), tmp_path / "m",
                          extra={name: np.zeros(shape, np.float32)})
    line = _refusal(folder, tmp_path, capsys)
    assert f"tensor {name}" in line and expect in line, line


def test_a_hybrid_family_llama_cpp_has_no_architecture_for_is_named(tmp_path, capsys):
    """OLMo-Hybrid: llama.cpp has no architecture for it (its gguf package lists none)."""
    import gguf

    assert "OLMO_HYBRID" not in gguf.MODEL_ARCH.__members__
    line = _refusal(save_tiny_hybrid("olmo_hybrid", tmp_path / "olmo_hybrid"), tmp_path, capsys)
    assert "model_type='olmo_hybrid': llama.cpp has no architecture for OLMo-Hybrid" in line
    assert "--format hf or mlx-lm" in line, line


def test_a_kimi_linear_config_in_the_hubs_keys_is_written_alike(folders):
    """The hub's config.json keeps the delta layers' settings under linear_attn_config (layers
    1-indexed) and the dense layers as first_k_dense_replace: the same keys are written."""
    import gguf

    from mlxlab.export.gguf_kimi import kimi_linear_config, kimi_linear_hparams

    ours = json.loads((folders("kimi_linear_mla") / "config.json").read_text())
    drop = ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads",
            "linear_conv_kernel_dim")
    hub = {**{k: v for k, v in ours.items() if k not in drop}, "moe_layer_freq": 1,
           "linear_attn_config": {"full_attn_layers": [2], "kda_layers": [1, 3], "num_heads": 4,
                                  "head_dim": 16, "short_conv_kernel_size": 3}}

    def keys(config: dict) -> dict:
        writer = gguf.GGUFWriter(None, "kimi-linear")
        kimi_linear_hparams(writer, kimi_linear_config(config))
        return {k: v.value for k, v in writer.kv_data[0].items()}

    written = keys(ours)
    assert keys(hub) == written and written["kimi-linear.kda.head_dim"] == 16
    assert kimi_linear_config(hub)["num_key_value_heads"] == [0, 1, 0]

# --- a trained run, through the command line (slow: training and two llama.cpp loads each) -----

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba2", "granitemoehybrid", "nemotron_h_moe", "falcon_h1",
                                  "qwen3_5", "qwen3_next", "kimi_linear"])
def test_a_trained_run_exports_to_f16_and_q8_0_that_llama_cpp_scores_as_mlxlab(kind, folders,
                                                                              tmp_path):
    from test_export_gguf_moe import exported_runs_score_as_mlxlab
    from test_mlx_lm_decoders import train_chat

    folder = folders(kind)
    if kind.startswith("nemotron"):  # the model llama.cpp computes: no time-step clamp
        folder = _unclamped(folder, tmp_path / "unclamped")
    _, run = train_chat(folder, tmp_path)
    exported_runs_score_as_mlxlab(run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba2", "qwen3_next", "qwen3_5", "granitemoehybrid",
                                  "nemotron_h_moe", "kimi_linear"])
def test_a_trained_run_exports_to_q4_k_m_that_llama_cpp_runs(kind, folders, tmp_path):
    """`mlxlab export RUN --format gguf --quant q4_k_m` of a hybrid run (weighted by the run's
    importance matrix: its routed experts, Qwen3.5's modules, the projections the writer splits
    too; judged from its read-back): every matrix of the file has the type the mixture gives it
    in that file, and llama.cpp runs it."""
    from test_mlx_lm_decoders import train_chat

    folder = folders(kind)
    if kind.startswith("nemotron"):  # the model llama.cpp computes: no time-step clamp
        folder = _unclamped(folder, tmp_path / "unclamped")
    _, run = train_chat(folder, tmp_path)
    exported_q4_k_m_runs_in_llama_cpp(run, tmp_path)
