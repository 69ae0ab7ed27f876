"""Shared fixtures: compose the real config with Hydra's compose API, rooted in a temp folder."""

from __future__ import annotations

import math
import os

# Tests start subprocesses next to the main process on small CI machines: one BLAS thread each
# avoids oversubscribing the cores (set before mlxlab loads OpenBLAS; inherited by subprocesses).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import sys
import tempfile
import time
import urllib.request

# The user-level cache (the migrated empty MLflow store new stores are copied from) is one
# folder per test session, not the developer's ~/.cache; subprocesses inherit it.
os.environ.setdefault("MLXLAB_CACHE_DIR", tempfile.mkdtemp(prefix="mlxlab-test-cache-"))
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from mlxlab.config import compose_config
from mlxlab.runtime import settings

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The installed console script, as a user runs it (`pip install -e .` puts it beside python).
MLXLAB = str(Path(PYTHON).parent / "mlxlab")

# Where MLX computes. On the CPU a resumed or repeated run is bitwise the same; on a GPU MLX's
# kernels are not reproducible to the bit (the same seeded config differed at the 4th decimal of
# val/loss in two processes on an H100: docs/benchmarks.md, GPU), so the tests that compare runs
# compare to GPU_RTOL there (`pytest -m gpu` on the GPU machine reports how far apart they are,
# tests/test_gpu.py).
ON_GPU = mx.default_device().type == mx.DeviceType.gpu
GPU_RTOL, GPU_ATOL = 1e-3, 1e-5


def same_array(a, b) -> bool:
    """Bitwise on the CPU; to GPU_RTOL on a GPU."""
    a, b = np.asarray(a), np.asarray(b)
    if not ON_GPU:
        return np.array_equal(a, b)
    return a.shape == b.shape and np.allclose(a, b, rtol=GPU_RTOL, atol=GPU_ATOL, equal_nan=True)


def same_values(a, b) -> bool:
    """Nested lists / tuples / dicts of numbers: equal (NaN equal to NaN) on the CPU, to GPU_RTOL
    on a GPU; anything else must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float | int) or isinstance(b, float) and isinstance(a, int):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if not ON_GPU else math.isclose(a, b, rel_tol=GPU_RTOL, abs_tol=GPU_ATOL)
    return a == b


# Small, fast settings for end-to-end runs of the real default config.
FAST = [
    "trainer.max_epochs=1",
    "trainer.max_steps=4",
    "trainer.eval_every_steps=4",
    "trainer.log_every_steps=1",
    "trainer.schedule.warmup_steps=0",
    "callbacks.progress.enabled=false",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
]


def compose_cfg(root: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    cfg = compose_config(root, overrides)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(root / "cache")
    return cfg


def config_refusal(root: Path, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The ConfigError line config.validate gives the composed overrides (None: it passes);
    nothing is left under `root`'s outputs/ either way."""
    from mlxlab.config import validate
    from mlxlab.errors import ConfigError

    cfg = compose_cfg(root, overrides)
    try:
        validate(cfg)
    except ConfigError as err:
        return str(err)
    finally:
        GlobalHydra.instance().clear()
        assert not (root / "outputs").exists()
    return None


@pytest.fixture(autouse=True)
def fresh_settings():
    """Each test starts from mlxlab's variables as the environment holds them now (read once per
    process otherwise: runtime/settings.py); a test that changes one calls settings.reload()."""
    settings.reload()


@pytest.fixture(autouse=True)
def isolated_tracking_uri(monkeypatch):
    """Each test names its own store; none inherits MLFLOW_TRACKING_URI from the shell or another
    test (mlflow.set_tracking_uri also sets that variable)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def fused_kernels_on():
    """The fused CPU kernels on for the test (a build failure fails, not skips, on a platform the
    kernels support; elsewhere the test is skipped), the mode restored after."""
    from mlxlab import kernels
    from mlxlab.kernels import build

    reason = build.unsupported_reason()
    if reason:
        pytest.skip(f"fused kernels not built here: {reason}")
    before = kernels.mode()
    kernels.set_mode("on")
    yield
    kernels.set_mode(before)


@pytest.fixture
def kernel_mode():
    """kernels.set_mode, for the test to pick the fused kernels' mode; the mode restored after."""
    from mlxlab import kernels

    before = kernels.mode()
    yield kernels.set_mode
    kernels.set_mode(before)


