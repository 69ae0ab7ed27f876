"""GGUF export of the MoE and hybrid decoders (Mixtral, Qwen3-MoE, Granite MoE, LFM2,
DeepSeek-V3), proven by llama.cpp itself (the xllamacpp wheel, dev extra).

Each architecture's tiny random folder is written by transformers in the hub's config keys
(scripts/tiny_hf_model.py), loaded by mlx-lm, and written as GGUF by export/gguf.py; llama.cpp
loads the file and, after each prefix of a prompt, picks the next token greedily and lists its
top log-probabilities. The tolerance is derived from the model: how far rounding its weights as
the file stores them (f16, or q8_0 blocks; the routers stay F32 as in the file) moves mlx-lm's
own log-probabilities, the "shift" (for an f32 file, a tenth of the f16 shift: llama.cpp with an
f32 KV cache computes in f32, only the order of sums differs). llama.cpp must pick mlx-lm's
argmax wherever mlx-lm's top two are further apart than twice that row's largest shift, and its
log-probabilities must differ from mlx-lm's on average by at most three times the mean shift over
the same entries: llama.cpp also rounds the activations it multiplies a stored weight with to the
weight's format, about as much again. The mean, not the largest difference: near a tie between
experts a rounding reroutes a token and moves that one position by up to whole units (measured,
a trained run: largest differences 1.26 / 1.74 for mixtral / deepseek_v3 at q8_0, means 1.0e-1
against rounding shifts of 5.1e-2 / 9.1e-2; the ratio of means 1.1-2.0 at q8_0, 1.2-1.4 at f16,
under 0.1 at f32); a wrong layout (experts out of order, gate and up swapped) changes the picks.
The f32 file from a tiny folder runs in the default suite; f16 and q8_0 files from a trained run,
through `mlxlab export`, are slow, and so is its Q4_K_M file (llama-quantize's types:
test_export_gguf_kquants.py), which llama.cpp runs.
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
# DeepSeek-V3 with its group-limited routing on (the hub's: 8 groups, 4 picked; here 2, 1 picked)
TINY = {"deepseek_v3": {"n_routed_experts": 8, "n_group": 2, "topk_group": 1}}
# mlx-lm's names of what the file keeps in F32 at any type: the MoE routers, the conv kernels
F32_KEPT = (".gate.weight", ".router.layer.weight", ".conv.conv.weight", "conv1d.weight")


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
    # one thread: a tiny model gains nothing from two, and on a loaded box ggml's threads wait
    # on each other at every op (16 prefixes: 5 s with two threads at load 11, 0.02 s with one)
    params.cpuparams.n_threads = 1
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


def compare(steps: list[tuple[int, dict]], ours: np.ndarray, shift: np.ndarray) -> tuple:
    """(mean |llama.cpp - ours|, mean shift) over every log-probability llama.cpp listed; its
    pick must be our argmax wherever our top two are further apart than twice the most the
    rounding moves that row's log-probabilities."""
    assert len(steps) >= len(IDS) // 2, f"only {len(steps)} prefixes compared"
    diffs, shifts = [], []
    for end, step in steps:
        row, top = ours[end - 1], np.sort(ours[end - 1])
        if top[-1] - top[-2] > 2 * shift[end - 1].max():
            assert step["id"] == int(row.argmax()), (end, step["id"], int(row.argmax()))
        for t in step["top_logprobs"]:
            diffs.append(abs(t["logprob"] - float(row[t["id"]])))
            shifts.append(float(shift[end - 1, t["id"]]))
    return float(np.mean(diffs)), float(np.mean(shifts))


def rounded_like(model, quant: str) -> None:
    """The model's matrices rounded as a `quant` GGUF stores them: f16, or q8_0 blocks of 32
    along the rows (f16 where a row is not whole blocks), through the gguf package."""
    import gguf
    from mlx.utils import tree_flatten, tree_unflatten

    T = gguf.GGMLQuantizationType
    rounded = []
    for name, w in tree_flatten(model.parameters()):
        if w.ndim < 2 or not mx.issubdtype(w.dtype, mx.floating) or name.endswith(F32_KEPT):
            continue
        a = np.array(w.astype(mx.float32))
        if quant == "q8_0" and a.shape[-1] % 32 == 0:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, T.Q8_0), T.Q8_0)
        else:
            a = a.astype(np.float16).astype(np.float32)
        rounded.append((name, mx.array(a).astype(w.dtype)))
    model.update(tree_unflatten(rounded))


