"""A LoRA run on a pretrained base checkpoints only what it trains: model.safetensors
holds the adapters, state.json the base's source and fingerprint. Resume from it is bitwise the
uninterrupted run, the finished run loads (export, generate) to the same weights as a
self-contained checkpoint (checkpoint.save_base=true, every weight, as before), and a base that
changed or is gone is refused in one line. Real mlx-lm models written by transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import PYTHON
from hf_helpers import mlx_logits, save_tiny_model
from mlxlab.checkpoint import CheckpointError, CheckpointState, load_checkpoint
from mlxlab.config import asset_path
from mlxlab.errors import ConfigError, MissingFileError
from mlxlab.models.sources.fingerprint import base_record, holds_base
from mlxlab.runs import load_run_model

IDS = np.random.default_rng(5).integers(0, 500, size=(2, 16))
STEPS = 8


def overrides(base: Path, pairs: Path, *extra: str, tracking: str = "none") -> list[str]:
    return ["experiment=finetune_completions", f"model.pretrained={base}",
            f"data.train_file={pairs}", "data.max_length=64", f"tracking={tracking}",
            "callbacks.progress.enabled=false", f"trainer.max_steps={STEPS}",
            "trainer.eval_every_steps=4", "optimizer.learning_rate=3e-3", "trainer.batch_size=4",
            "checkpoint.save_every_minutes=null", "checkpoint.keep_last_n=3",
            "checkpoint.async_write=false", *extra]


def train(base: Path, run_dir: Path, pairs: Path, *extra: str, check: bool = True,
          tracking: str = "none") -> subprocess.CompletedProcess:
    """`mlxlab train` as a user types it (the resumed run, the refusals)."""
    done = subprocess.run(
        [PYTHON, "-m", "mlxlab.cli.main", "train", *overrides(base, pairs, *extra,
                                                               tracking=tracking),
         f"paths.root_dir={run_dir.parent}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=run_dir.parent)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The two finished runs, trained in this process (two process starts less); the resume
    test's run is `mlxlab train`'s, to the bit the same as this process's."""
    from hydra.core.global_hydra import GlobalHydra

    from mlxlab.config import compose_config
    from mlxlab.train import train as train_here

    root = tmp_path_factory.mktemp("adapters")
    base = save_tiny_model("llama", root / "tiny-llama")
    pairs = root / "pairs.jsonl"
    lines = Path(asset_path("tinystories/pairs.jsonl")).read_text().splitlines()[:32]
    pairs.write_text("\n".join(lines) + "\n")
    adapters, whole = root / "adapters", root / "whole"
    for run_dir, extra, tracking in ((adapters, [], "csv"),
                                     (whole, ["checkpoint.save_base=true"], "none")):
        train_here(compose_config(root, overrides(base, pairs, *extra, tracking=tracking),
                                  output_dir=run_dir))
        GlobalHydra.instance().clear()
    return {"root": root, "base": base, "pairs": pairs, "adapters": adapters, "whole": whole}


def names(checkpoint: Path) -> set[str]:
    return set(mx.load(str(checkpoint / "model.safetensors")))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def test_a_lora_checkpoint_holds_the_adapters_and_the_bases_fingerprint(runs):
    best = runs["adapters"] / "checkpoints" / "best"
    held = names(best)
    assert held and all(n.endswith(("lora_a", "lora_b")) for n in held), sorted(held)[:5]
    base_bytes = sum(p.stat().st_size for p in runs["base"].glob("model*.safetensors"))
    size = (best / "model.safetensors").stat().st_size
    assert size < base_bytes / 10, (size, base_bytes)
    state = CheckpointState.read(best)
    assert state.base["pretrained"] == str(runs["base"])
    assert set(state.base["files"]) == {"config.json", "model.safetensors"}
    # the adapters are the ones a self-contained checkpoint of the same run holds, to the bit
    whole = mx.load(str(runs["whole"] / "checkpoints" / "best" / "model.safetensors"))
    assert held < set(whole)
    for name, value in mx.load(str(best / "model.safetensors")).items():
        assert np.array_equal(np.array(value), np.array(whole[name])), name