@pytest.fixture
def make_cfg(tmp_path: Path):
    def make(*overrides: str) -> DictConfig:
        return compose_cfg(tmp_path, overrides)

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocess runs of mlxlab-train, rooted in tmp_path."""
    env = dict(os.environ)
    env["MLXLAB_ROOT"] = str(tmp_path)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_server(server, uri: str, log: Path, timeout_s: float = 180) -> None:
    """Return once the mlflow server at `uri` answers /health; fail with its log if it exits or
    does not answer within `timeout_s` (a fresh server builds its store on the first request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except OSError:
            assert server.poll() is None, Path(log).read_text()[-3000:]
            assert time.monotonic() < deadline, f"mlflow server did not start in {timeout_s:.0f} s"
            time.sleep(0.5)


def mlxlab(*args: str, env: dict | None = None, timeout: float = 300):
    """`mlxlab ARGS...` as a user runs it: the installed console script in a subprocess."""
    import subprocess

    return subprocess.run([MLXLAB, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# Long enough to learn more than the majority class, so accuracy checks have teeth (corrected
# Adam: 1e-3 stays on the majority class).
CLASSIFIER_RUN = [*FAST, "trainer.max_epochs=5", "trainer.max_steps=100",
                  "trainer.eval_every_steps=100", "optimizer.learning_rate=3e-3"]

LM_RUN = [
    "experiment=tinystories_nano", "tracking=none", "callbacks.progress.enabled=false",
    "model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.max_seq_len=64",
    "data.packing.seq_len=64", "data.tokenizer.max_vocab=512", "data.tokenizer_sample=300",
    "data.splits.val_examples=20", "trainer.batch_size=8", "trainer.max_steps=30",
    "trainer.eval_every_steps=15", "trainer.schedule.warmup_steps=3",
]


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory):
    """One tiny finished Titanic run shared by the predict/eval/runs/register tests: (run dir,
    its best val metrics, its data rows, its MLflow store URI). Its training CSV is deleted
    after training: using the run needs only the run folder."""
    import shutil

    import pandas as pd

    from mlxlab.config import asset_path
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("classifier")
    train_csv = Path(shutil.copy(asset_path("titanic/train.csv"), root / "train.csv"))
    titanic = pd.read_csv(train_csv)
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    cfg = compose_cfg(root, [*CLASSIFIER_RUN, f"data.path={train_csv}", f"tracking.uri={uri}",
                             "trainer.quantize_bits=4"])  # + checkpoints/quantized
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    train_csv.unlink()
    return Path(cfg.paths.output_dir), metrics, titanic, uri


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory):
    """A finished tiny language-model run on short documents (first sentences of the shipped
    TinyStories sample), so the model learns to end texts with <|endoftext|> within a few
    steps: (run dir, its best val metrics, the corpus documents; the first 20 are its
    validation documents)."""
    from mlxlab.config import asset_path
    from mlxlab.train import train

    root = tmp_path_factory.mktemp("lm")
    stories = Path(asset_path("tinystories/sample.txt")).read_text().split("\n\n")
    firsts = [s.strip().split(". ")[0] + "." for s in stories[:800] if s.strip()]
    corpus = root / "first_sentences.txt"
    corpus.write_text("\n\n".join(firsts))
    cfg = compose_cfg(root, [*LM_RUN, f"data.source.data_files={corpus}"])
    metrics = train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir), metrics, firsts


@pytest.fixture(scope="session", autouse=True)
def fused_kernels_built():
    """Build mlxlab's fused CPU kernels before the first test (a fresh machine compiles them
    once, ~1-2 min), so no subprocess test's timeout pays for it; later runs load the cache."""
    from mlxlab import kernels

    kernels.status()


