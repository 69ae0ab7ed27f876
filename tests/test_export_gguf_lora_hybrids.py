"""`mlxlab export RUN --format gguf --adapters` on the families whose tensors llama.cpp lays out
otherwise than transformers (export/gguf_lora_regroup.py): Qwen3.5's gated delta layers (value
heads reordered), Mamba-2, Nemotron-H and a dense Granite 4 hybrid (the Mamba-2 mixer's
layout), Falcon-H1 (its multipliers folded into the weights), Qwen3-Next (its fused in_proj_qkvz
split in two), Kimi-Linear's feed-forward layers, and a MoE's attention (Qwen3-MoE).

Each tiny family (tests/hybrid_families.py) is fine-tuned with LoRA on its mixer's projections
and exported with --adapters at f32: llama.cpp itself (the xllamacpp wheel) loads the base with
the adapter and decodes greedily the tokens mlxlab's own generation of the run decodes, and
other tokens than the base alone; base + (alpha / rank) * B @ A is, tensor by tensor, the fused
export's (--format gguf without --adapters), no other tensor moves, and the pair read back from
its files (what judges a quantized pair) gives the run's logits. Without training, the
pairs of random adapters on a folder are the change the base export makes of the folder with
their update added; a step of the layout that is not linear, adapters where llama.cpp's graph
does not apply them, and adapters on the routed experts (test_export_gguf_lora.py REFUSALS) are
one line each."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hf_helpers import save_tiny_model
from hybrid_families import save_tiny_hybrid
from mlxlab.cli.main import main
from test_export_gguf_lora import PROMPTS, llama_cpp_greedy, mlxlab_greedy
from test_export_gguf_mamba import _reference
from test_mlx_lm_decoders import train_chat

TRAIN = ["eval.tasks=[]", "trainer.max_steps=8", "trainer.eval_every_steps=8"]


def _blocks(*pairs: tuple[int, str]) -> set[str]:
    return {f"blk.{i}.{kind}.weight" for i, kinds in pairs for kind in kinds.split()}


# tiny kind -> (model.lora.targets, the llama.cpp tensors the adapter must hold a pair for)
FAMILIES = {
    "qwen3_5": ("in_proj_qkv,in_proj_z,in_proj_a,in_proj_b,out_proj,q_proj,v_proj", _blocks(
        (0, "attn_qkv attn_gate ssm_alpha ssm_beta ssm_out"), (1, "attn_q attn_v"))),
    "mamba2": ("in_proj,out_proj", _blocks((0, "ssm_in ssm_out"), (1, "ssm_in ssm_out"))),
    "nemotron_h_dense": ("in_proj,out_proj,q_proj,o_proj,up_proj,down_proj", _blocks(
        (0, "ssm_in ssm_out"), (1, "attn_q attn_output"), (2, "ffn_up ffn_down"),
        (3, "ssm_in ssm_out"))),
    "falcon_h1": ("in_proj,out_proj,q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj", _blocks(
        *[(i, "ssm_in ssm_out attn_q attn_k attn_v attn_output ffn_gate ffn_down")
          for i in (0, 1)])),
    "granitemoehybrid_dense": ("in_proj,out_proj,k_proj,o_proj,gate_proj,up_proj,down_proj",
                               _blocks((0, "ssm_in ssm_out ffn_gate ffn_up ffn_down"),
                                       (1, "attn_k attn_output ffn_gate ffn_up ffn_down"))),
    "qwen3_next": ("in_proj_qkvz,in_proj_ba,out_proj,q_proj,o_proj", _blocks(
        (0, "attn_qkv attn_gate ssm_ba ssm_out"), (1, "attn_q attn_output"))),
    "kimi_linear": ("mlp.gate_proj,mlp.up_proj,mlp.down_proj,shared_experts.gate_proj,"
                    "shared_experts.up_proj,shared_experts.down_proj", _blocks(
                        (0, "ffn_gate ffn_up ffn_down"),
                        (1, "ffn_gate_shexp ffn_up_shexp ffn_down_shexp"))),
    # a MoE's attention (its experts stacked beside it)
    "qwen3_moe": ("q_proj,k_proj,v_proj,o_proj", _blocks(
        *[(i, "attn_q attn_k attn_v attn_output") for i in (0, 1)])),
}


def _tiny(kind: str, root: Path) -> Path:
    """The tiny folder, as test_export_gguf_mamba.py holds llama.cpp to it (Nemotron-H without
    the time-step clamp llama.cpp does not apply)."""
    if kind == "qwen3_moe":
        return save_tiny_model(kind, root / kind, chat="chatml")
    return _reference(kind, save_tiny_hybrid(kind, root / kind), root / f"{kind}-reference")


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# a training run, two exports and llama.cpp per family (a few seconds each): Mamba-2 in the
# default run, the others with -m slow (Qwen3.5's value-head order is held in the default run by
# the pairs' test below)
@pytest.mark.parametrize("kind", [kind if kind == "mamba2" else
                                  pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in FAMILIES])
def test_llama_cpp_decodes_the_hybrid_fine_tune_from_base_and_adapter(kind, tmp_path):
    pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    import gguf

    targets, expected = FAMILIES[kind]
    folder = _tiny(kind, tmp_path)
    _, run = train_chat(folder, tmp_path / "train", *TRAIN, f"model.lora.targets=[{targets}]")
    out = tmp_path / "out" / "ft.gguf"
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--quant", "f32",
                 "--out", str(out)]) == 0
    base, adapter = out.parent / "ft.base.gguf", out.parent / "ft.lora.gguf"
    prompt_ids, ours = mlxlab_greedy(run, PROMPTS)
    theirs = llama_cpp_greedy(base, adapter, prompt_ids)
    assert theirs == ours
    assert llama_cpp_greedy(base, None, prompt_ids) != theirs  # the adapter is applied

    fused_file = tmp_path / "fused.gguf"
    assert main(["export", str(run), "--format", "gguf", "--quant", "f32",
                 "--out", str(fused_file)]) == 0
    pairs, weights, fused = _tensors(adapter), _tensors(base), _tensors(fused_file)
    fields = gguf.GGUFReader(adapter).fields
    alpha = float(fields["adapter.lora.alpha"].contents())
    adapted = {n.rsplit(".", 1)[0] for n in pairs}
    assert adapted == expected
    for name in adapted:
        a, b = pairs[f"{name}.lora_a"].data, pairs[f"{name}.lora_b"].data
        assert a.shape[0] == b.shape[1] == 8  # the run's rank
        merged = weights[name].data + alpha / 8 * (b @ a)
        assert np.abs(merged - fused[name].data).max() <= 1e-5, name
        assert np.abs(fused[name].data - weights[name].data).max() > 1e-3, name  # trained
    for name in set(weights) - adapted:
        assert np.array_equal(weights[name].data, fused[name].data), name
    _assert_read_back_is_the_run(base, adapter, folder, run, tmp_path / "read-back")


def _assert_read_back_is_the_run(base: Path, adapter: Path, folder: Path, run: Path,
                                 work: Path) -> None:
    """The pair read back from its files (gguf_readback.py: what judges a quantized pair) onto
    the run's base folder gives the run's logits."""
    import mlx.core as mx

    from mlxlab.export.gguf_readback import read_written_gguf
    from mlxlab.runs import load_run_model

    pair = read_written_gguf(base, folder, work, lora=adapter)
    model, _ = load_run_model(run)
    model.eval()
    ids = mx.array([[5, 17, 99, 3, 250, 31, 7, 8]])
    ours, theirs = np.array(model(ids)), np.array(pair(ids))
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()


# tiny kind -> the mlx-lm names of the weights random adapters go on (their transformers names
# drop the `language_model.` mlx-lm's Qwen3.5 keeps its text model under)
RANDOM = {
    "qwen3_5": ("language_model.model.layers.0.linear_attn.in_proj_qkv",
                "language_model.model.layers.0.linear_attn.in_proj_z",
                "language_model.model.layers.0.linear_attn.out_proj"),
    "mamba2": ("backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.out_proj"),
}


def _random_adapters(folder: Path, modules: tuple[str, ...], to: Path, rank: int = 4,
                     scale: float = 2.0) -> dict:
    """An mlx-lm adapter folder of random pairs on `modules` of the transformers `folder`;
    returns each weight's update by its transformers name."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    weights, rng = load_file(str(folder / "model.safetensors")), np.random.default_rng(1)
    adapters, updates = {}, {}
    for module in modules:
        hf = module.removeprefix("language_model.") + ".weight"
        out_dim, in_dim = weights[hf].shape
        a = rng.normal(0, 0.1, (in_dim, rank)).astype(np.float32)
        b = rng.normal(0, 0.1, (rank, out_dim)).astype(np.float32)
        adapters |= {f"{module}.lora_a": mx.array(a), f"{module}.lora_b": mx.array(b)}
        updates[hf] = scale * (a.astype(np.float64) @ b).T
    to.mkdir()
    mx.save_safetensors(str(to / "adapters.safetensors"), adapters)
    (to / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "lora_parameters": {"rank": rank, "scale": scale}}))
    return updates


