"""model.pretrained as users hold models (src/mlxlab/models/sources/): a hub id from a Hugging Face
cache laid out on disk (HF_HUB_OFFLINE=1: never the network), GGUF files of each architecture
the converter takes (written by llama.cpp's own Python writer, read back by transformers' GGUF
loader as the independent reference), an Ollama store, and sources that cannot be read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from hf_helpers import mlx_logits
from mlxlab.export.gguf import write_gguf
from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder
from mlxlab.models.sources import resolve
from one_process import each_in_one_process
from test_export_gguf import IDS, from_gguf, logits, save_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """A Hugging Face hub cache holding `folder` as repo_id's main revision (the layout
    huggingface_hub writes: refs/main -> commit, snapshots/<commit>/ files)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return root


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    save_tiny("llama", root / "llama")
    return root / "llama"


@pytest.fixture
def offline_hub(tmp_path, tiny_llama, monkeypatch):
    cache = hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    from mlxlab.models import sources

    sources._resolved.clear()
    yield cache
    sources._resolved.clear()


def test_a_hub_id_comes_from_the_cache_offline_with_its_commit(offline_hub, tiny_llama):
    source = resolve("tiny-org/tiny-llama")
    assert source.kind == "hub" and source.folder.name == COMMIT
    assert source.provenance == {"source": "tiny-org/tiny-llama", "kind": "hub",
                                 "repo_id": "tiny-org/tiny-llama", "revision": COMMIT}
    model = MLXLMDecoder(vocab_size=json.loads((tiny_llama / "config.json").read_text())
                         ["vocab_size"], pretrained="tiny-org/tiny-llama")
    folder_model = MLXLMDecoder(vocab_size=model.vocab_size, pretrained=str(tiny_llama))
    assert np.array_equal(mlx_logits(model, IDS), mlx_logits(folder_model, IDS))
    assert resolve("tiny-org/tiny-llama", revision=COMMIT).folder == source.folder


def test_a_hub_id_not_in_the_cache_offline_is_one_line(offline_hub):
    from mlxlab.errors import ConfigError, MissingFileError

    with pytest.raises(MissingFileError, match="not in the Hugging Face cache"):
        resolve("tiny-org/not-downloaded")
    with pytest.raises((MissingFileError, ConfigError), match="tiny-org/tiny-llama"):
        resolve("tiny-org/tiny-llama", revision="f" * 40)


def test_training_from_a_hub_id_records_the_repo_and_commit(offline_hub, make_cfg, tmp_path):
    """A run from `model.pretrained=ORG/NAME` names exactly the weights it trained: the repo id
    and the resolved commit as tags in the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    from mlxlab.train import train

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i}"}]})
        + "\n" for i in range(12)))
    cfg = make_cfg("experiment=finetune_chat", "model.pretrained=tiny-org/tiny-llama",
                   f"data.train_file={chats}", "data.val_fraction=0.25", "trainer.max_steps=2",
                   "trainer.eval_every_steps=2", "trainer.batch_size=4",
                   "callbacks.progress.enabled=false")
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name)
                              .experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlxlab.model.repo_id"] == "tiny-org/tiny-llama"
    assert run.data.tags["mlxlab.model.revision"] == COMMIT


# llama (rows un-interleaved) and Gemma 3 (norms, sliding pattern) in the default run; the
# layouts converted as they are stored run with -m slow
@pytest.mark.parametrize("kind", ["llama", "gemma3_text", *(
    pytest.param(k, marks=pytest.mark.slow) for k in ("qwen2", "qwen3", "phi3"))])
def test_a_gguf_of_each_architecture_loads_with_transformers_logits(kind, tmp_path, monkeypatch):
    """Q8_0 and Q4_1 files of each architecture the converter takes: our logits equal
    transformers' GGUF load of the same file (its dequantized weights in float32)."""
    import test_export_gguf

    # Gemma 3 alternates 5 sliding-window layers and 1 global one (llama.cpp fixes the pattern
    # at 6): a stack of 6 has both kinds
    monkeypatch.setitem(test_export_gguf.EXTRA, "gemma3_text",
                        {**test_export_gguf.EXTRA["gemma3_text"], "num_hidden_layers": 6})
    save_tiny(kind, tmp_path / kind)
    for quant in ("q8_0", "q4_1"):
        file = tmp_path / f"{kind}-{quant}.gguf"
        write_gguf(tmp_path / kind, file, quant, name="tiny")
        reference = logits(from_gguf(file), IDS)
        source = resolve(str(file))
        assert source.kind == "gguf" and len(source.provenance["sha256"]) == 64
        ours = MLXLMDecoder(vocab_size=reference.shape[-1], pretrained=str(file))
        assert ours.quantized, (kind, quant)
        scale = np.abs(reference).max()
        assert np.abs(mlx_logits(ours, IDS) - reference).max() <= 1e-4 * max(scale, 1.0), (kind, quant)


def test_an_ollama_model_is_its_gguf_blob(tmp_path, monkeypatch, tiny_llama):
    store = tmp_path / "ollama"
    gguf = tmp_path / "model.gguf"
    write_gguf(tiny_llama, gguf, "q8_0", name="tiny")
    digest = "sha256:" + "ab" * 32
    (store / "blobs").mkdir(parents=True)
    shutil.copy(gguf, store / "blobs" / digest.replace(":", "-"))
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    source = resolve("ollama:tiny:q8")
    assert source.kind == "ollama" and (source.folder / "model.safetensors").is_file()
    assert source.provenance["sha256"] == resolve(str(gguf)).provenance["sha256"]
    with pytest.raises(FileNotFoundError, match="ollama pull tiny:latest"):
        resolve("ollama:tiny:latest")


def bad_source_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 12)
    return {
        "missing gguf": (["model.pretrained=/nowhere/model.gguf"], "no such GGUF file"),
        "truncated gguf": ([f"model.pretrained={truncated}"], "not a readable GGUF file"),
        "missing path": (["model.pretrained=/nowhere/at/all"], "no such folder or file"),
        "revision on a file": ([f"model.pretrained={truncated}", "model.revision=main"],
                               "drop model.revision"),
    }


def test_a_source_that_cannot_be_read_is_one_line_and_creates_nothing(tmp_path, cli_env):
    cases = bad_source_cases(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    env = {**cli_env, "MLXLAB_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    # the four in turn in one process, mlxlab-train's (one process start, not four)
    done = each_in_one_process(
        [["mlxlab-train", "experiment=finetune_chat", "data.train_file=chats.jsonl", *overrides]
         for overrides, _ in cases.values()], env, cwd=root, after="one_process:names_here")
    for (name, (_, message)), (code, stderr, left) in zip(cases.items(), done, strict=True):
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and message in lines[0], (name, lines)
        assert left == [], (name, left)  # no mlruns/, outputs/ or cache


def test_a_gguf_conversion_is_written_once_and_reused(tmp_path, tiny_llama):
    file = tmp_path / "once.gguf"
    write_gguf(tiny_llama, file, "q4_0", name="tiny")
    first = resolve(str(file)).folder
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    from mlxlab.models import sources

    sources._resolved.clear()
    assert resolve(str(file)).folder == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    weights = mx.load(str(first / "model.safetensors"))
    assert weights["model.layers.0.self_attn.v_proj.weight"].dtype == mx.uint32
