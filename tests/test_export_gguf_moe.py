"""GGUF export of the MoE and hybrid decoders (Mixtral, Qwen3-MoE, Granite MoE, LFM2,
DeepSeek-V3), proven by llama.cpp itself (the xllamacpp wheel, dev extra).

Each architecture's tiny random folder is written by transformers in the hub's config keys
(scripts/tiny_hf_model.py), loaded by mlx-lm, and written as GGUF by export/gguf.py; llama.cpp
loads the file and, after each prefix of a prompt, picks the next token greedily and gives its
top log-probabilities. They must be mlx-lm's: the same pick wherever mlx-lm's top two are not
a near tie, and every log-probability within a tolerance derived from the model itself:

- f32 file: a tenth of what rounding the weights to f16 moves mlx-lm's own log-probabilities
  (llama.cpp with an f32 KV cache computes in f32: only the order of sums differs, well below
  any storage format; a wrong layout moves them by whole units);
- f16 / q8_0 file (slow, a trained run through the command line): three times what rounding the
  weights as the file stores them moves mlx-lm's (llama.cpp also rounds the activations it
  multiplies those weights with, to the same format), plus the f32 tolerance.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import PYTHON
from hf_helpers import mlx_logits, save_tiny_model
from mlxlab.export.gguf import write_gguf

KINDS = ("mixtral", "qwen3_moe", "granitemoe", "lfm2", "deepseek_v3")
IDS = [5, 17, 99, 3, 250, 31, 7, 8, 64, 120, 11, 2, 300, 41, 77, 9]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def llama_cpp_steps(file: Path, ids: list[int], n_probs: int = 8) -> list[tuple[int, dict]]:
    """(prefix length, llama.cpp's greedy pick with its top log-probabilities) after each prefix
    of `ids`; a pick that ends mid-UTF-8 character comes back without log-probabilities and is
    left out."""
    xl = pytest.importorskip("xllamacpp", reason="llama.cpp's prebuilt wheel (dev extra)")
    params = xl.CommonParams()
    params.model.path = str(file)
    params.n_ctx = 64
    params.cpuparams.n_threads = 2
    params.cache_type_k = params.cache_type_v = xl.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.warmup = False
    server, steps = xl.Server(params), []
    for end in range(1, len(ids) + 1):
        answer = server.handle_completions({
            "prompt": ids[:end], "n_predict": 1, "temperature": 0, "n_probs": n_probs,
            "cache_prompt": False})
        logprobs = answer["choices"][0]["logprobs"]
        if logprobs:
            steps.append((end, logprobs["content"][0]))
    del server
    return steps


def worst_difference(steps: list[tuple[int, dict]], ours: np.ndarray, tol: float) -> float:
    """The largest |llama.cpp - ours| over every listed log-probability; llama.cpp's pick must be
    our argmax wherever our top two are further apart than 2 * tol."""
    assert len(steps) >= len(IDS) // 2, f"only {len(steps)} prefixes compared"
    worst = 0.0
    for end, step in steps:
        row = ours[end - 1]
        first, second = np.sort(row)[-1], np.sort(row)[-2]
        if first - second > 2 * tol:
            assert step["id"] == int(row.argmax()), (end, step["id"], int(row.argmax()))
        for t in step["top_logprobs"]:
            worst = max(worst, abs(t["logprob"] - float(row[t["id"]])))
    return worst


def rounded_like(model, quant: str) -> None:
    """The model's matrices rounded as a `quant` GGUF stores them: f16, or q8_0 blocks of 32
    along the rows (f16 where a row is not whole blocks), through the gguf package."""
    import gguf
    from mlx.utils import tree_flatten, tree_unflatten

    T = gguf.GGMLQuantizationType
    rounded = []
    for name, w in tree_flatten(model.parameters()):
        if w.ndim < 2 or not mx.issubdtype(w.dtype, mx.floating):
            continue
        a = np.array(w.astype(mx.float32))
        if quant == "q8_0" and a.shape[-1] % 32 == 0:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, T.Q8_0), T.Q8_0)
        else:
            a = a.astype(np.float16).astype(np.float32)
        rounded.append((name, mx.array(a).astype(w.dtype)))
    model.update(tree_unflatten(rounded))


def derived_tolerance(load, quant: str, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """(our log-probabilities, the tolerance for a `quant` file), from `load()` (a fresh model
    each call): see the module docstring."""
    ours = log_softmax(mlx_logits(load(), ids)[0])
    f16 = load()
    rounded_like(f16, "f16")
    f32_tol = float(np.abs(log_softmax(mlx_logits(f16, ids)[0]) - ours).max()) / 10
    if quant == "f32":
        return ours, f32_tol
    stored = load()
    rounded_like(stored, quant)
    return ours, 3 * float(np.abs(log_softmax(mlx_logits(stored, ids)[0]) - ours).max()) + f32_tol


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root, made = tmp_path_factory.mktemp("gguf-moe"), {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, root / kind, chat="chatml")
        return made[kind]

    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_the_f32_export_with_mlx_lms_probabilities(kind, folders, tmp_path):
    from mlx_lm.utils import load_model

    folder = folders(kind)
    report = write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    ours, tol = derived_tolerance(lambda: load_model(folder)[0], "f32", np.array([IDS]))
    worst = worst_difference(llama_cpp_steps(tmp_path / "f32.gguf", IDS), ours, tol)
    assert worst <= tol, (report["architecture"], worst, tol)


@pytest.mark.parametrize("kind, change, expect", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=false"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "dense layers"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "not sigmoid-scored"),
    ("lfm2", {"conv_bias": True}, "convolution biases"),
])
def test_a_setting_llama_cpp_does_not_compute_is_one_line_exit_2(kind, change, expect, folders,
                                                                 tmp_path, capsys):
    from mlxlab.cli.export import main

    source, other = folders(kind), tmp_path / kind
    other.mkdir()
    for f in source.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "x.gguf"
    capsys.readouterr()  # transformers' progress bars while the folder was written
    assert main([str(other), "--format", "gguf", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "--format hf or mlx-lm" in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


# --- a trained run, through the command line (slow: training and four llama.cpp loads) ---------

@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_run_exports_to_f16_and_q8_0_that_llama_cpp_scores_as_mlxlab(kind, folders,
                                                                              tmp_path):
    from mlxlab.runs import load_run_model
    from test_mlx_lm_decoders import train_chat

    _, run = train_chat(folders(kind), tmp_path)
    ids = np.array([IDS])
    for quant in ("f16", "q8_0"):
        out = tmp_path / f"{quant}.gguf"
        done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "export", str(run), "--format",
                               "gguf", "--quant", quant, "--out", str(out), "--overwrite"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ours, tol = derived_tolerance(lambda: load_run_model(run)[0], quant, ids)
        worst = worst_difference(llama_cpp_steps(out, IDS), ours, tol)
        assert worst <= tol, (quant, worst, tol)