def _with_updates(folder: Path, updates: dict, to: Path) -> Path:
    """The folder copied with `updates` added to its weights (the fine-tune, fused)."""
    from safetensors.numpy import load_file, save_file

    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(folder / "model.safetensors"))
    for name, update in updates.items():
        weights[name] = (weights[name] + update).astype(np.float32)
    save_file(weights, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


@pytest.mark.parametrize("kind", list(RANDOM))
def test_the_pairs_are_what_the_base_export_makes_of_the_update(kind, tmp_path):
    """Random pairs on a folder's mixer projections: base + (alpha / rank) * B @ A is the
    base export of the folder with their update added (Qwen3.5's value heads reordered in
    attn_qkv, attn_gate and ssm_out's columns), and nothing else moves."""
    from mlxlab.export.gguf import write_gguf
    from mlxlab.export.gguf_lora import write_gguf_lora

    folder = save_tiny_hybrid(kind, tmp_path / kind)
    updates = _random_adapters(folder, RANDOM[kind], tmp_path / "adapters")
    config = json.loads((folder / "config.json").read_text())
    report = write_gguf_lora(tmp_path / "adapters", config, tmp_path / "lora.gguf")
    assert (report["rank"], report["alpha"], report["pairs"]) == (4, 8.0, len(RANDOM[kind]))
    write_gguf(folder, tmp_path / "base.gguf", "f32")
    write_gguf(_with_updates(folder, updates, tmp_path / "fused"), tmp_path / "fused.gguf", "f32")
    pairs, base, fused = (_tensors(tmp_path / f"{n}.gguf") for n in ("lora", "base", "fused"))
    adapted = {n.rsplit(".", 1)[0] for n in pairs}
    assert len(adapted) == len(RANDOM[kind])
    for name in adapted:
        merged = base[name].data + 2.0 * (pairs[f"{name}.lora_b"].data @ pairs[
            f"{name}.lora_a"].data)
        assert np.abs(merged - fused[name].data).max() <= 1e-5, name
    for name in set(base) - adapted:
        assert np.array_equal(base[name].data, fused[name].data), name


def test_a_layout_that_is_not_linear_is_refused_by_name(tmp_path):
    """Were a step of the base export not linear in the weight (here: stored values exp(w)),
    the update it makes would not factor at the adapters' rank: one line naming the tensor."""
    from mlxlab.export.gguf import GGUFExportError, architecture_of
    from mlxlab.export.gguf_lora_regroup import regrouped_pairs
    from mlxlab.export.gguf_regroup import StoredValues

    folder = save_tiny_hybrid("mamba2", tmp_path / "mamba2")
    config = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(0)
    weights = {"backbone.layers.0.mixer.out_proj.lora_a": rng.normal(0, 0.1, (128, 4)),
               "backbone.layers.0.mixer.out_proj.lora_b": rng.normal(0, 0.1, (4, 64))}
    arch = architecture_of(config)
    assert len(regrouped_pairs(weights, 4, 2.0, config, arch)) == 2  # as llama.cpp lays it out
    bent = replace(arch, values=StoredValues(lambda name, w, c: np.exp(w), None))
    with pytest.raises(GGUFExportError, match=r"the adapter backbone\.layers\.0\.mixer\."
                       r"out_proj -> blk\.0\.ssm_out\.weight does not factor at rank 4"):
        regrouped_pairs(weights, 4, 2.0, config, bent)


def test_adapters_where_llama_cpp_does_not_apply_them_are_one_line_and_no_file(tmp_path,
                                                                              capsys):
    """Kimi-Linear's llama.cpp graph multiplies its attention without adapters: a pair there
    would load and change nothing, so it is refused, naming the tensor."""
    folder = save_tiny_hybrid("kimi_linear", tmp_path / "kimi")
    _, run = train_chat(folder, tmp_path / "train", "eval.tasks=[]", "trainer.max_steps=1",
                        "trainer.eval_every_steps=1", "model.lora.targets=[q_proj,mlp.up_proj]")
    out = tmp_path / "out" / "ft.gguf"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--adapters", "--quant", "f32",
                 "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxlab export: error: the adapter on "
                                                   "model.layers.0.self_attn.q_proj lands on "
                                                   "llama.cpp's blk.0.attn_q.weight"), lines
    assert "kimi_linear graph multiplies without adapters" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
