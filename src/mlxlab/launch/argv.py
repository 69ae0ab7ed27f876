"""The command line checked before Hydra composes it: a group option that does not exist, a key
where the run has none, a key renamed since. Each is one line naming the fix, not Hydra's
multi-line report (exit 1)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from mlxlab.config.options import conf_yaml, experiment_choice, group_options, objective_keys
from mlxlab.config.retired import check_renamed
from mlxlab.errors import ConfigError

# Config groups whose option a user picks on the command line (group=option).
CHOICE_GROUPS = ("model", "data", "objective", "trainer", "preset", "optimizer", "callbacks",
                 "checkpoint", "tracking", "experiment", "debug", "hparams_search")
def check_group_choices(argv: list[str]) -> None:
    """`optimizer=adamx` fails here with one line listing the options, not with Hydra's
    multi-line "Could not find 'optimizer/adamx'" report. A user's own config folder
    (`--config-dir ./my_conf`) adds its files to the options."""
    own = config_dirs(argv)
    for arg in argv:
        check_renamed(arg)
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or key not in CHOICE_GROUPS or "(" in value or value in ("null", ""):
            continue
        options = sorted({*group_options(key), *(p.stem for d in own for p in d.glob(f"{key}/*.yaml"))})
        # a multirun sweep (a,b) or a list of options merged into one node ([mlflow,csv])
        listed = value.removeprefix("[").removesuffix("]").split(",")
        unknown = [v.strip() for v in listed if v.strip() not in options]  # Hydra allows "a, b"
        if options and unknown:
            raise ConfigError(f"{key}={unknown[0]} is not an option: choose one of {options} "
                              f"(the files in conf/{key}/)")


def check_misplaced_keys(argv: list[str]) -> None:
    """A key where the run has none is one line naming the key meant, not Hydra's multi-line
    "Key 'beta' is not in struct" (exit 1): `trainer.beta=0.3` (the objective's: objective.beta),
    `objective.label_smoothing=0.1` under objective=grpo (a setting of other objectives)."""

    def takers(name: str) -> str:
        return "|".join(o for o in group_options("objective") if name in (objective_keys(o) or ()))

    for arg in argv:
        key, eq, value = arg.partition("=")
        group, dot, name = key.partition(".")
        if not (eq and dot and name) or "." in name or group not in ("trainer", "objective"):
            continue  # (+key= adds a key on purpose: its class says whether it takes it)
        if group == "trainer" and takers(name) and name not in trainer_keys():
            raise ConfigError(f"{key} is not a key of trainer: did you mean objective.{name}="
                              f"{value}? (a setting of objective={takers(name)})")
        chosen = chosen_objective(argv) if group == "objective" else None
        keys = objective_keys(chosen) if chosen else None
        if keys is not None and name not in keys:
            where = (f"a setting of objective={takers(name)}" if takers(name)
                     else f"it takes {sorted(keys)}")
            raise ConfigError(f"{key} is not a setting of objective={chosen} ({where}): drop it, "
                              "or choose the objective it belongs to")


def trainer_keys() -> set[str]:
    from mlxlab.training.settings import TrainerSettings  # only for a trainer.<key> override

    return {f.name for f in fields(TrainerSettings)}


def chosen_objective(argv: list[str]) -> str | None:
    """The objective option a command line runs: its objective=, else its experiment's (and
    the experiments that one extends), else conf/train.yaml's; None when it cannot be told (a
    sweep over objectives, a user's own config folder)."""
    if config_dirs(argv):
        return None
    choices = dict(arg.lstrip("+").split("=", 1) for arg in argv if "=" in arg)
    value = choices.get("objective") or experiment_choice(choices.get("experiment"), "objective")
    value = value or next((d["objective"] for d in (conf_yaml(".", "train") or {}).get("defaults", [])
                           if isinstance(d, dict) and "objective" in d), None)
    return value if value and "," not in str(value) and "(" not in str(value) else None


def config_dirs(argv: list[str]) -> list[Path]:
    """The folders Hydra's --config-dir / -cd add to the config search path."""
    dirs = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            dirs.append(Path(value).expanduser())
    return dirs
