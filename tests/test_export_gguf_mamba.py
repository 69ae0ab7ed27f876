"""GGUF export of the Mamba-2 families (Mamba-2, Granite 4 hybrids with and without experts,
Nemotron-H with and without experts, Falcon-H1) and of the gated delta ones (Qwen3.5's text model,
Qwen3-Next), proven by llama.cpp itself (the xllamacpp wheel, dev extra).

Each family's tiny random folder is written by transformers (tests/hybrid_families.py: every
parameter drawn off its initial value, A_log, D, dt_bias and the grouped norm included; Nemotron-H
with two mixer groups), loaded by mlxlab (mlx-lm), and written as an F32 GGUF by export/gguf.py;
llama.cpp loads the file and, after each prefix of a prompt, picks the next token greedily and lists
its top log-probabilities, held to mlxlab's as test_export_gguf_moe.py holds the MoE families (its
pick is mlxlab's argmax, its log-probabilities within three times the rounding shift). Measured,
largest |llama.cpp - mlxlab| over the listed log-probabilities: mamba2 2.9e-6, granitemoehybrid
2.4e-6 (without experts 2.4e-6 too), Falcon-H1 2.9e-6 (its multipliers folded into the weights),
Qwen3.5 2.5e-5, Qwen3-Next 4.3e-6, Nemotron-H 4.8e-6 (dense) and 6.7e-6 (experts), these two against
the model without transformers' time-step clamp, which llama.cpp does not apply (with it: 2.5e-3 and
3.8e-3, the same picks). A wrong layout (A_log not negated and exponentiated, the norm not split per
group, gate and up swapped, Qwen3.5's value heads left grouped or its rotary pairs not all rotating,
Qwen3-Next's v and z swapped) changes the picks. What llama.cpp's graphs do not compute is one line,
exit 2, naming the setting or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import mlx_logits
from hybrid_families import save_tiny_hybrid
from mlxlab.export.gguf import write_gguf
from test_export_gguf_moe import IDS, compare, llama_cpp_steps, log_softmax, rounding_shift

KINDS = ("mamba2", "granitemoehybrid", "granitemoehybrid_dense", "nemotron_h_dense",
         "nemotron_h_moe", "falcon_h1", "qwen3_5", "qwen3_next")
ARCH = {"mamba2": "mamba2", "granitemoehybrid": "granitehybrid",
        "granitemoehybrid_dense": "granitehybrid", "nemotron_h_dense": "nemotron_h",
        "nemotron_h_moe": "nemotron_h_moe", "falcon_h1": "falcon-h1", "qwen3_5": "qwen35",
        "qwen3_next": "qwen3next"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root, made = tmp_path_factory.mktemp("gguf-mamba"), {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_hybrid(kind, root / kind)
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
    clamp (_unclamped); a dense Granite hybrid's with intermediate_size set to its MLP's width
    (shared_intermediate_size), the one mlx-lm builds its dense MLP with (transformers builds
    it from shared_intermediate_size and leaves intermediate_size, the experts' width, unused:
    the tiny folder keeps them apart, 96 and 32, so the file must say 32)."""
    if kind.startswith("nemotron"):
        return _unclamped(folder, to)
    if kind == "granitemoehybrid_dense":
        shared = json.loads((folder / "config.json").read_text())["shared_intermediate_size"]
        return _edited_copy(folder, to, {"intermediate_size": shared})
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


def test_a_k_quant_of_a_mixer_family_names_what_it_lays_out_otherwise(folders, tmp_path):
    from mlxlab.export.gguf import GGUFExportError

    with pytest.raises(GGUFExportError, match="mamba2 lays out its mixer tensors otherwise"):
        write_gguf(folders("mamba2"), tmp_path / "k.gguf", "q4_k_m")
    assert not list(tmp_path.iterdir())


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


@pytest.mark.parametrize("kind, expect", [
    ("kimi_linear", "model_type='kimi_linear' has no GGUF export here"),
    ("olmo_hybrid", "model_type='olmo_hybrid': llama.cpp has no architecture for OLMo-Hybrid"),
])
def test_a_hybrid_family_without_a_gguf_layout_here_is_named(kind, expect, tmp_path, capsys):
    """Kimi-Linear: llama.cpp runs it, mlxlab does not write it; OLMo-Hybrid: llama.cpp has no
    architecture for it (its gguf package lists none)."""
    import gguf

    assert "OLMO_HYBRID" not in gguf.MODEL_ARCH.__members__
    line = _refusal(save_tiny_hybrid(kind, tmp_path / kind), tmp_path, capsys)
    assert expect in line and "--format hf or mlx-lm" in line, line


# --- a trained run, through the command line (slow: training and two llama.cpp loads each) -----

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba2", "granitemoehybrid", "nemotron_h_moe", "falcon_h1",
                                  "qwen3_5", "qwen3_next"])
def test_a_trained_run_exports_to_f16_and_q8_0_that_llama_cpp_scores_as_mlxlab(kind, folders,
                                                                              tmp_path):
    from test_export_gguf_moe import exported_runs_score_as_mlxlab
    from test_mlx_lm_decoders import train_chat

    folder = folders(kind)
    if kind.startswith("nemotron"):  # the model llama.cpp computes: no time-step clamp
        folder = _unclamped(folder, tmp_path / "unclamped")
    _, run = train_chat(folder, tmp_path)
    exported_runs_score_as_mlxlab(run, tmp_path)