def test_the_tracked_copy_of_best_is_the_adapters_and_loads(runs):
    """tracking=csv copies best/ into the run's artifacts: the adapters (not the base again),
    and the copy loads as the run does."""
    (copy,) = {p.parent for p in runs["root"].glob("**/artifacts/checkpoint/model.safetensors")}
    assert names(copy) == names(runs["adapters"] / "checkpoints" / "best")
    model, _ = load_run_model(copy)
    reference, _ = load_run_model(runs["adapters"])
    assert np.array_equal(mlx_logits(model, IDS), mlx_logits(reference, IDS))


def test_save_base_true_keeps_every_weight(runs):
    best = runs["whole"] / "checkpoints" / "best"
    held = names(best)
    assert any(n.endswith("embed_tokens.weight") for n in held)
    assert any(n.endswith("q_proj.linear.weight") for n in held)
    assert CheckpointState.read(best).base is None


def test_the_finished_run_loads_to_the_same_weights_as_a_whole_checkpoint(runs):
    """What export, generate, serve and eval load (load_run_model): the base rebuilt from its
    source, the adapters on it: the same logits, bit for bit, as the checkpoint of every weight."""
    model, state = load_run_model(runs["adapters"])
    reference, _ = load_run_model(runs["whole"])
    assert state.path.name == "best"
    assert np.array_equal(mlx_logits(model, IDS), mlx_logits(reference, IDS))


def test_loading_adapters_without_their_base_is_refused(runs):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    model = MLXLMDecoder(vocab_size=512, hf_config=json.loads(
        (runs["base"] / "config.json").read_text()), lora={"rank": 8, "targets": ["query"]})
    with pytest.raises(CheckpointError, match="holds only the trained parameters of the base"):
        load_checkpoint(runs["adapters"] / "checkpoints" / "best", model)