# Cases slow or flaky enough for the default run's 10-minute budget that only a parameter of
# theirs can say so. The GCS emulator restarted on its port right after a SIGKILL sometimes comes
# back unable to read its own state file (JSONDecodeError) and serves nothing: the outage test
# then waits out its 2-minute backoff (125 s, failed, in one default run). The outage tests of
# all three clouds run with -m slow; S3's upload/resume case stays in the default run.
# Azure's cases are the slowest of the three clouds (Azurite's start-up ~15 s, its outage test
# ~15 s) and run the same upload/resume code as S3's, which stay: they run with -m slow.
# GCS's upload/resume case repeats S3's code path, and the two-rank BERT case without ZeRO-1 is
# the one with it minus the sharded optimizer (same launch, same gradient all-reduce), at ~15 s
# each: the default run keeps S3 and ZeRO-1, -m slow runs all of them.
SLOW_CASES = ("tests/test_remote.py::test_server_stopped_mid_upload[gcs]",
              "tests/test_remote.py::test_server_stopped_mid_upload[azure]",
              "tests/test_remote.py::test_upload_then_resume_from_the_bucket_is_bitwise_identical[gcs]",
              "tests/test_remote.py::test_upload_then_resume_from_the_bucket_is_bitwise_identical[azure]",
              # each beside a faster sibling of the same path in the default run (8-22 s each)
              "tests/test_resume.py::test_sigkills_keep_weights_and_history_exact[titanic-args0-5]",
              "tests/test_failures.py::test_an_out_of_memory_ends_the_run_with_one_line_though_its_cleanup_hangs",
              "tests/test_memory_limits.py::test_mlxlabs_loads_start_no_thread_under_a_tight_limit",
              "tests/test_real_model.py::test_two_lora_steps_on_its_4bit_base",
              "tests/test_out_of_memory.py::test_a_run_restarted_before_its_first_checkpoint_stays_one_mlflow_run",
              "tests/test_kto.py::test_kto_on_other_data_or_one_row_a_batch_is_one_line_before_anything_is_made",
              "tests/test_export_architectures.py::test_without_pytorch_a_tested_type_is_written_unchecked_and_others_refused",
              "tests/test_blas.py::test_a_kernel_verdict_taken_on_a_busy_machine_is_the_quiet_one_or_deferred",
              "tests/test_distill_rounds.py::test_rounds_are_child_runs_taught_by_the_previous_students[chain-2]",
              "tests/test_remote.py::test_server_stopped_mid_upload[s3]",
              "tests/test_model_sources.py::test_a_source_that_cannot_be_read_is_one_line_and_creates_nothing",
              "tests/test_generate.py::test_eval_verb_on_the_validation_text_gives_the_runs_val_loss",
              "tests/test_lora_experts.py::test_targets_that_name_experts_and_reach_none_are_one_line_exit_2[targets0-expect0]",
              "tests/test_per_example.py::test_every_example_once_per_epoch_and_the_step_loss_is_their_mean")


# The files that take longest in the default run (their tests' seconds summed, 2 cores), run
# first: `--dist loadfile` hands a worker a whole file, and one of these taken last would leave
# the other worker idle for its length (pyproject's addopts keep this order:
# --no-loadscope-reorder; xdist's own order is by test count, which put these last).
LONGEST_FILES = (
    "test_config.py", "test_preference.py", "test_reward.py", "test_search_faults.py",
    "test_trainer.py", "test_train.py", "test_serve_openai.py", "test_new_user.py", "test_cli.py",
    "test_eval_tasks.py", "test_remote.py", "test_vision.py", "test_tracking_background.py",
    "test_blas.py", "test_adapter_checkpoints.py", "test_lm_eval.py",
    "test_export_architectures.py", "test_grpo_tools.py", "test_resume.py", "test_real_model.py",
    "test_checks_first.py", "test_finetune.py", "test_sharded_training.py",
    "test_mlx_lm_decoders.py", "test_wandb_tracking.py", "test_export_gguf.py", "test_sandbox.py",
    "test_kto.py",
)


def pytest_configure(config) -> None:
    """The package's and the tests' bytecode, written once before the workers start: hundreds of
    test subprocesses import mlxlab, and where PYTHONDONTWRITEBYTECODE is set (or on a fresh
    clone, before the first import writes it) each would compile every module it imports again
    (~0.3-0.8 s of CPU a process). compileall writes whatever that setting says, and skips files
    whose bytecode is current."""
    if not hasattr(config, "workerinput"):  # xdist's controller, or the only process
        import compileall

        for folder in (REPO / "src" / "mlxlab", REPO / "tests"):
            compileall.compile_dir(str(folder), quiet=1)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: files stay whole
    no_gpu = pytest.mark.skip(reason="needs a GPU: MLX's default device here is the CPU")
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(pytest.mark.slow)
        # tests marked `gpu` run where MLX's default device is a GPU, and are skipped elsewhere
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(no_gpu)


# config.json of a tiny Llama (scripts/tiny_hf_model.py's sizes)
TINY_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 160, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1,
}


def cross_encoder_stub(root: Path) -> Path:
    """A folder whose config.json names a BERT sequence classifier (a cross-encoder), without
    weights: for config tests of model=cross_encoder that never build the model."""
    folder = Path(root) / "cross-encoder-stub"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"architectures": ["BertForSequenceClassification"], '
                                        '"model_type": "bert"}')
    return folder


def model_folder_stub(root: Path) -> Path:
    """A folder that passes the checks made before anything is built (config.json of a type
    mlx-lm loads, a weights file by name) without weights to load: for config tests that never
    build the model."""
    import json

    folder = Path(root) / "model-stub"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    (folder / "model.safetensors").touch()
    return folder
