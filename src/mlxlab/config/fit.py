"""Whether the objective and the data fit together, asked of their classes before anything is
built: the data's kind, the objective's inputs and metrics, and one line naming what fits."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from mlxlab.config.options import conf_yaml, experiment_choice, group_options, target_of
from mlxlab.errors import ConfigError, DataMismatch


def _check_objective(cfg: DictConfig) -> None:
    """The objective's own checks of the composed config (Objective.check_config, asked of its
    class before anything is built): the kind of data it trains on, an optimized_metric it
    reports, its settings together (models whose tokenizers must agree). A line about
    the data adds what the data is and which objectives train on it."""
    from hydra.utils import get_class

    try:
        data, check = get_class(cfg.data._target_), get_class(cfg.objective._target_).check_config
    except Exception:  # an unknown target (or no Objective) fails at instantiation or at fit
        return
    prompts, task = getattr(data, "prompts_only", False), getattr(data, "task", None)
    try:
        check(cfg, "prompts" if prompts else task)
    except DataMismatch as err:
        raise ConfigError(f"{err}; {_data_kind_line(cfg, task, prompts)}") from None


def _check_packing(cfg: DictConfig) -> None:
    """data.pack=true, asked of the classes before anything is built: the objective trains on the
    data's own batches (GRPO's and GKD's are their own: packing would be ignored), no callback
    reads per-row values (a packed row holds several), and the model keeps packed rows apart
    (its class's check_packing, models/base.py: mlx-lm's architectures traced lazily)."""
    from hydra.utils import get_class

    if OmegaConf.select(cfg, "data.pack", default=False) is not True:
        return
    objective = get_class(cfg.objective._target_)
    if objective.train_batches.__qualname__ != "Objective.train_batches":
        raise ConfigError(f"data.pack=true: objective {objective.__name__} makes its own "
                          "training batches, which are not packed; set data.pack=false")
    if OmegaConf.select(cfg, "callbacks.per_example_losses", default=None):
        raise ConfigError("data.pack=true: callbacks.per_example_losses records one loss per "
                          "batch row and a packed row holds several examples; set "
                          "data.pack=false or drop the callback")
    model = get_class(cfg.model._target_)
    check = getattr(model, "check_packing", None)
    if check is None:  # a _target_ that is no mlxlab Model
        raise ConfigError(f"data.pack=true: {model.__name__} does not take packed rows; set "
                          "data.pack=false")
    check(OmegaConf.to_container(cfg.model, resolve=True))


def _check_tensor_parallel(cfg: DictConfig) -> None:
    """trainer.distributed.mode=tensor, asked of the model's class before anything is built
    (its check_tensor_parallel, models/base.py: a MoE's routed experts are refused)."""
    from hydra.utils import get_class

    if OmegaConf.select(cfg, "trainer.distributed.mode", default=None) != "tensor":
        return
    check = getattr(get_class(cfg.model._target_), "check_tensor_parallel", None)
    if check is not None:
        check(OmegaConf.to_container(cfg.model, resolve=True))


def _check_compile(cfg: DictConfig) -> None:
    """trainer.compile=true with a model whose forward mx.compile cannot trace (its class's
    `compiles`, models/base.py): one line, before anything is built."""
    from hydra.utils import get_class

    if OmegaConf.select(cfg, "trainer.compile", default=False) is not True:
        return
    try:
        model = get_class(cfg.model._target_)
    except Exception:  # an unknown target fails at instantiation
        return
    if getattr(model, "compiles", True) is False:
        raise ConfigError(f"trainer.compile=true: {model.__name__}'s forward pass reads array "
                          "values on the host, which mx.compile cannot trace; set "
                          "trainer.compile=false (experiment=finetune_vision does)")


# What each data kind is, in words (a data module's `task`; "prompts": prompts_only data)
DATA_KINDS = {"classification": "labelled rows for classification", "lm": "text or chats to "
              "learn (language-model data)", "preference": "preference pairs",
              "unpaired": "completions rated good or bad (unpaired feedback)",
              "prompts": "prompts without completions",
              "embedding": "text columns for training embedders",
              "speech": "audio and transcripts (speech)"}


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
        return bool(get_class(str(target_of(*option))).metrics(kind).definitions)
    except Exception:
        return False


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
