"""Export is right or refused, per architecture: each `--format hf` export is loaded in
transformers where it is made and refused unless it gives the fine-tune's logits
(export/proof.py).

Every model_type in `TESTED` is trained here (LoRA, 3 steps, from a tiny random folder that
transformers writes) and exported both ways: the check passes and is recorded (gap, probe,
transformers' version) in the report and the model card; transformers loads `--format hf` with
no missing or unexpected tensor and mlxlab's logits to 1e-4, and mlx-lm loads `--format mlx-lm`
with them too. The list is the parametrization, so an entry without a tiny model and this proof
fails here. A type on no list (Qwen2-MoE) exports, checked; OLMo 3, whose forward differs between
mlx-lm and transformers, is refused with the measured gap; a written weight broken on purpose is
refused by the check; without PyTorch a tested type is written unchecked and an untested one
refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import mlx_logits, save_tiny_model, tiny, torch_logits
from mlxlab.export import export_run
from mlxlab.export.architectures import TESTED
from mlxlab.export.proof import TOLERANCE
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.runs import load_run_model
from test_mlx_lm_decoders import ARCHS, IDS, train_chat


# The types test_mlx_lm_decoders.py trains and loads in transformers in the default run take
# their mlx-lm half here with -m slow; the others are proven here in the default run (3-7 s each
# on a loaded 2-core box).
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in ARCHS else k
                                  for k in TESTED])
def test_each_exportable_architecture_loads_in_transformers_and_mlx_lm(kind, tmp_path):
    import mlx_lm
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(kind, tmp_path / f"tiny-{kind}", chat=ARCHS.get(kind, "chatml"))
    _, run = train_chat(folder, tmp_path)
    model, _ = load_run_model(run)
    assert isinstance(model, MLXLMDecoder) and model.architecture["model_type"] == kind
    ours = mlx_logits(model, IDS)
    base = mlx_logits(MLXLMDecoder(vocab_size=1, pretrained=str(folder)), IDS)
    assert np.abs(base - ours).max() > 1e-3  # the adapters changed the model

    report = export_run(run, tmp_path / "hf", "hf", "float32")
    check = report["check"]
    assert check["status"] == "checked" and check["tolerance"] == TOLERANCE
    assert check["max_abs_logit_gap"] <= 1e-5 * check["logit_scale"]  # measured: <= 2e-6
    assert check["checker"].startswith("transformers ") and np.shape(check["probe"]) == (2, 16)
    assert json.loads((tmp_path / "hf" / "export_report.json").read_text())["check"] == check
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Export check" in card and f"{check['max_abs_logit_gap']:.3g}" in card
    assert check["checker"] in card and str(check["probe"][1]) in card
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(torch_logits(hf.eval(), IDS) - ours).max() <= 1e-4
    # the tensor names are the checkpoint's own: what transformers wrote for the base model
    from safetensors import safe_open

    def names(path: Path) -> set[str]:
        with safe_open(str(path / "model.safetensors"), "np") as f:
            return set(f.keys())

    assert names(tmp_path / "hf") == names(folder)

    export_run(run, tmp_path / "mlx", "mlx-lm", "float32")
    theirs, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert np.abs(np.array(theirs(mx.array(IDS))) - ours).max() <= 1e-4


def save_tiny_qwen2_moe(path: Path) -> Path:
    """A Qwen2-MoE (shared expert and its gate beside the routed ones): an architecture mlx-lm
    loads and mlxlab trains whose export no test proves."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig

    tok = tiny.tiny_tokenizer("qwen2", chat="chatml")
    config = Qwen2MoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        max_position_embeddings=256, eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    file = path / "config.json"
    file.write_text(json.dumps(tiny.hub_config(json.loads(file.read_text()))))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                            chat_template=tiny.CHATML).save_pretrained(path)
    return path


def test_a_type_on_no_list_exports_checked(tmp_path):
    from transformers import AutoModelForCausalLM

    assert "qwen2_moe" not in TESTED  # else pick another type no test lists
    _, run = train_chat(save_tiny_qwen2_moe(tmp_path / "tiny-qwen2_moe"), tmp_path)
    report = export_run(run, tmp_path / "hf", "hf", "float32")
    assert report["check"]["max_abs_logit_gap"] <= report["check"]["allowed_gap"]
    model, _ = load_run_model(run)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert np.abs(torch_logits(hf, IDS) - mlx_logits(model, IDS)).max() <= 1e-4


def tiny_run(kind: str, tmp_path_factory) -> Path:
    """A LoRA fine-tune (3 steps) of the tiny random `kind`."""
    root = tmp_path_factory.mktemp(kind)
    return train_chat(save_tiny_model(kind, root / f"tiny-{kind}", chat="chatml"), root)[1]