def rounding_shift(load, quant: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(our log-probabilities, how far rounding the weights as a `quant` file stores them moves
    each one; for f32, a tenth of what f16 moves them), from `load()`: a fresh model a call."""
    ours = log_softmax(mlx_logits(load(), ids)[0])
    rounded = load()
    rounded_like(rounded, "f16" if quant == "f32" else quant)
    shift = np.abs(log_softmax(mlx_logits(rounded, ids)[0]) - ours)
    return ours, shift / 10 if quant == "f32" else shift


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root, made = tmp_path_factory.mktemp("gguf-moe"), {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_model(kind, root / kind, chat="chatml", **TINY.get(kind, {}))
        return made[kind]

    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_the_f32_export_with_mlx_lms_probabilities(kind, folders, tmp_path):
    from mlx_lm.utils import load_model

    folder = folders(kind)
    report = write_gguf(folder, tmp_path / "f32.gguf", "f32", name="tiny")
    ours, shift = rounding_shift(lambda: load_model(folder)[0], "f32", np.array([IDS]))
    theirs, allowed = compare(llama_cpp_steps(tmp_path / "f32.gguf", IDS), ours, shift)
    assert theirs <= 3 * allowed, (report["architecture"], theirs, allowed)


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
    from test_mlx_lm_decoders import train_chat

    _, run = train_chat(folders(kind), tmp_path)
    exported_runs_score_as_mlxlab(run, tmp_path)


def exported_runs_score_as_mlxlab(run: Path, tmp_path: Path) -> None:
    """`mlxlab export RUN --format gguf` at f16 and q8_0, each file scored by llama.cpp against
    the run, within three times what the file's rounding moves the run's own
    log-probabilities."""
    from mlxlab.runs import load_run_model

    for quant in ("f16", "q8_0"):
        out = tmp_path / f"{quant}.gguf"
        done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "export", str(run), "--format",
                               "gguf", "--quant", quant, "--out", str(out), "--overwrite"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        ours, shift = rounding_shift(lambda: load_run_model(run)[0], quant, np.array([IDS]))
        theirs, allowed = compare(llama_cpp_steps(out, IDS), ours, shift)
        assert theirs <= 3 * allowed, (quant, theirs, allowed)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_trained_run_exports_to_q4_k_m_that_llama_cpp_runs(kind, folders, tmp_path):
    """`mlxlab export RUN --format gguf --quant q4_k_m` of an MoE or LFM2 run (weighted by the
    run's importance matrix, the routed experts each by its own vector; judged from its
    read-back): every matrix has the type the mixture gives it in that file, and llama.cpp
    runs it."""
    from test_mlx_lm_decoders import train_chat

    _, run = train_chat(folders(kind), tmp_path)
    exported_q4_k_m_runs_in_llama_cpp(run, tmp_path)


def exported_q4_k_m_runs_in_llama_cpp(run: Path, tmp_path: Path) -> None:
    """`mlxlab export RUN --format gguf --quant q4_k_m`: the run's importance matrix weighted
    every tensor llama.cpp quantized but those it names as never weighted, every matrix of the
    file has the type the mixture (gguf_kquants.py) gives it in that file, and llama.cpp runs
    it."""
    import gguf

    from kquant_fixtures import file_types, quantized
    from mlxlab.export.gguf_kquants import FileLayout, Mixture

    out = tmp_path / "q4.gguf"
    done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "export", str(run), "--format",
                           "gguf", "--quant", "q4_k_m", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the run's importance matrix weighted every tensor llama.cpp quantized but those whose
    # input it does not record (test_export_gguf_imatrix.py): the routed experts too
    line = next(x for x in done.stdout.splitlines() if x.startswith("importance matrix on"))
    unweighted = line.partition("; unweighted: ")[2]
    assert all(name.endswith(("token_embd.weight", ".attn_v_b.weight"))
               for name in unweighted.split(", ") if name), line
    reader = gguf.GGUFReader(str(out))
    arch = reader.fields["general.architecture"].contents()
    experts = reader.fields.get(f"{arch}.expert_count")
    mixture = Mixture("q4_k_m", FileLayout(
        tuple(t.name for t in reader.tensors), int(reader.fields[f"{arch}.block_count"].contents()),
        int(experts.contents()) if experts else 0))
    written = quantized(file_types(out))
    assert written == {t.name: mixture.type_of(t.name, int(t.shape[0])).name
                       for t in reader.tensors if t.name in written}
    assert len(llama_cpp_steps(out, IDS)) >= len(IDS) // 2


def test_an_mlx_lm_folder_of_stacked_experts_is_one_line_exit_2(folders, tmp_path, capsys):
    """mlx_lm.convert's folder keeps mlx-lm's own layout (switch_mlp): the Hugging Face folder
    or the run converts, this one is refused by name."""
    from mlx_lm.convert import convert

    from mlxlab.cli.export import main

    mlx_folder, out = tmp_path / "mlx", tmp_path / "x.gguf"
    convert(str(folders("qwen3_moe")), str(mlx_folder))
    capsys.readouterr()
    assert main([str(mlx_folder), "--format", "gguf", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mlx-lm's stacked experts" in lines[0], lines
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
