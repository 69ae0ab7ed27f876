"""Whether the objective and the data fit together, asked of their classes before anything is
built: the data's kind, the objective's inputs and metrics, and one line naming what fits."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from mlxlab.config.options import conf_yaml, experiment_choice, group_options, target_of
from mlxlab.errors import ConfigError


def _check_optimized_metric(cfg: DictConfig, build: Callable[[Any], Any]) -> None:
    """The objective trains on this data's task, and optimized_metric is something its
    evaluation computes for it: the objective class says both (Objective.check_data and
    metric_directions, objectives/base.py), and the objective built from its node what it
    reports as configured (reported_metrics; `build` makes it, once)."""
    from hydra.utils import get_class

    try:
        task = getattr(get_class(cfg.data._target_), "task", None)
        objective = get_class(cfg.objective._target_)
        check_data, metrics = objective.check_data, objective.metric_directions(task)
    except Exception:  # an unknown target fails at instantiation with Hydra's own message
        return
    if task is not None:
        try:
            check_data(task)
        except ConfigError as err:
            raise ConfigError(f"{err}; {_data_kind_line(cfg, task, False)}") from None
    names, what = [f"val/{m}" for m in metrics], objective.__name__
    if names and cfg.get("optimized_metric") in names:
        # the class names every metric of its kind; the objective as configured may log fewer
        # (ORPO's nll_loss is not DPO's): a monitor never logged keeps no best checkpoint
        built = build(cfg.objective)
        names, what = [f"val/{m}" for m in built.reported_metrics(task)], repr(built)
    if names and cfg.get("optimized_metric") not in names:
        raise ConfigError(
            f"optimized_metric={cfg.get('optimized_metric')!r} is not computed for {task} data "
            f"by objective {what}: choose one of {names}"
        )


def _check_objective_inputs(cfg: DictConfig) -> None:
    """What the config names for the objective fits together (Objective.check_inputs: e.g. a
    teacher reads the student's token ids), asked of the class before anything is built."""
    from hydra.utils import get_class

    try:
        check = get_class(cfg.objective._target_).check_inputs
    except Exception:  # an unknown target fails at instantiation with Hydra's own message
        return
    check(cfg)


def _check_memory_probe(cfg: DictConfig) -> None:
    """The memory probes (trainer.memory_budget_mb, trainer.micro_batch=auto) step on the data
    module's batches; an objective that makes its own (GRPO's rollouts) would be measured on
    the wrong ones, so the two are refused together rather than the setting ignored."""
    from hydra.utils import get_class

    try:
        objective = get_class(cfg.objective._target_)
    except Exception:  # an unknown target fails at instantiation with Hydra's own message
        return
    trainer = cfg.get("trainer") or {}
    probes = [f"trainer.{key}={trainer.get(key)}" for key in ("memory_budget_mb", "micro_batch")
              if trainer.get(key) not in (None, 0) and (key != "micro_batch"
                                                       or trainer.get(key) == "auto")]
    if getattr(objective, "makes_batches", False) and probes:
        raise ConfigError(
            f"{', '.join(probes)}: objective {objective.name} makes its batches while it trains, "
            "and the memory probe measures the data's: set trainer.memory_budget_mb=null and a "
            "fixed trainer.micro_batch (preset=production sets memory_budget_mb=8000)")


def _check_prompts_only(cfg: DictConfig) -> None:
    """Data of prompts alone (data=prompts) trains only under an objective that makes its
    batches from them; another would meet rows without tokens to train on (a KeyError deep in
    the first step before this check)."""
    from hydra.utils import get_class

    try:
        data, objective = get_class(cfg.data._target_), get_class(cfg.objective._target_)
    except Exception:  # an unknown target fails at instantiation with Hydra's own message
        return
    prompts, samples = getattr(data, "prompts_only", False), getattr(objective, "makes_batches",
                                                                       False)
    if prompts and not samples:
        raise ConfigError(
            f"data {data.__name__} holds prompts without completions, and objective "
            f"{objective.__name__} trains on the data's rows: pick an objective that samples "
            "completions (objective=grpo, experiment=grpo_*), or data=completions / data=chat "
            f"for supervised fine-tuning; {_data_kind_line(cfg, data.task, prompts)}")
    if samples and not prompts:
        raise ConfigError(
            f"objective {objective.__name__} samples completions of prompts (data=prompts), "
            f"not of {data.__name__}'s rows; {_data_kind_line(cfg, data.task, prompts)}")


# What each data kind is, in words (a data module's `task`; "prompts": prompts_only data)
DATA_KINDS = {"classification": "labelled rows for classification", "lm": "text or chats to "
              "learn (language-model data)", "preference": "preference pairs",
              "prompts": "prompts without completions"}


def _data_kind_line(cfg: DictConfig, task: str, prompts: bool) -> str:
    """What a mismatch line says of the data: its option and kind, the keys its rows have, and
    the objectives and experiments that train on data of that kind."""
    from hydra.core.hydra_config import HydraConfig

    kind = "prompts" if prompts else task
    option = None
    if HydraConfig.initialized():
        option = HydraConfig.get().runtime.choices.get("data")
    named = f"data={option}" if option else f"data {cfg.data._target_.rsplit('.', 1)[-1]}"
    keys = _row_keys(cfg.data)
    has = f" (its rows have {keys})" if keys else ""
    fits = [o for o in group_options("objective") if _fits(("objective", o), kind)]
    experiments = [e for e in group_options("experiment") if _data_of(e) == kind]
    return (f"{named} is {DATA_KINDS.get(kind, kind)}{has}: the objectives that train on it: "
            f"{'objective=' + '|'.join(fits) if fits else 'none shipped'}"
            + (f", as in experiment={'|'.join(experiments)}" if experiments else ""))


def _row_keys(node: DictConfig) -> list[str] | None:
    """The keys of the first row of the data's file (a jsonl's, a csv's columns), None when
    it cannot be read cheaply."""
    path = next((node.get(k) for k in ("train_file", "path") if node.get(k)), None)
    try:
        with open(str(path), encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        if str(path).endswith(".csv"):
            return [c.strip() for c in first.rstrip("\n").split(",")]
        row = json.loads(first)
        return sorted(row) if isinstance(row, dict) else None
    except Exception:  # no file yet, not text: the line goes without its keys
        return None


def _fits(option: tuple[str, str], kind: str) -> bool:
    """Whether conf/objective/<option>.yaml's class trains on data of `kind`."""
    from hydra.utils import get_class

    try:
        objective = get_class(str(target_of(*option)))
        objective.check_data("lm" if kind == "prompts" else kind)
    except Exception:
        return False
    return bool(getattr(objective, "makes_batches", False)) == (kind == "prompts")


def _data_of(experiment: str) -> str | None:
    """The kind of data experiment=<option> trains on (None: it cannot be told)."""
    from hydra.utils import get_class

    train = {k: v for d in (conf_yaml(".", "train") or {}).get("defaults", []) if isinstance(d, dict)
             for k, v in d.items()}
    option = experiment_choice(experiment, "data") or train.get("data")
    try:
        data = get_class(str(target_of("data", str(option))))
    except Exception:
        return None
    return "prompts" if getattr(data, "prompts_only", False) else getattr(data, "task", None)


# Config groups whose option a user picks on the command line (group=option).
