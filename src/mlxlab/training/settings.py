"""The Trainer's settings: one frozen, typed record per `trainer.*` group, each owning its checks,
and the checkpoint policy (`checkpoint.*`, `CheckpointPolicy`).

`conf/trainer/*.yaml` builds a `TrainerSettings` (its `_target_`); the YAML stays as flat as the
keys are (`trainer.max_epochs`, `trainer.batch_size`), and the groups that nest there nest here
(`trainer.schedule`, `trainer.batching`, `trainer.distributed`). What the run trains toward
is not here: it is the `objective` node (objectives/, conf/objective/). A nested group
may come as a mapping (the YAML's plain node, or code's `batching={"dynamic": True}`): it is built
into its class here. Every check sits in the `__post_init__` of the record that owns the key and
raises one ConfigError line naming it; config.validate builds the record before anything heavy
is built, so a bad override fails there. Nothing here changes after it is built: what one fit
changes lives in its RunState (state.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mlxlab import kernels
from mlxlab.checkpoint.remote import check_uri
from mlxlab.config.records import check_choice, check_number, check_switches, record
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.runtime.compute import device
from mlxlab.training.model_ops import check_schedule
from mlxlab.training.optim import LRSchedule

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_BITS = (None, 2, 3, 4, 6, 8)  # what mlx.nn.quantize supports
# YAML's on/off arrive as booleans; fsdp and tensor shard the model (training/parallel/)
DISTRIBUTED_MODES = ("auto", "on", "off", True, False, "fsdp", "tensor")
SHARDED_MODES = ("fsdp", "tensor")
WHEN_BUSY = ("wait", "skip")  # checkpoint.when_busy (async_writer.py)


@dataclass(frozen=True)
class BatchingSettings:
    """`trainer.batching`: the data-side batching policy (data/batching.py `Batching`)."""

    dynamic: bool = False               # length-bucketed batches under a token budget
    max_batch_size: int | None = None   # dynamic only: cap on examples per batch
    max_tokens: int | None = None       # dynamic only: padded tokens per batch
    bucket_multiple: int | None = None  # rows padded to a multiple: each width compiles once;
    # None: bucket_multiple_for(the backend)

    def __post_init__(self) -> None:
        if self.bucket_multiple is not None:
            check_number("trainer.batching.bucket_multiple", self.bucket_multiple, int, 1)
        if self.max_batch_size is not None:
            check_number("trainer.batching.max_batch_size", self.max_batch_size, int, 1)


@dataclass(frozen=True)
class DistributedConfig:
    """`trainer.distributed`: several ranks under `mlx.launch -n N -- mlxlab train ...`."""

    # auto = data parallel when launched with > 1 rank | on (must be launched) | off | fsdp
    # (parameters, gradients and optimizer state sharded: MLX's fully_shard) | tensor (each
    # block's heads and MLP split: MLX's sharded linears); docs/guide/scaling.md
    mode: str | bool = "auto"
    timeout_s: float = 30.0       # a collective waiting longer (dead or hung rank) ends the process

    def __post_init__(self) -> None:
        check_choice("trainer.distributed.mode", self.mode, DISTRIBUTED_MODES)
        check_number("trainer.distributed.timeout_s", self.timeout_s, float)
        if self.timeout_s <= 0:  # every collective would end the process at once
            raise ConfigError("trainer.distributed.timeout_s must be above 0 (the seconds a "
                              f"collective may wait), got {self.timeout_s}")

    @property
    def sharded(self) -> bool:
        """fsdp or tensor: the model is split over the ranks (training/parallel/)."""
        return self.mode in SHARDED_MODES


@dataclass(frozen=True)
class TrainerSettings:
    """Every `trainer.*` key (conf/trainer/simple.yaml), read by the Trainer and its loop, never
    changed. Defaults are those of a Trainer built in code; the YAML sets its own."""

    schedule: LRSchedule = field(default_factory=LRSchedule)  # the learning rate over the run
    max_epochs: int | None = 10       # the run ends at max_epochs or max_steps, first come
    max_steps: int | None = None      # optimizer steps; overrides max_epochs when it ends first;
                                      # 0: no step, the starting weights evaluated and recorded
                                      # (a base model's scores for `mlxlab runs compare`)
    batch_size: int = 32              # examples per micro-batch, per rank under data parallelism
    grad_accum: int = 1               # micro-batches per optimizer step
    grad_clip: float = 1.0            # global-norm clip; 0 disables
    eval_every_steps: int | None = None  # None: once per epoch (and at the end)
    log_every_steps: int = 10         # train/* metrics averaged over this many steps
    batching: BatchingSettings = field(default_factory=BatchingSettings)  # dynamic batches
    precision: str = "auto"           # auto (fp32 on CPU, bf16 where faster) | fp32 | bf16 | fp16
    compile: bool = True              # mx.compile the step
    # recompute activations in the backward: true, each decoder block's; mixers, each recurrent
    # (gated delta or Mamba) mixer's, a hybrid's memory at the plain model's; cores, each such
    # mixer's but its projections' and rule's, kept (grad_checkpoint.py, replay.py)
    grad_checkpoint: bool | str = False
    # rows per forward/backward pass: None = batch_size; N (dividing batch_size x grad_accum);
    # "auto" = the largest power of two whose step fits trainer.memory_limit (micro_batch.py).
    # The effective batch (batch_size x grad_accum) never changes: grad_accum follows.
    micro_batch: int | str | None = None
    memory_limit: float | str | None = None  # GB (> 1), a fraction (<= 1) of the device's
    # memory, or "<n>GB", "<n>MB", "<n>%"
    oom_restarts: int = 3             # restarts at half the micro-batch after running out
    # mlxlab-train's parent ends a run that after its first step neither steps nor uses CPU time
    # nor reads or writes for this long (a hang: runtime/supervision/supervise.py); None: never
    stall_timeout_s: float | None = 600.0
    quantize_bits: int | None = None  # 2-8: quantize the best checkpoint, log its metrics too
    fused_kernels: str | bool = "auto"  # auto | on | off: the fused CPU kernels (kernels/)
    flush_denormals: bool = True      # CPU: floats below 1.2e-38 are 0 (kernels/denormals.py)
    monitor: str = "val/accuracy"     # the metric that picks the best checkpoint
    monitor_mode: str = "max"         # max | min: which way `monitor` improves
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model_schedule: list | None = None  # scheduled model operations (training/model_ops.py)
    requeue: bool = False             # SIGUSR1 (Slurm's time-limit warning): requeue the job

    def __post_init__(self) -> None:
        for name, kind in (("schedule", LRSchedule), ("batching", BatchingSettings),
                           ("distributed", DistributedConfig)):
            object.__setattr__(self, name, record(kind, getattr(self, name), f"trainer.{name}"))
        check_switches(self, "trainer")
        if self.max_epochs is None and self.max_steps is None:
            raise ConfigError("set trainer.max_epochs or trainer.max_steps")
        for key, kind, low in NUMBERS:
            value = getattr(self, key)
            if value is not None:
                check_number(f"trainer.{key}", value, kind, low)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_choice("trainer.quantize_bits", self.quantize_bits, QUANTIZE_BITS)
        check_choice("trainer.requeue", self.requeue, (None, True, False))
        check_choice("trainer.flush_denormals", self.flush_denormals, (True, False))
        check_choice("trainer.grad_checkpoint", self.grad_checkpoint,
                     (True, False, "mixers", "cores"))
        if str(self.fused_kernels).lower() not in (*kernels.MODES, "true", "false"):
            raise ConfigError(f"trainer.fused_kernels={self.fused_kernels!r}: expected auto, on "
                              "or off")
        check_micro_batch(self)
        object.__setattr__(self, "model_schedule", check_schedule(self.model_schedule) or None)
        check_sharded(self)

    def data_batching(self) -> Batching:
        """The batching the data module is asked for: batch_size with trainer.batching (its
        bucket_multiple, where null, this backend's)."""
        chosen = dataclasses.asdict(self.batching)
        if chosen["bucket_multiple"] is None:
            chosen["bucket_multiple"] = bucket_multiple_for(device.backend())
        return Batching(batch_size=self.batch_size, **chosen)


def bucket_multiple_for(backend: str) -> int:
    """Rows' padded widths where trainer.batching.bucket_multiple is null: multiples of 128 on a
    CUDA GPU, where MLX runs attention's backward as one fused cuDNN kernel only at lengths that
    are multiples of 128 (an H200's LoRA step of chats padded to 128 was 1.8x faster at
    Llama-3.2-1B than at 16, and 1.3x at 3B, for more positions: benchmarks/results, gpu-sizes-h200);
    16 elsewhere: fewer wasted positions, and a compile per width is cheap on the CPU."""
    return 128 if backend == "cuda" else 16


def check_sharded(settings: TrainerSettings) -> None:
    """What a model split over ranks (trainer.distributed.mode=fsdp|tensor) cannot do yet: each
    needs the whole model on one rank."""
    mode = settings.distributed.mode
    if not settings.distributed.sharded:
        return
    for key, value, why in (
            ("model_schedule", settings.model_schedule, "its operations rebuild whole layers"),
            ("micro_batch", settings.micro_batch == "auto",
             "its search measures a step of the whole model; give a number"),
            ("quantize_bits", settings.quantize_bits, "it quantizes the whole model in one "
             "process; quantize the finished run with `mlxlab export`")):
        if value:
            raise ConfigError(f"trainer.{key} does not work with trainer.distributed.mode={mode} "
                              f"({why}): unset one of them")


def check_micro_batch(settings: TrainerSettings) -> None:
    """trainer.micro_batch, memory_limit and oom_restarts (training/micro_batch.py reads them)."""
    micro, effective = settings.micro_batch, settings.batch_size * settings.grad_accum
    if micro is not None and micro != "auto":
        check_number("trainer.micro_batch", micro, int, 1)
        if effective % int(micro):
            raise ConfigError(
                f"trainer.micro_batch={micro} does not divide the effective batch "
                f"(trainer.batch_size x trainer.grad_accum = {effective}): use a divisor of it, "
                "or micro_batch=auto")
    if micro is not None and settings.batching.dynamic:
        raise ConfigError("trainer.micro_batch needs fixed batches: set trainer.batching."
                          "dynamic=false or trainer.micro_batch=null")
    if settings.memory_limit is not None:
        memory_limit(settings.memory_limit)
    check_number("trainer.oom_restarts", settings.oom_restarts, int, 0)


LIMIT_UNITS = {"gb": ("bytes", 1e9), "mb": ("bytes", 1e6), "%": ("fraction", 0.01)}


def memory_limit(value: float | str) -> tuple[str, float]:
    """trainer.memory_limit as ("bytes", n) or ("fraction", f) of the device's memory: a number
    above 1 is GB, one up to 1 a fraction; "0.5GB", "512MB" and "80%" say which."""
    text = str(value).strip().lower().replace(" ", "")
    unit = next((u for u in LIMIT_UNITS if text.endswith(u)), None)
    try:
        number = float(text[: -len(unit)] if unit else text)
    except ValueError:
        number = -1.0
    if isinstance(value, bool) or number <= 0 or (unit == "%" and number > 100):
        raise ConfigError(f"trainer.memory_limit={value!r}: give GB (e.g. 12), a fraction of the "
                          "device's memory (0.8), or 512MB, 0.5GB, 80%")
    if unit is None:
        return ("bytes", number * 1e9) if number > 1 else ("fraction", number)
    kind, scale = LIMIT_UNITS[unit]
    return kind, number * scale


# (field, type, lower bound) of TrainerSettings' numeric keys; None values are not checked.
NUMBERS = (
    ("max_epochs", int, 1), ("max_steps", int, 0), ("batch_size", int, 1),
    ("grad_accum", int, 1), ("grad_clip", float, 0.0),
    ("eval_every_steps", int, 1), ("log_every_steps", int, 1), ("stall_timeout_s", float, 1.0),
)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When and how the loop checkpoints (the `checkpoint` group: conf/checkpoint/).

    A settings record the loop reads, not a callback: its save points (evaluations, the
    step/minute cadence here, epoch ends, the end, a signal) write through a CheckpointManager
    and writer built from it (checkpointing.py); the best checkpoint follows the trainer's
    monitor (optimized_metric). A group of its own, apart from the callbacks, so resume and the
    best weights never depend on the callback list (`callbacks=none` still checkpoints); a
    Trainer built in code without one checkpoints with these defaults.
    """

    keep_last_n: int = 3            # step checkpoints kept (best/ apart)
    save_every_steps: int | None = None     # a checkpoint every N optimizer steps
    save_every_minutes: float | None = 10   # ... and every N minutes of wall clock
    async_write: bool = True        # a background thread writes; the step only takes a snapshot
    when_busy: str = "wait"         # wait | skip: a save due while the previous one still writes
    remote: str | None = None       # s3://bucket/prefix | gs://... | az://...
    remote_retries: int = 5         # per file, with doubling backoff from remote_backoff_s
    remote_backoff_s: float = 1.0
    remote_timeout_s: float = 60.0  # each network call; one past it counts as a failed try
    remote_final_wait_s: float = 120.0  # the run's end waits at most this long for an upload
    # true: every weight in every checkpoint (self-contained); false: a model whose frozen
    # weights are a pretrained base's (LoRA, DoRA, QLoRA) checkpoints its trained ones only
    save_base: bool = False

    def __post_init__(self) -> None:  # the owner checks its keys (config.validate builds it)
        check_number("checkpoint.keep_last_n", self.keep_last_n, int, 1)
        check_choice("checkpoint.when_busy", self.when_busy, WHEN_BUSY)
        if not isinstance(self.save_base, bool):  # "no" would be true
            raise ConfigError(f"checkpoint.save_base={self.save_base!r} is not one of "
                              "[true, false]")
        if self.remote:
            check_uri(str(self.remote))
