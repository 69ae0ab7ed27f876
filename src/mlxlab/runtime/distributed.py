"""Data parallelism on MLX's own engine: `mx.distributed` (ring over TCP, MPI, NCCL on CUDA).

`mlx.launch -n 2 -- mlxlab-train ...` starts N copies of the same command with MLX_RANK set; each
calls `world()` and gets one `World`. Nothing here is a home-made transport: every collective is an
`mx.distributed` op. What this module adds is what a trainer needs around them:

- exact data parallelism: each rank takes its rows of the *global* batch (`shard_rows`) and the
  step sums gradient x count over ranks before dividing by the global count (`all_sum_tree` in
  the trainer's apply step), so N ranks x batch B compute the update one process computes with
  batch N*B;
- agreement: one run folder (`start_time`, rank 0's clock), one stop step (`agree`);
- a watchdog: a collective whose peer died would block forever, so every guarded section has a
  deadline after which the process says why and exits (committed checkpoints are untouched: they
  are written to a temporary folder and renamed);
- `supports_sum_scatter`: whether the backend has a reduce-scatter (MPI and NCCL do, the ring
  does not), for the fully sharded modes (training/parallel/: fsdp and tensor, which split the
  model itself over the ranks with MLX's own sharded modules).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from mlxlab.errors import ConfigError
from mlxlab.runtime import settings

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 75  # a collective timed out: a peer died or hangs
BUCKET_BYTES = 32 << 20  # all-reduce granularity (nn.average_gradients uses the same)


def launched() -> bool:
    """True in a process started by mlx.launch or mpirun (runtime/settings.py)."""
    return settings.current().launched


def launched_rank() -> int | None:
    """This process's rank as its launcher set it (before any group is initialized), else None."""
    return settings.current().launched_rank


_GROUP: Any = None
_WORLD: World | None = None


def _group():
    global _GROUP
    if _GROUP is None and launched() and mx.distributed.is_available():
        _GROUP = mx.distributed.init()
    return _GROUP


class Watchdog:
    """Ends the process when a guarded section (a collective) outlives `timeout_s`.

    A thread checks the deadline once a second; it cannot interrupt a blocked C++ collective, so it
    writes one line to stderr and calls os._exit. SIGKILL-safe by design of the checkpoints.
    """

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = float(timeout_s), rank
        self.deadline: float | None = None
        self.what = ""
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                msg = (
                    f"\nmlxlab: error: rank {self.rank}: {self.what} waited over "
                    f"{self.timeout_s:.0f} s for the other ranks: a rank died or hangs; exiting "
                    "(committed checkpoints are intact; resume with resume=auto, any world size). "
                    "Raise trainer.distributed.timeout_s if steps or checkpoint writes are slower.\n"
                )
                try:
                    os.write(2, msg.encode())
                finally:
                    os._exit(EXIT_PEER_LOST)

    @contextmanager
    def guard(self, what: str, scale: float = 1.0) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="mlxlab-watchdog")
            self._thread.start()
        self.what, self.deadline = what, time.monotonic() + self.timeout_s * scale
        try:
            yield
        finally:
            self.deadline = None


