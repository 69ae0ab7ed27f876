"""Keys a user may still type from habit: renamed ones (one line naming the new key) and retired
ones (one line naming what to write instead), on a command line or in a config file; and
modules that moved, which a `_target_` typed from habit or saved in an older run's checkpoint
still names (moved_target)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlxlab.errors import ConfigError

# Keys a user may still type from habit (the objective's settings were once under trainer):
# old key (or prefix, ending in ".") -> the key it is now.
RENAMED_KEYS = {"trainer.distill.": "objective.", "trainer.preference.": "objective.",
                "trainer.label_smoothing": "objective.label_smoothing"}


def check_renamed(arg: str) -> None:
    """One line naming the key a renamed or retired key is now (RENAMED_KEYS, RETIRED_KEYS)."""
    key, eq, value = arg.lstrip("+~").partition("=")
    check_retired(key, value if eq else None)
    for old, new in RENAMED_KEYS.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            now = new + key[len(old):] if old.endswith(".") else new
            raise ConfigError(f"{key} is renamed to {now}: write {now}{'=' + value if eq else ''}")


# Keys mlxlab reads no more, on a command line or in a config file: what to write instead, and
# why. One ending in "." is a node whose keys moved: `callbacks.checkpoint.keep_last_n` ->
# `checkpoint.keep_last_n`.
RETIRED_KEYS = {
    "trainer.memory_budget_mb": ("trainer.micro_batch=auto", "the largest micro-batch whose step "
                                 "fits trainer.memory_limit; grad_accum follows"),
    "sweep.skip_finished": ("nothing", "a grid run again continues its sweep by itself; "
                            "sweep.fresh=true starts a new one"),
    "callbacks.checkpoint.": ("checkpoint.", "the checkpoint policy is a group of its own"),
    "trainer.distributed.shard_optimizer": (
        "trainer.distributed.mode=fsdp", "MLX's fully_shard keeps 1/N of the parameters, "
        "gradients and optimizer state on each rank"),
}


def check_retired(key: str, value: str | None = None) -> None:
    """One line naming what replaces `key` (as typed: `value`) when RETIRED_KEYS holds it."""
    for old, (new, why) in RETIRED_KEYS.items():
        if old.endswith(".") and f"{key}.".startswith(old):
            moved = (new + key[len(old):]).rstrip(".")
            typed = f"={value}" if value is not None else ""
            raise ConfigError(f"{key} is {moved} now: write {moved}{typed} ({why})")
        if key == old:
            raise ConfigError(f"{key} is retired: write {new} ({why})")


def check_retired_keys(cfg: DictConfig) -> None:
    """A config file that still sets a key of RETIRED_KEYS is one line, before anything is built."""
    for old in RETIRED_KEYS:
        parent, _, leaf = old.rstrip(".").rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None)
        if OmegaConf.is_dict(node) and leaf in node:
            keys = list(node[leaf]) if OmegaConf.is_dict(node[leaf]) else []
            check_retired(f"{old}{keys[0]}" if old.endswith(".") and keys else old.rstrip("."))


# Modules whose `_target_` paths a checkpoint's saved config, or a user's own config, may still
# name: an older run's config names each objective's module at objectives/'s top, where today it
# stands in its family's folder (old module -> the module it is now).
_OBJECTIVE_FAMILIES = {
    "supervised": ("supervised", "distill", "gkd", "gkd_loss", "teacher_weights"),
    "preference": ("preference", "preference_losses", "kto", "reward"),
    "rl": ("grpo", "grpo_loss", "rewards", "agent", "environments", "lookup_tools", "tools",
           "tool_format", "tool_processes", "tool_worker", "sandbox"),
}
# ...and each model's module at models/'s top, where today it stands in its kind's folder (a run's
# saved `model._target_`, mlxlab.models.bert.BertClassifier, builds its model again from there).
_MODEL_KINDS = {
    "decoders": ("transformer", "mlx_lm_decoder", "mlx_lm_fused", "draft_layers", "remapped",
                 "packing"),
    "encoders": ("bert", "cnn_hybrid", "decoder_encoder", "modernbert_config",
                 "modernbert_encoder", "config_sizes"),
    "embedders": ("embedder", "embedder_model", "pooling", "sentence_folder",
                  "sentence_folder_save", "cross_encoder"),
    "vision": ("vision_language",),
    "adapters": ("adapter_layer", "lora", "lora_linear", "lora_qat", "lora_experts",
                 "routed_experts"),
    "quantized": ("quantize", "quantized_cpu", "quantized_product", "quantized_dora"),
    "layers": ("rope", "unpadding", "grad_checkpoint"),
}
MOVED_MODULES = {
    **{f"mlxlab.objectives.{name}": f"mlxlab.objectives.{family}.{name}"
       for family, names in _OBJECTIVE_FAMILIES.items() for name in names},
    **{f"mlxlab.models.{name}": f"mlxlab.models.{kind}.{name}"
       for kind, names in _MODEL_KINDS.items() for name in names},
}


def moved_target(target: str) -> str | None:
    """`target` (module.name) with its module's path today, when MOVED_MODULES holds it."""
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else None


def with_moved_targets(node: Any) -> Any:
    """A plain config tree (a checkpoint's saved config) with every `_target_` whose module
    moved (MOVED_MODULES) named by its path today; the rest as it was."""
    if isinstance(node, dict):
        return {key: (moved_target(value) or value)
                if key == "_target_" and isinstance(value, str) else with_moved_targets(value)
                for key, value in node.items()}
    if isinstance(node, list):
        return [with_moved_targets(value) for value in node]
    return node
