"""Checkpoints: exact resume, rotation, corruption fallback, full disk, architecture changes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxlab import checkpoint as ckpt
from mlxlab.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    find_run_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# ---------------------------------------------------------------------------- fixtures

X = mx.array(np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32))
Y = mx.array(np.random.default_rng(1).integers(0, 3, size=(32,)).astype(np.int32))


def mlp(seed: int) -> nn.Module:
    mx.random.seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    mx.eval(model.parameters())
    return model


def adamw() -> optim.Optimizer:
    return optim.AdamW(learning_rate=optim.cosine_decay(1e-2, 20), weight_decay=0.01)


def make_step(model: nn.Module, optimizer: optim.Optimizer):
    """The contract's compiled step: state = [model.state, optimizer.state, mx.random.state]."""

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    def run(i: int) -> mx.array:
        rows = slice((i % 4) * 8, (i % 4) * 8 + 8)  # a deterministic batch per step
        loss = step(X[rows], Y[rows])
        mx.eval(state)
        return loss

    return run


def train(model, optimizer, start: int, stop: int) -> list[float]:
    model.train()
    run = make_step(model, optimizer)
    return [run(i).item() for i in range(start, stop)]


def flat(tree) -> dict[str, mx.array]:
    return dict(tree_flatten(tree))


def assert_trees_equal(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert mx.array_equal(fa[k], fb[k]).item(), f"{k} differs"


def trained_checkpoints(directory: Path, steps=(1, 2, 3), **manager_kw) -> CheckpointManager:
    """A manager with one real checkpoint per step, each after one more AdamW step."""
    model, opt = mlp(0), adamw()
    manager = CheckpointManager(directory, **manager_kw)
    run = make_step(model, opt)
    model.train()
    for step in steps:
        run(step)
        manager.save(model, opt, {"step": step, "rng": rng_state()})
    return manager


# ---------------------------------------------------------------------------- exact resume


def test_resume_is_bitwise_identical_to_never_stopping(tmp_path):
    mx.random.seed(7)
    ref_model, ref_opt = mlp(0), adamw()
    ref_losses = train(ref_model, ref_opt, 0, 10)

    mx.random.seed(7)
    model, opt = mlp(0), adamw()
    losses = train(model, opt, 0, 5)
    path = save_checkpoint(
        tmp_path,
        model,
        opt,
        {"step": 5, "epoch": 0, "rng": rng_state(), "data": {"offset": 40}, "best_metric": None},
    )
    assert path.name == "step_00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMMITTED",
        "checksums.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]

    # a new process: different init, different RNG, compiled step built before loading
    mx.random.seed(999)
    resumed, resumed_opt = mlp(1), adamw()
    resumed.train()
    run = make_step(resumed, resumed_opt)
    state, report = load_checkpoint(path, resumed, resumed_opt)
    assert report.exact, report.summary()
    assert state["data"] == {"offset": 40} and state["step"] == 5
    assert_trees_equal(resumed.parameters(), model.parameters())
    assert_trees_equal(resumed_opt.state, opt.state)
    assert resumed_opt.state["step"].dtype == mx.uint64

    set_rng_state(state["rng"])
    losses += [run(i).item() for i in range(5, 10)]
    assert losses == ref_losses
    assert_trees_equal(resumed.parameters(), ref_model.parameters())
    assert_trees_equal(resumed_opt.state, ref_opt.state)


def test_resume_without_rng_restore_differs(tmp_path):
    # guards the test above: dropout makes the RNG matter, so exactness is not an accident
    mx.random.seed(7)
    ref_model, ref_opt = mlp(0), adamw()
    train(ref_model, ref_opt, 0, 6)
    mx.random.seed(7)
    model, opt = mlp(0), adamw()
    train(model, opt, 0, 3)
    path = save_checkpoint(tmp_path, model, opt, {"step": 3, "rng": rng_state()})
    mx.random.seed(999)
    resumed, resumed_opt = mlp(1), adamw()
    load_checkpoint(path, resumed, resumed_opt)
    train(resumed, resumed_opt, 3, 6)
    w, ref = flat(resumed.parameters()), flat(ref_model.parameters())
    assert not all(mx.array_equal(w[k], ref[k]).item() for k in w)


def test_rng_state_round_trip():
    mx.random.seed(3)
    mx.random.uniform(shape=(5,))
    key = rng_state()
    a = mx.random.normal((4,))
    mx.random.seed(12345)
    set_rng_state(json.loads(json.dumps(key)))
    assert mx.array_equal(a, mx.random.normal((4,))).item()
    with pytest.raises(ValueError, match="two uint32"):
        set_rng_state([1, 2, 3])


# ---------------------------------------------------------------------------- manager


def test_rotation_keeps_last_n_and_best(tmp_path):
    metrics = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8, 6: 0.85}
    model, opt = mlp(0), adamw()
    manager = CheckpointManager(tmp_path, keep_last_n=2, monitor="val/acc", mode="max")
    saved_at_best = None
    for step, metric in metrics.items():
        model.update({"layers": [{"bias": mx.full((16,), float(step))}, {}, {}, {}]})
        manager.save(model, opt, {"step": step}, metric=metric)
        if step == 2:
            saved_at_best = flat(model.parameters())
    assert [p.name for p in manager.list_committed()] == ["step_00000006", "step_00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_00000005", "step_00000006"]
    assert manager.best_path == tmp_path / "best" and manager.best_metric == 0.9
    assert json.loads((tmp_path / "best" / "state.json").read_text())["step"] == 2
    best_model = mlp(5)
    load_checkpoint(manager.best_path, best_model)
    assert_trees_equal(best_model.parameters(), saved_at_best)
    # a resumed run's manager knows the best so far: 0.88 does not replace it, 0.95 does
    again = CheckpointManager(tmp_path, keep_last_n=2, monitor="val/acc", mode="max")
    assert again.best_metric == 0.9
    again.restore_best(0.1)  # best/ on disk wins over a trainer state's value
    assert again.best_metric == 0.9
    fresh = CheckpointManager(tmp_path / "other_run", monitor="val/acc")
    fresh.restore_best(0.9)
    assert fresh.best_metric == 0.9 and not fresh.is_better(0.85)
    again.save(model, opt, {"step": 7}, metric=0.88)
    assert json.loads((tmp_path / "best" / "state.json").read_text())["step"] == 2
    again.save(model, opt, {"step": 8}, metric=0.95)
    assert json.loads((tmp_path / "best" / "state.json").read_text())["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_00000007", "step_00000008"]