@pytest.mark.slow  # bitwise resume also in test_resume.py's sigkill tests
def test_resume_from_an_adapter_checkpoint_is_bitwise_the_uninterrupted_run(runs, tmp_path):
    """Resumed from the checkpoint of step 4 (adapters only) into a new folder: the adapters and
    optimizer state of step 8 equal the uninterrupted run's to the bit."""
    resumed = tmp_path / "resumed"
    train(runs["base"], resumed, runs["pairs"],
          f"resume={step_dir(runs['adapters'], STEPS // 2)}")
    for file in ("model.safetensors", "optimizer.safetensors"):
        got = mx.load(str(step_dir(resumed, STEPS) / file))
        expected = mx.load(str(step_dir(runs["adapters"], STEPS) / file))
        assert got.keys() == expected.keys()
        for name in expected:
            assert np.array_equal(np.array(got[name]), np.array(expected[name])), (file, name)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines()
             if line.startswith("mlxlab") and ": error: " in line]
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def test_a_changed_or_missing_base_is_refused_in_one_line(runs, tmp_path):
    """Another run on a copy of the base, then one weight of the copy changed: loading it (here
    `mlxlab export`) is one line naming the source, the fingerprints and the fix; so is a base
    that is gone."""
    base = shutil.copytree(runs["base"], tmp_path / "base")
    run = tmp_path / "run"
    shutil.copytree(runs["adapters"], run)
    for state_file in run.glob("checkpoints/*/state.json"):  # the same run, on the copy
        state = json.loads(state_file.read_text())
        state["base"]["pretrained"] = state["base"]["folder"] = str(base)
        state_file.write_text(json.dumps(state))
    for checksums in run.glob("checkpoints/*/checksums.json"):  # state.json's new digest
        from mlxlab.runtime.files.checksum import file_sha256

        sums = json.loads(checksums.read_text())
        sums["state.json"] = {"sha256": file_sha256(checksums.parent / "state.json"),
                              "bytes": (checksums.parent / "state.json").stat().st_size}
        checksums.write_text(json.dumps(sums))
    model, _ = load_run_model(run)  # the copy is the same base
    weights = mx.load(str(base / "model.safetensors"))
    name = next(n for n in sorted(weights) if n.endswith("q_proj.weight"))
    changed = np.array(weights[name])
    changed[0, 0] += 1.0
    weights[name] = mx.array(changed)
    mx.save_safetensors(str(base / "model.safetensors"), weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="fingerprint .* recorded, .* now; model.safetensors "
                                          "changed.*checkpoint.save_base=true"):
        load_run_model(run)
    done = subprocess.run([PYTHON, "-m", "mlxlab.cli.main", "export", str(run), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    line = one_line_error(done)
    assert str(base) in line and "model.safetensors changed" in line, line
    assert not (tmp_path / "out").exists()
    # resume's load (training/checkpointing.restore) onto a model built on the changed copy
    from mlxlab.checkpoint import find_run_checkpoints
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    on_changed = MLXLMDecoder(vocab_size=model.vocab_size, pretrained=str(base),
                              lora={"rank": 8, "targets": ["query", "key", "value", "out"]})
    with pytest.raises(ConfigError, match=f"resume={run} holds .* is not that base any more"):
        find_run_checkpoints(run).load_latest(
            on_changed, verify_base=holds_base(on_changed, f"resume={run}"))
    shutil.rmtree(base)
    with pytest.raises(MissingFileError, match=f"base {base}, and that base is gone"):
        load_run_model(run)


def test_dora_on_a_base_quantized_at_load_round_trips_its_trained_parameters(runs, tmp_path):
    """QLoRA with DoRA (model.quantize=4): the checkpoint holds the adapters and the DoRA
    magnitudes, not the packed base; a model built again from the source (other adapter draws)
    takes them and gives the trained model's logits to the bit."""
    from mlxlab.checkpoint import save_checkpoint
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    def build(seed: int) -> MLXLMDecoder:
        mx.random.seed(seed)
        return MLXLMDecoder(vocab_size=512, pretrained=str(runs["base"]), quantize=4,
                            lora={"rank": 4, "kind": "dora", "targets": ["query", "value"]})

    trained = build(0)
    trained.update(tree_unflatten([(k, v + 0.01 * mx.random.normal(v.shape))
                                   for k, v in tree_flatten(trained.trainable_parameters())]))
    source = trained.base_source
    record = base_record(source["pretrained"], source["revision"], Path(source["folder"]))
    path = save_checkpoint(tmp_path, trained, None, {"step": 1, "base": record})
    held = names(path)
    assert held and all(n.endswith((".lora_a", ".lora_b", ".m")) for n in held), sorted(held)
    assert any(n.endswith(".m") for n in held)  # the DoRA magnitudes
    rebuilt = build(1)
    assert not np.array_equal(mlx_logits(rebuilt, IDS), mlx_logits(trained, IDS))
    _, report = load_checkpoint(path, rebuilt, strict=True,
                                verify_base=holds_base(rebuilt, str(path)))
    assert report.from_base and not report.reinitialized
    assert np.array_equal(mlx_logits(rebuilt, IDS), mlx_logits(trained, IDS))


def test_an_adapter_checkpoint_through_a_remote_store_loads_on_its_base(runs, tmp_path):
    """Uploaded to S3 (moto's server on 127.0.0.1) and fetched into a new folder, as
    `resume=s3://...` does: the adapters and the base record come back whole and the run loads
    to the same logits."""
    pytest.importorskip("s3fs")
    from mlxlab.checkpoint.remote import RemoteStore, fetch_remote_checkpoint
    from test_remote import MotoS3, env_set

    srv = MotoS3(tmp_path)
    srv.start()
    try:
        srv.make_bucket()
        with env_set(srv.env):
            store = RemoteStore(srv.uri("adapters"), retries=2, backoff_s=0.1)
            store.upload_checkpoint(step_dir(runs["adapters"], STEPS), f"step_{STEPS:08d}")
            fetched = fetch_remote_checkpoint(store.uri, tmp_path / "fetched", None, retries=1,
                                              backoff_s=0.1, required=True)
    finally:
        srv.stop()
    got = step_dir(fetched, STEPS)
    assert names(got) == names(step_dir(runs["adapters"], STEPS))
    assert CheckpointState.read(got).base == CheckpointState.read(step_dir(runs["adapters"],
                                                                           STEPS)).base
    model, _ = load_run_model(got)
    reference, _ = load_run_model(step_dir(runs["adapters"], STEPS))
    assert np.array_equal(mlx_logits(model, IDS), mlx_logits(reference, IDS))