def _watch_launcher() -> None:
    """SIGTERM ourselves when the launcher goes away (it was killed with SIGTERM or SIGKILL).

    mlx.launch does not forward signals; without this, ranks would train on as orphans writing to
    closed pipes. Output goes to /dev/null from then on, and the usual graceful stop (agree on a
    step, rank 0 checkpoints) runs.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="mlxlab-launcher-watch").start()


@dataclass
class World:
    """This process's place in the process group; size 1 (no group) for a plain process."""

    group: Any = None
    rank: int = 0
    size: int = 1
    timeout_s: float = 30.0
    watchdog: Watchdog | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def guard(self, what: str, scale: float = 1.0) -> Iterator[None]:
        """Deadline (timeout_s x scale) around code that waits on other ranks (no-op in a single
        process)."""
        if self.watchdog is None:
            yield
        else:
            with self.watchdog.guard(what, scale):
                yield

    # --- collectives (inside or outside mx.compile) ------------------------------------------

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.enabled else x

    def all_sum_tree(self, tree: Any) -> Any:
        """all_sum of every array of a tree, in few collectives: leaves are flattened and
        concatenated into buckets of at most 32 MiB per dtype, summed, and split back."""
        if not self.enabled:
            return tree
        leaves = tree_flatten(tree)
        out: dict[str, mx.array] = {}
        by_dtype: dict[Any, list[tuple[str, mx.array]]] = {}
        for key, value in leaves:
            by_dtype.setdefault(value.dtype, []).append((key, value))
        for items in by_dtype.values():
            bucket: list[tuple[str, mx.array]] = []
            size = 0
            for key, value in items + [("", None)]:
                if value is not None and (not bucket or size + value.nbytes <= BUCKET_BYTES):
                    bucket.append((key, value))
                    size += value.nbytes
                    continue
                flat = mx.concatenate([v.reshape(-1) for _, v in bucket])
                summed = self.all_sum(flat)
                offsets = np.cumsum([0] + [v.size for _, v in bucket])
                for (k, v), lo, hi in zip(bucket, offsets[:-1], offsets[1:]):
                    out[k] = summed[int(lo):int(hi)].reshape(v.shape)
                bucket, size = ([(key, value)], value.nbytes) if value is not None else ([], 0)
        return tree_map_with_path(lambda path, _: out[path], tree)  # same structure

    # --- host-side agreement -----------------------------------------------------------------

    def sum_numbers(self, values: list[float], what: str = "an all-reduce",
                    scale: float = 1.0) -> list[float]:
        """Sum small numbers over ranks (float64 precision is not needed: counts and flags);
        waits at most timeout_s x scale."""
        if not self.enabled:
            return list(values)
        with self.guard(what, scale):
            out = self.all_sum(mx.array(values, dtype=mx.float32))
            mx.eval(out)
        return [float(x) for x in np.array(out)]

    def agree(self, stop: bool, save: bool) -> tuple[bool, bool]:
        """(any rank wants to stop, rank 0 wants to save): every rank acts at the same step."""
        if not self.enabled:
            return stop, save
        s, c = self.sum_numbers([float(stop), float(save and self.is_main)], "the stop/save check")
        return s > 0, c > 0

    def broadcast_ints(self, values: list[int], what: str) -> list[int]:
        """Rank 0's int32 values on every rank."""
        if not self.enabled:
            return list(values)
        mine = np.asarray(values, np.int32) if self.is_main else np.zeros(len(values), np.int32)
        with self.guard(what):
            out = self.all_sum(mx.array(mine))
            mx.eval(out)
        return [int(x) for x in np.array(out)]

    def check_same(self, text: str, what: str, fix: str, scale: float = 1.0) -> None:
        """Raise on every rank when `text` differs between ranks (e.g. the tokenizer hash)."""
        if not self.enabled:
            return
        code = np.frombuffer(text.encode()[:64].ljust(64, b"\0"), np.uint8).astype(np.float32)
        with self.guard(what, scale):
            lo, hi = mx.distributed.all_min(mx.array(code), group=self.group), mx.distributed.all_max(
                mx.array(code), group=self.group)
            mx.eval(lo, hi)
        if not np.array_equal(np.array(lo), np.array(hi)):
            raise ConfigError(f"ranks disagree on {what}: {fix}")

    def barrier(self, what: str = "a barrier", scale: float = 1.0) -> None:
        self.sum_numbers([0.0], what, scale)

    # --- data --------------------------------------------------------------------------------

    def shard_rows(self, batch: dict[str, mx.array]) -> dict[str, mx.array]:
        """This rank's contiguous rows of a global batch (sizes differ by at most one).

        A rank left without rows (a global batch smaller than the world) gets the first row with
        its loss masks 0 (`loss_mask`, and a preference batch's `chosen_loss_mask` and
        `rejected_loss_mask`): it counts 0 in the loss and the gradient, and keeps the step's
        collectives matched across ranks.
        """
        if not self.enabled:
            return batch
        rows = next(iter(batch.values())).shape[0]
        lo, hi = rows * self.rank // self.size, rows * (self.rank + 1) // self.size
        if hi > lo:
            return {k: v[lo:hi] for k, v in batch.items()}
        one = {k: v[:1] for k, v in batch.items()}
        masks = [k for k in one if k == "loss_mask" or k.endswith("_loss_mask")]
        for key in masks or ["loss_mask"]:  # no mask yet (classification): one from the labels
            one[key] = mx.zeros(one[key if masks else "labels"].shape, mx.float32)
        return one

    def gather_rows(self, array: np.ndarray, what: str = "gathering evaluation rows") -> np.ndarray:
        """Concatenate every rank's rows (any count per rank, same trailing shape), rank order."""
        if not self.enabled:
            return array
        counts = [int(c) for c in self.sum_numbers(
            [float(len(array)) if r == self.rank else 0.0 for r in range(self.size)], what)]
        width = max(counts)
        padded = np.zeros((width, *array.shape[1:]), array.dtype)
        padded[: len(array)] = array
        with self.guard(what):
            out = mx.distributed.all_gather(mx.array(padded), group=self.group)
            mx.eval(out)
        out = np.array(out).reshape(self.size, width, *array.shape[1:])
        return np.concatenate([out[r, : counts[r]] for r in range(self.size)])