def test_mode_min_and_should_save(tmp_path):
    manager = CheckpointManager(tmp_path, save_every_steps=3, monitor="val/loss", mode="min")
    assert [s for s in range(10) if manager.should_save(s)] == [3, 6, 9]
    assert manager.is_better(1.0)
    manager.best_metric = 0.5
    assert manager.is_better(0.4) and not manager.is_better(0.6)
    by_time = CheckpointManager(tmp_path, save_every_minutes=0.0005)  # 30 ms
    assert not by_time.should_save(1)
    time.sleep(0.05)
    assert by_time.should_save(1)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="up")


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, opt = mlp(0), adamw()
    save_checkpoint(tmp_path, model, opt, {"step": 4, "tag": "first"})
    save_checkpoint(tmp_path, model, opt, {"step": 4, "tag": "second"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    state, _ = load_checkpoint(tmp_path / "step_00000004", mlp(1))
    assert state["tag"] == "second"


def test_manager_recovers_from_a_killed_swap(tmp_path):
    manager = trained_checkpoints(tmp_path, steps=(1,))
    manager.save(mlp(0), None, {"step": 2}, metric=1.0)
    # killed between "rename best away" and "rename new best in", and mid-save
    os.rename(tmp_path / "best", tmp_path / ".old-best-deadbeef")
    (tmp_path / ".tmp-step_00000003-cafe0000").mkdir()
    again = CheckpointManager(tmp_path)
    assert again.best_path == tmp_path / "best" and again.best_metric == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: mx.load would happily read it
    f.write_bytes(bytes(data))


def _delete_marker(path: Path) -> None:
    (path / "COMMITTED").unlink()


def _garble_checksums(path: Path) -> None:
    (path / "checksums.json").write_text("{not json")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncate, "truncated"),
        (_flip_byte, "checksum mismatch"),
        (_delete_marker, "no COMMITTED marker"),
        (_garble_checksums, "checksums.json unreadable"),
    ],
)
def test_load_latest_falls_back_past_a_corrupt_checkpoint(tmp_path, corrupt, reason):
    manager = trained_checkpoints(tmp_path)
    expected = mlp(9)
    load_checkpoint(tmp_path / "step_00000002", expected)
    corrupt(tmp_path / "step_00000003")
    model, opt = mlp(5), adamw()
    with pytest.warns(CheckpointWarning, match=f"step_00000003.*{reason}"):
        state, path = manager.load_latest(model, opt)
    assert path.name == "step_00000002" and state["step"] == 2
    assert_trees_equal(model.parameters(), expected.parameters())
    assert opt.state["step"].item() == 2
    assert manager.latest().name == (
        "step_00000003" if reason == "checksum mismatch" else "step_00000002"
    )  # listing does not hash