@pytest.fixture(scope="module")
def olmo3_run(tmp_path_factory) -> Path:
    return tiny_run("olmo3", tmp_path_factory)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_olmo3_is_refused_with_the_measured_gap(fmt, olmo3_run, tmp_path, capsys):
    """mlx-lm's OLMo 3 and transformers' compute other logits from the same weights (0.38 measured
    on the untrained base model; these random weights: about 4): refused in one line naming the gap,
    exit 2, nothing written."""
    from mlxlab.cli.export import main

    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    capsys.readouterr()  # transformers' progress bars while the folder was written
    assert main([str(olmo3_run), "--format", fmt, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refused: transformers" in lines[0], lines
    found = re.search(r"max gap ([0-9.e+-]+) > ([0-9.e+-]+) \(0.001 of the logits' scale "
                      r"([0-9.e+-]+)\)", lines[0])
    gap, allowed, scale = (float(v) for v in found.groups())
    assert gap > 0.1 * scale and allowed == pytest.approx(1e-3 * scale, rel=1e-2)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_olmo3_stays_usable_as_mlx_lm(olmo3_run, tmp_path):
    """--format mlx-lm is mlx-lm's own layout: mlx-lm loads it with mlxlab's logits."""
    import mlx_lm

    model, _ = load_run_model(olmo3_run)
    export_run(olmo3_run, tmp_path / "mlx", "mlx-lm", "float32")
    theirs, _ = mlx_lm.load(str(tmp_path / "mlx"))
    assert np.abs(np.array(theirs(mx.array(IDS))) - mlx_logits(model, IDS)).max() <= 1e-4


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> Path:
    return tiny_run("llama", tmp_path_factory)


@pytest.mark.parametrize("broken", ["swapped", "dropped"])
def test_a_broken_weight_is_refused_by_the_check(broken, llama_run, tmp_path, monkeypatch):
    """The writer saves the weights, then the file is broken: one layer's q_proj with two heads
    swapped (what a wrong permutation of a layout does), or one tensor left out (what a name
    transformers does not read does). The check, which reads the written file, refuses the
    export and nothing is left at --out."""
    import mlxlab.export as export
    import mlxlab.export.writers as writers

    real = writers.save_weights
    name = "model.layers.1.self_attn.q_proj.weight"

    def break_file(weights, out, fmt):
        real(weights, out, fmt)
        file = out / "model.safetensors"
        tensors = mx.load(str(file))
        if broken == "swapped":
            q = tensors[name]
            tensors[name] = mx.concatenate([q[16:32], q[:16], q[32:]])  # heads 0, 1: 16 rows
        else:
            del tensors[name]
        mx.save_safetensors(str(file), tensors, metadata={"format": fmt})

    monkeypatch.setattr(writers, "save_weights", break_file)
    expect = (r"^refused: .*max gap [0-9.e+-]+ > [0-9.e+-]+ \(0.001 of the logits' scale"
              if broken == "swapped" else
              rf"^refused: transformers found no tensor for 1 weight\(s\) .*\(e.g. {name}\)")
    with pytest.raises(export.ExportError, match=expect):
        export_run(llama_run, tmp_path / "hf", "hf", "float32")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


# `mlxlab export` in a Python that cannot see PyTorch, as on a machine without it: the import
# system's path finder finds neither its module nor its distribution (scipy, transformers and
# mlx-lm then take their no-torch paths, as they would there)
WITHOUT_TORCH = """
import importlib.machinery as machinery
import sys


class NoTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] == "torch":
            return None
        return machinery.PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        return (d for d in machinery.PathFinder.find_distributions(*args, **kwargs)
                if d.metadata["Name"] != "torch")

    @staticmethod
    def invalidate_caches():
        machinery.PathFinder.invalidate_caches()


sys.meta_path = [NoTorch if f is machinery.PathFinder else f for f in sys.meta_path]
from mlxlab.cli.export import main

sys.exit(main(sys.argv[1:]))
"""


def test_without_pytorch_a_tested_type_is_written_unchecked_and_others_refused(
        llama_run, olmo3_run, tmp_path):
    import subprocess

    from conftest import PYTHON

    def export(run: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-c", WITHOUT_TORCH, str(run), "--out", str(out), *flags],
                              capture_output=True, text=True)

    done = export(llama_run, tmp_path / "llama")
    assert done.returncode == 0, done.stderr
    assert "unchecked: PyTorch is not installed" in done.stdout
    card = (tmp_path / "llama" / "README.md").read_text()
    assert "## Export check" in card and "Unchecked: PyTorch is not installed" in card
    assert "model_type='llama' is one mlxlab's tests export and check" in card

    done = export(olmo3_run, tmp_path / "olmo3")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "model_type='olmo3'" in line and "pip install torch, or pass --no-check" in line
    assert not (tmp_path / "olmo3").exists()



def test_no_check_writes_what_the_check_refuses_and_says_so(olmo3_run, tmp_path):
    from mlxlab.export import ExportError

    report = export_run(olmo3_run, tmp_path / "olmo3", "hf", "float32", check=False)
    assert report["check"] == {"status": "unchecked",
                               "why": "written with --no-check, not loaded in transformers"}
    assert "Unchecked: written with --no-check" in (tmp_path / "olmo3" / "README.md").read_text()
    with pytest.raises(ExportError, match="--no-check is for --format hf, peft and gguf"):
        export_run(olmo3_run, tmp_path / "mlx", "mlx-lm", check=False)  # nothing it would skip