def world(mode: str | bool | None = "auto", timeout_s: float = 30.0) -> World:
    """The process group: `auto` = on when launched with more than one rank, `off`/false = a plain
    single process even under a launcher, `on`/true = must be launched (error otherwise); `fsdp`
    and `tensor` take the group as `auto` does (the trainer shards the model over it)."""
    global _WORLD
    mode = {True: "on", False: "off", None: "auto", "fsdp": "auto", "tensor": "auto"}.get(
        mode, mode)  # type: ignore[arg-type]
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"trainer.distributed.mode must be auto, on, off, fsdp or tensor, got "
                          f"{mode!r}")
    if mode == "off":
        return World()
    if _WORLD is not None:
        _WORLD.timeout_s = float(timeout_s)
        if _WORLD.watchdog is not None:
            _WORLD.watchdog.timeout_s = float(timeout_s)
        return _WORLD
    group = _group()
    if group is None or group.size() == 1:
        if mode == "on":
            raise ConfigError(
                "trainer.distributed.mode=on but this process has no peers: start it with "
                "`mlx.launch -n 2 -- mlxlab-train ...` (or set trainer.distributed.mode=auto)"
            )
        _WORLD = World()
        return _WORLD
    rank, size = group.rank(), group.size()
    _WORLD = World(group, rank, size, float(timeout_s), Watchdog(timeout_s, rank))
    _watch_launcher()
    if rank != 0:  # only rank 0 prints; the others still report warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("mlxlab").setLevel(logging.WARNING)
    log.info("data parallel: %d ranks (backend group of size %d)", size, size)
    return _WORLD


_SCATTER: dict[int, bool] = {}


def supports_sum_scatter(world: World) -> bool:
    """Whether `world`'s backend has `mx.distributed.sum_scatter` (MPI, NCCL; the ring backend
    has not): tried once on every rank, which must all call it together."""
    if world.size not in _SCATTER:
        try:
            with world.guard("trying the backend's reduce-scatter"):
                mx.eval(mx.distributed.sum_scatter(mx.zeros((world.size,)), group=world.group))
            _SCATTER[world.size] = True
        except RuntimeError:  # "[ring] sum_scatter not supported."
            _SCATTER[world.size] = False
    return _SCATTER[world.size]


_START: float | None = None


def start_time() -> float:
    """This run's start time, rank 0's under a launcher, so every rank names the same folder."""
    global _START
    if not launched():  # a plain process: now (Hydra caches it per config, like ${now:})
        return time.time()
    if _START is None:
        now = time.time()
        w = world("auto")
        if w.enabled:
            sec, usec = w.broadcast_ints([int(now), int((now % 1) * 1e6)], "agreeing on the run dir")
            now = sec + usec / 1e6
        _START = now
    return _START


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a tree (e.g. an optimizer's state)."""
    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))


__all__ = [
    "EXIT_PEER_LOST", "Watchdog", "World", "launched", "start_time", "supports_sum_scatter",
    "tree_nbytes", "world",
]
