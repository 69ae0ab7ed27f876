"""What a run says about its device, MLX's CUDA kernel cache, and the compiling first step left out
of the throughput. The GPU-only branches are tested through the same functions with the GPU's facts;
a real run checks the line, the tag and the rate on the CPU."""

from __future__ import annotations

import json
import logging
import tempfile
import time

import mlx.core as mx
import pytest

from conftest import FAST, compose_cfg
from mlxlab.runtime.compute import device
from mlxlab.training.callbacks import ProgressBar
from mlxlab.training.state import LogWindow

EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw\n"


def test_the_cpus_widest_vector_extension_is_named():
    assert device.cpu_isa(EPYC) == "AVX-512"
    assert device.cpu_isa(EPYC.replace(" avx512f avx512bw", "")) == "AVX2"
    assert device.cpu_isa("Features\t: fp asimd evtstrm aes\n") == "NEON"
    assert device.cpu_isa("flags\t: fpu\n") is None


def test_the_cpu_line_names_the_cpu_the_mlx_build_and_the_cpu_parts():
    described = device.describe()
    assert described.backend == "cpu" and described.memory_gib is None
    line = device.device_line(described, ["BLAS OpenBLAS 0.3.33", "fused CPU kernels on"])
    assert line.startswith(f"device: cpu, {mx.device_info()['device_name']} (")
    assert f"MLX {mx.__version__} (mlx-cpu)" in line
    assert line.endswith("BLAS OpenBLAS 0.3.33; fused CPU kernels on")


def test_the_gpu_line_names_the_gpu_its_memory_cuda_and_what_is_off():
    h100 = device.Description(
        backend="cuda", name="NVIDIA H100 80GB HBM3", memory_gib=79.19, architecture="sm_90",
        isa=None, cores=16, mlx="0.32.4 (mlx-cuda-13)", cuda="CUDA 13, driver 580.159.04")
    assert device.device_line(h100, []) == (
        "device: gpu, NVIDIA H100 80GB HBM3 (79.2 GiB, sm_90); MLX 0.32.4 (mlx-cuda-13); "
        "CUDA 13, driver 580.159.04; off on the GPU: MLX's OpenBLAS, the fused CPU kernels")


@pytest.fixture
def no_kernel_cache_variable(monkeypatch, tmp_path):
    """MLX_PTX_CACHE_DIR unset for the test and restored after; MLX's default folder in tmp."""
    monkeypatch.setenv(device.PTX_CACHE_ENV, "x")
    monkeypatch.delenv(device.PTX_CACHE_ENV)
    monkeypatch.setattr(device, "_set_by_us", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path


def test_the_kernel_cache_goes_to_the_project_cache_unless_the_user_named_one(
        no_kernel_cache_variable, monkeypatch):
    import os

    root = no_kernel_cache_variable
    cache = device.use_kernel_cache(root / "cache")
    expected = root / "cache" / "mlx" / mx.__version__ / "ptx"
    assert cache == device.KernelCache(expected, "mlxlab", 0, 0)
    assert os.environ[device.PTX_CACHE_ENV] == str(expected)  # what MLX reads at its first compile
    assert "~3 minutes once (184 s measured on an H100)" in device.compile_notice(cache)
    assert str(expected) in device.compile_notice(cache)
    # a second run in the same process (a sweep's next trial) keeps it, still as mlxlab's choice
    assert device.use_kernel_cache(root / "other").path == expected
    # the user's own folder wins and is left as it is
    monkeypatch.setenv(device.PTX_CACHE_ENV, str(root / "mine"))
    (root / "mine").mkdir()
    (root / "mine" / "kernel.ptx").write_text("x")
    assert device.use_kernel_cache(root / "cache") == device.KernelCache(
        root / "mine", device.PTX_CACHE_ENV, 1, 0)


def test_kernels_in_mlxs_default_folder_are_copied_once_into_the_project_cache(
        no_kernel_cache_variable):
    root = no_kernel_cache_variable
    default = device.mlx_default_kernel_cache()
    assert default == root / "tmp" / "mlx" / mx.__version__ / "ptx"
    default.mkdir(parents=True)
    for name in ("a.ptx", "a.cubin"):
        (default / name).write_text(name)
    cache = device.use_kernel_cache(root / "cache")
    assert (cache.files, cache.copied) == (2, 2)
    assert (cache.path / "a.cubin").read_text() == "a.cubin"


def test_a_compiling_step_is_left_out_of_the_rate():
    one = {"ntokens": mx.array(100.0)}
    window = LogWindow()
    time.sleep(0.2)
    window.add(1.0, one, left_out_s=0.2)  # only a compiling step: its own rate, compile and all
    summary = window.summary("lm", 0.0, 0.0)
    assert 100 / 0.4 < summary["train/tokens_per_sec"] <= 100 / 0.2 and summary["train/loss"] == 1.0
    window = LogWindow()
    time.sleep(0.3)  # the compile: 0.3 s that must not count
    window.add(2.0, one, left_out_s=0.3)
    time.sleep(0.1)
    window.add(4.0, one)
    summary = window.summary("lm", 0.0, 0.0)
    assert summary["train/loss"] == 3.0
    assert 100 / 0.2 < summary["train/tokens_per_sec"] < 100 / 0.1  # ~1000: 100 tokens in ~0.1 s


def test_the_progress_bar_rate_skips_the_compile(capsys):
    bar = ProgressBar()
    bar.on_train_start(20, 0)
    time.sleep(1.5)  # a first step that compiles (184 s on a fresh H100)
    bar.on_compiled(1, 1.5)
    for step in range(1, 21):
        bar.on_step(step, {})
        time.sleep(0.01)
    elapsed = bar.bar.format_dict["elapsed"]
    bar.on_train_end()
    assert elapsed < 1.0, elapsed  # 20 steps of ~10 ms, not 1.5 s + 0.2 s
    assert "1.50s/step" not in capsys.readouterr().err


def test_a_run_says_what_it_runs_on_and_tags_its_compile(tmp_path, caplog):
    from mlxlab.train import train

    cfg = compose_cfg(tmp_path, [*FAST, "tracking=csv"])
    with caplog.at_level(logging.INFO, logger="mlxlab"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("device: ")]
    assert len(lines) == 1 and lines[0].startswith("device: cpu, ")
    assert "BLAS" in lines[0] and "fused CPU kernels" in lines[0] and "heap" in lines[0]
    run_dir = next((tmp_path / "outputs").glob("**/tracking")).parent
    tags = json.loads((run_dir / "tracking" / "tags.json").read_text())
    assert 0 < float(tags["mlxlab.compile_s"]) < 60
