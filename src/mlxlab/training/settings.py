"""The Trainer's settings: one frozen, typed record per `trainer.*` group, each owning its checks,
and the checkpoint policy (`callbacks.checkpoint.*`, `CheckpointPolicy`).

`conf/trainer/*.yaml` builds a `TrainerSettings` (its `_target_`); the YAML stays as flat as the
keys are (`trainer.max_epochs`, `trainer.batch_size`), and the groups that nest there nest here
(`trainer.schedule`, `trainer.batching`, `trainer.distill`, `trainer.distributed`). A nested group
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
from mlxlab.config import check_choice, check_number, check_uri
from mlxlab.data.batching import Batching
from mlxlab.errors import ConfigError
from mlxlab.training.losses import check_distill_form
from mlxlab.training.model_ops import check_schedule
from mlxlab.training.optim import LRSchedule
from mlxlab.training.preference_losses import check_loss_name
from mlxlab.validation import record

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
QUANTIZE_BITS = (None, 2, 3, 4, 6, 8)  # what mlx.nn.quantize supports
DISTRIBUTED_MODES = ("auto", "on", "off", True, False)  # YAML's on/off arrive as booleans
WHEN_BUSY = ("wait", "skip")  # callbacks.checkpoint.when_busy (async_writer.py)


@dataclass(frozen=True)
class BatchingSettings:
    """`trainer.batching`: the data-side batching policy (data/batching.py `Batching`)."""

    dynamic: bool = False               # length-bucketed batches under a token budget
    max_batch_size: int | None = None   # dynamic only: cap on examples per batch
    max_tokens: int | None = None       # dynamic only: padded tokens per batch

    def __post_init__(self) -> None:
        if self.max_batch_size is not None:
            check_number("trainer.batching.max_batch_size", self.max_batch_size, int, 1)


@dataclass(frozen=True)
class DistillConfig:
    """`trainer.distill` (trainer=distill): teachers are finished runs, see conf/trainer/distill.yaml."""

    teachers: list[dict] = field(default_factory=list)  # [{run: <run dir>, weight: 1.0}, ...]
    alpha: float = 0.5            # weight of the hard-label CE; (1 - alpha) on the soft KL
    temperature: float = 2.0      # softens both distributions (kl, reverse_kl)
    cache_teacher: bool = True    # fixed datasets: teacher outputs computed once, looked up per step
    rounds: int = 1               # > 1: rounds of distillation (distill_rounds.py, run by train.py)
    round_teachers: str = "chain"  # chain | ensemble: who teaches round r + 1
    teacher_weights: str = "fixed"  # fixed | learned (training/teacher_weights.py)
    loss: str = "kl"              # kl | reverse_kl | mse: the soft term (losses.distillation_loss)
    kl_scale: str = "t2"          # t2: the KL times T^2 (Hinton) | none: alpha*CE + (1-alpha)*KL

    def __post_init__(self) -> None:
        check_distill_form(self.loss, self.kl_scale)  # one list of forms: losses.py
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"trainer.distill.rounds must be an integer >= 1, got {self.rounds!r}")
        check_choice("trainer.distill.round_teachers", self.round_teachers, ("chain", "ensemble"))
        check_choice("trainer.distill.teacher_weights", self.teacher_weights, ("fixed", "learned"))


REFERENCES = ("auto", "adapters", "copy", "cached")  # trainer.preference.reference


@dataclass(frozen=True)
class PreferenceConfig:
    """`trainer.preference` (trainer=dpo | orpo): the preference loss and its reference model,
    see conf/trainer/dpo.yaml and training/preference.py."""

    loss: str = "sigmoid"         # sigmoid (DPO) | ipo | orpo | simpo (preference_losses.py)
    beta: float = 0.1             # DPO/IPO's beta, ORPO's lambda, SimPO's beta (TRL's names)
    label_smoothing: float = 0.0  # sigmoid and simpo: the chance a preference is flipped
    gamma: float = 0.5            # simpo: the target reward margin
    reference: str = "auto"       # auto | adapters | copy | cached (sigmoid and ipo only)

    def __post_init__(self) -> None:
        check_loss_name(self.loss)
        check_number("trainer.preference.beta", self.beta, float, 0.0)
        if self.beta <= 0:
            raise ConfigError(f"trainer.preference.beta must be > 0, got {self.beta}")
        check_number("trainer.preference.label_smoothing", self.label_smoothing, float, 0.0)
        if self.label_smoothing >= 0.5:
            raise ConfigError("trainer.preference.label_smoothing must be below 0.5, got "
                              f"{self.label_smoothing}")
        check_number("trainer.preference.gamma", self.gamma, float)
        check_choice("trainer.preference.reference", self.reference, REFERENCES)
        # a setting the chosen loss would ignore is a mistake to say, not to swallow
        if self.label_smoothing > 0 and self.loss not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"trainer.preference.label_smoothing={self.label_smoothing} has no meaning for "
                f"loss={self.loss}: use loss=sigmoid or simpo, or label_smoothing=0")
        if self.reference != "auto" and self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(
                f"trainer.preference.reference={self.reference}: loss={self.loss} uses no "
                "reference model; leave reference=auto, or use loss=sigmoid or ipo")


@dataclass(frozen=True)
class DistributedConfig:
    """`trainer.distributed`: data parallelism under `mlx.launch -n N -- mlxlab train ...`."""

    mode: str | bool = "auto"     # auto = on when launched with > 1 rank | on (must be launched) | off
    timeout_s: float = 30.0       # a collective waiting longer (dead or hung rank) ends the process
    shard_optimizer: bool = False  # ZeRO-1: each rank keeps ~1/N of the optimizer state

    def __post_init__(self) -> None:
        check_choice("trainer.distributed.mode", self.mode, DISTRIBUTED_MODES)


@dataclass(frozen=True)
class TrainerSettings:
    """Every `trainer.*` key (conf/trainer/simple.yaml), read by the Trainer and its loop, never
    changed. Defaults are those of a Trainer built in code; the YAML sets its own."""

    schedule: LRSchedule = field(default_factory=LRSchedule)  # the learning rate over the run
    max_epochs: int | None = 10       # the run ends at max_epochs or max_steps, first come
    max_steps: int | None = None      # optimizer steps; overrides max_epochs when it ends first
    batch_size: int = 32              # examples per micro-batch, per rank under data parallelism
    grad_accum: int = 1               # micro-batches per optimizer step
    grad_clip: float = 1.0            # global-norm clip; 0 disables
    label_smoothing: float = 0.0      # of the cross-entropy targets
    eval_every_steps: int | None = None  # None: once per epoch (and at the end)
    log_every_steps: int = 10         # train/* metrics averaged over this many steps
    batching: BatchingSettings = field(default_factory=BatchingSettings)  # dynamic batches
    precision: str = "auto"           # auto (fp32 on CPU, bf16 where faster) | fp32 | bf16 | fp16
    compile: bool = True              # mx.compile the step
    grad_checkpoint: bool = False     # recompute each decoder block's activations in the backward
    memory_budget_mb: float | None = None  # halve the batch (doubling grad_accum) until a step fits
    quantize_bits: int | None = None  # 2-8: quantize the best checkpoint, log its metrics too
    fused_kernels: str | bool = "auto"  # auto | on | off: the fused CPU kernels (kernels/)
    flush_denormals: bool = True      # CPU: floats below 1.2e-38 are 0 (kernels/denormals.py)
    monitor: str = "val/accuracy"     # the metric that picks the best checkpoint
    monitor_mode: str = "max"         # max | min: which way `monitor` improves
    distill: DistillConfig | None = None  # None: plain training; else the distillation loss
    preference: PreferenceConfig | None = None  # a preference loss on data=preference pairs
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    model_schedule: list | None = None  # scheduled model operations (training/model_ops.py)
    requeue: bool = False             # SIGUSR1 (Slurm's time-limit warning): requeue the job

    def __post_init__(self) -> None:
        for name, kind in (("schedule", LRSchedule), ("batching", BatchingSettings),
                           ("distill", DistillConfig), ("preference", PreferenceConfig),
                           ("distributed", DistributedConfig)):
            object.__setattr__(self, name, record(kind, getattr(self, name), f"trainer.{name}"))
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
        check_choice("trainer.grad_checkpoint", self.grad_checkpoint, (True, False))
        if str(self.fused_kernels).lower() not in (*kernels.MODES, "true", "false"):
            raise ConfigError(f"trainer.fused_kernels={self.fused_kernels!r}: expected auto, on "
                              "or off")
        if self.distill and self.preference:
            raise ConfigError("trainer.distill and trainer.preference are two losses: set one")
        object.__setattr__(self, "model_schedule", check_schedule(self.model_schedule) or None)
        if self.model_schedule and self.distributed.shard_optimizer:
            raise ConfigError("trainer.model_schedule does not work with trainer.distributed."
                              "shard_optimizer yet: turn one of them off")

    def data_batching(self) -> Batching:
        """The batching the data module is asked for: batch_size with trainer.batching."""
        return Batching(batch_size=self.batch_size, **dataclasses.asdict(self.batching))


# (field, type, lower bound) of TrainerSettings' numeric keys; None values are not checked.
NUMBERS = (
    ("max_epochs", int, 1), ("max_steps", int, 1), ("batch_size", int, 1),
    ("grad_accum", int, 1), ("grad_clip", float, 0.0), ("label_smoothing", float, 0.0),
    ("eval_every_steps", int, 1), ("log_every_steps", int, 1),
)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When and how the loop checkpoints (`callbacks.checkpoint.*`).

    A settings record the loop reads, not a callback: its save points (evaluations, the
    step/minute cadence here, epoch ends, the end, a signal) write through a CheckpointManager
    and writer built from it (checkpointing.py); the best checkpoint follows the trainer's
    monitor (optimized_metric). It stays under `callbacks` in the config, where it has always
    been; train.py hands it to the Trainer apart from the callbacks. A run without it
    (`callbacks=none`) checkpoints with these defaults, as Lightning's enable_checkpointing does:
    resume and the best weights never depend on the callback list.
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

    def __post_init__(self) -> None:  # the owner checks its keys (config.validate builds it)
        check_number("callbacks.checkpoint.keep_last_n", self.keep_last_n, int, 1)
        check_choice("callbacks.checkpoint.when_busy", self.when_busy, WHEN_BUSY)
        if self.remote:
            check_uri(str(self.remote))