def test_all_corrupt_is_a_clear_error_and_leaves_the_model_alone(tmp_path):
    manager = trained_checkpoints(tmp_path, steps=(1, 2))
    _flip_byte(tmp_path / "step_00000002")
    _truncate(tmp_path / "step_00000001")
    model = mlp(5)
    before = flat(model.parameters())
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as info:
        manager.load_latest(model, adamw())
    message = str(info.value)
    assert "step_00000002" in message and "step_00000001" in message
    assert "checksum mismatch" in message and "truncated" in message
    assert_trees_equal(model.parameters(), before)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        CheckpointManager(tmp_path / "empty").load_latest(model)


def test_load_errors_name_the_problem(tmp_path):
    trained_checkpoints(tmp_path, steps=(1,))
    with pytest.raises(CheckpointError, match="is a file: pass the checkpoint directory"):
        load_checkpoint(tmp_path / "step_00000001" / "model.safetensors", mlp(0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "step_00000099", mlp(0))
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_checkpoint(tmp_path, mlp(0), None, {"step": 2, "bad": object()})
    with pytest.raises(ValueError, match="'step'"):
        save_checkpoint(tmp_path, mlp(0), None, {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


# ---------------------------------------------------------------------------- full disk


def test_a_save_that_runs_out_of_disk_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    manager = trained_checkpoints(tmp_path, steps=(1,))
    real_write, calls = ckpt.atomic._write_safetensors, []

    def write_then_fill_disk(path, arrays):
        calls.append(path.name)
        if len(calls) > 1:  # model.safetensors made it, optimizer.safetensors does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, arrays)

    monkeypatch.setattr(ckpt.atomic, "_write_safetensors", write_then_fill_disk)
    with pytest.raises(OSError, match="step_00000002.*intact") as info:
        manager.save(mlp(0), adamw(), {"step": 2})
    assert info.value.errno == errno.ENOSPC
    assert calls == ["model.safetensors", "optimizer.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    monkeypatch.undo()
    state, path = manager.load_latest(mlp(3), adamw())
    assert path.name == "step_00000001" and state["step"] == 1


SHORT_WRITE = """
import errno, resource, signal, sys
from pathlib import Path
import mlx.core as mx, mlx.nn as nn
from mlxlab.checkpoint import save_checkpoint
directory = Path(sys.argv[1])
save_checkpoint(directory, nn.Linear(4, 4), None, {"step": 1})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-limit writes fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint(directory, nn.Linear(100, 100), None, {"step": 2})
except OSError as e:
    print("OSError", e.errno in (errno.EIO, errno.ENOSPC), e)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_real_short_write_is_caught(tmp_path):
    # A file-size limit makes the OS refuse writes, as a full disk does: no fakes here.
    out = subprocess.run(
        [sys.executable, "-c", SHORT_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError True"), out.stdout
    assert "step_00000002" in out.stdout and "intact" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    state, _ = load_checkpoint(tmp_path / "step_00000001", nn.Linear(4, 4))
    assert state == {"step": 1}


# ---------------------------------------------------------------------------- architecture


class LoRALinear(nn.Module):
    """Stand-in with the models room's layout: the base layer lives at `.linear`."""

    def __init__(self, dims: int, rank: int = 2):
        super().__init__()
        self.linear = nn.Linear(dims, dims)
        self.lora_a = mx.random.normal((dims, rank)) * 0.01
        self.lora_b = mx.zeros((rank, dims))

    def __call__(self, x):
        return self.linear(x) + (x @ self.lora_a) @ self.lora_b


class Block(nn.Module):
    def __init__(self, dims: int, lora: bool):
        super().__init__()
        self.query = LoRALinear(dims) if lora else nn.Linear(dims, dims)

    def __call__(self, x):
        return x + nn.relu(self.query(x))


class Tiny(nn.Module):
    def __init__(self, vocab_size=10, dims=8, num_layers=2, lora=False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dims)
        self.layers = [Block(dims, lora) for _ in range(num_layers)]
        self.head = nn.Linear(dims, 2)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(axis=1))


def train_tiny(model: nn.Module, optimizer: optim.Optimizer, steps: int = 3) -> None:
    ids = mx.array(np.random.default_rng(2).integers(0, 10, size=(4, 5)).astype(np.int32))
    labels = mx.array([0, 1, 1, 0])
    loss_and_grad = nn.value_and_grad(
        model, lambda m: nn.losses.cross_entropy(m(ids), labels).mean()
    )
    for _ in range(steps):
        _, grads = loss_and_grad(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)


def saved_tiny(tmp_path: Path, **kw) -> tuple[Path, nn.Module, optim.Optimizer]:
    mx.random.seed(0)
    model, opt = Tiny(**kw), optim.AdamW(1e-2)
    if kw.get("lora"):
        model.freeze()
        model.unfreeze(keys=["lora_a", "lora_b"])
    train_tiny(model, opt)
    return save_checkpoint(tmp_path, model, opt, {"step": 3}), model, opt


def test_more_layers_and_bigger_vocab(tmp_path):
    path, old, old_opt = saved_tiny(tmp_path)
    mx.random.seed(1)
    new, opt = Tiny(vocab_size=12, num_layers=3), optim.AdamW(1e-2)
    train_tiny(new, opt, steps=1)  # an optimizer with state already: re-initialized gets fresh
    _, report = load_checkpoint(path, new, opt)
    assert report.reinitialized == {
        "embed.weight": "shape (10, 8) -> (12, 8)",
        "layers.2.query.weight": "not in checkpoint",
        "layers.2.query.bias": "not in checkpoint",
    }
    assert sorted(report.loaded) == sorted(
        [f"layers.{i}.query.{p}" for i in (0, 1) for p in ("weight", "bias")]
        + ["head.weight", "head.bias"]
    )
    assert report.dropped == [] and not report.exact
    assert "re-initialized (3)" in report.summary()
    new_w, old_w, old_state = flat(new.parameters()), flat(old.parameters()), flat(old_opt.state)
    assert mx.array_equal(new_w["layers.1.query.weight"], old_w["layers.1.query.weight"]).item()
    assert sorted(report.optimizer_by_name) == sorted(report.loaded)
    assert sorted(report.optimizer_fresh) == sorted(report.reinitialized)
    new_state = flat(opt.state)
    for name in report.loaded:
        for slot in ("m", "v"):
            key = f"{name}.{slot}"
            assert mx.array_equal(new_state[key], old_state[key]).item(), key
    assert not new_state["layers.2.query.weight.v"].any().item()
    assert new_state["step"].item() == 3 and set(report.optimizer_scalars) == {
        "step",
        "learning_rate",
    }
    train_tiny(new, opt, steps=1)  # and it trains on

    # fewer layers the other way round: the extra layer is dropped, strict refuses
    strict_path = save_checkpoint(tmp_path / "big", new, opt, {"step": 4})
    _, report = load_checkpoint(strict_path, Tiny(vocab_size=12, num_layers=2))
    assert report.dropped == ["layers.2.query.bias", "layers.2.query.weight"]
    with pytest.raises(CheckpointError, match="strict"):
        load_checkpoint(strict_path, Tiny(num_layers=2), strict=True)


def test_plain_checkpoint_into_lora_model_and_back(tmp_path):
    path, plain, _ = saved_tiny(tmp_path / "plain")
    mx.random.seed(1)
    lora, opt = Tiny(lora=True), optim.AdamW(1e-2)
    lora.freeze()
    lora.unfreeze(keys=["lora_a", "lora_b"])
    _, report = load_checkpoint(path, lora, opt)
    assert report.renamed == {
        f"layers.{i}.query.linear.{p}": f"layers.{i}.query.{p}"
        for i in (0, 1)
        for p in ("weight", "bias")
    }
    assert sorted(report.reinitialized) == sorted(
        f"layers.{i}.query.{p}" for i in (0, 1) for p in ("lora_a", "lora_b")
    )
    assert report.dropped == []
    assert sorted(report.optimizer_fresh) == sorted(report.reinitialized)
    lora_w, plain_w = flat(lora.parameters()), flat(plain.parameters())
    for new_name, old_name in report.renamed.items():
        assert mx.array_equal(lora_w[new_name], plain_w[old_name]).item()
    assert "layers.0.query.weight -> layers.0.query.linear.weight" in report.summary()

    # a LoRA checkpoint into a plain model: base weights map back, adapters are dropped
    lora_path, lora_model, _ = saved_tiny(tmp_path / "lora", lora=True)
    back = Tiny()
    _, report = load_checkpoint(lora_path, back)
    assert report.reinitialized == {} and len(report.renamed) == 4
    assert len(report.dropped) == 4
    assert all(n.endswith(("lora_a", "lora_b")) for n in report.dropped)
    assert mx.array_equal(
        flat(back.parameters())["layers.1.query.weight"],
        flat(lora_model.parameters())["layers.1.query.linear.weight"],
    ).item()


def test_plain_checkpoint_into_the_models_room_lora(tmp_path):
    from mlxlab.models.adapters import lora as lora_module
    path, plain, plain_opt = saved_tiny(tmp_path)
    mx.random.seed(1)
    model, opt = Tiny(), optim.AdamW(1e-2)
    lora_module.apply_lora(model, rank=2, targets=["query"], extra_trainable=["head"])
    _, report = load_checkpoint(path, model, opt)
    assert len(report.renamed) == 4 and len(report.reinitialized) == 4
    assert sorted(report.optimizer_by_name) == ["head.bias", "head.weight"]
    assert (
        opt.state["head"]["weight"]["m"].tolist() == plain_opt.state["head"]["weight"]["m"].tolist()
    )
    ids = mx.array([[1, 2, 3, 4]])
    assert mx.allclose(model(ids), plain(ids)).item()  # lora_b starts at zero


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def __call__(self, ids):
        return self.net(ids)


def test_optimizer_state_transferred_by_shape_when_names_differ(tmp_path):
    # the optimizer ran on a wrapper (keys `net.…`) while the weights were saved unwrapped
    mx.random.seed(0)
    wrapped, opt = Wrapper(Tiny(num_layers=11)), optim.AdamW(1e-2)
    train_tiny(wrapped, opt)
    path = save_checkpoint(tmp_path, wrapped.net, opt, {"step": 3})
    model, new_opt = Tiny(num_layers=11), optim.AdamW(1e-2)  # layers.10 sorts after layers.9
    _, report = load_checkpoint(path, model, new_opt)
    assert report.optimizer_by_name == [] and report.optimizer_fresh == []
    assert report.optimizer_by_shape == {n: f"net.{n}" for n in report.loaded}
    assert_trees_equal(
        new_opt.state, {k: v for k, v in opt.state.items() if k != "net"} | opt.state["net"]
    )


# ---------------------------------------------------------------------------- discovery


def test_find_run_checkpoints_accepts_run_checkpoints_or_one_dir(tmp_path):
    trained_checkpoints(tmp_path / "run" / "checkpoints", steps=(1, 2), monitor="m")
    CheckpointManager(tmp_path / "run" / "checkpoints").save(mlp(0), None, {"step": 3}, 1.0)
    expected = ["step_00000003", "step_00000002", "step_00000001", "best"]
    assert [p.name for p in find_run_checkpoints(tmp_path / "run")] == expected
    assert [p.name for p in find_run_checkpoints(tmp_path / "run" / "checkpoints")] == expected
    one = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert find_run_checkpoints(one) == [one]
    _flip_byte(tmp_path / "run" / "checkpoints" / "step_00000003")
    source = find_run_checkpoints(tmp_path / "run")
    with pytest.warns(CheckpointWarning, match="step_00000003"):
        state, path = source.load_latest(mlp(1), adamw())
    assert path.name == "step_00000002" and state["step"] == 2
    assert source.last_report.exact
    state, path = find_run_checkpoints(one).load_latest(mlp(1))
    assert path == one
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_run_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints under"):
        find_run_checkpoints(tmp_path / "empty")
