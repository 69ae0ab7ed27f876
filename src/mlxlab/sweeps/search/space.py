"""A search space in Hydra's override grammar, as Optuna distributions.

`hydra.sweeper.params` (conf/hparams_search/*.yaml) and sweeps on the command line name what a
search varies, in the grammar Hydra users already write:

    optimizer.learning_rate: tag(log, interval(1e-4, 3e-3))   # FloatDistribution(log=True)
    model.dropout: interval(0.0, 0.3)                         # FloatDistribution
    model.hidden_size: choice(64, 128, 192)                   # CategoricalDistribution
    model.num_layers: range(1, 3)                             # IntDistribution(1, 3): 1, 2, 3

`range(a, b)` here includes b, as hydra-optuna-sweeper read it (the search spaces written for
it keep their meaning); intervals of two integers are integer distributions. Every other
override (`trainer.max_epochs=5`) is fixed: each trial gets it as written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlxlab.errors import ConfigError


def split_space(params: Mapping[str, Any] | None, arguments: Sequence[str]
                ) -> tuple[dict[str, Any], list[str]]:
    """({key: optuna distribution}, fixed overrides) from the config's params and the command
    line (a key on the command line wins over the same key in params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {str(k): f"{k}={v}" for k, v in (params or {}).items()}
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        given[key] = argument
    distributions, fixed = {}, []
    for text in given.values():
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except Exception as err:  # Hydra's parse error: one line with the override
            raise ConfigError(f"search space: cannot read {text!r}: {err}") from None
        key = override.get_key_element()
        if override.is_sweep_override():
            distributions[key.lstrip("+~")] = distribution_of(override)
        else:
            fixed.append(text)
    return distributions, fixed


def distribution_of(override: Any) -> Any:
    """The Optuna distribution of one parsed sweep override."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value, key = override.value(), override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"search space: {key} uses a sweep the search cannot sample "
                      "(use choice(...), range(a, b), interval(a, b) or tag(log, interval(a, b)))")


def override_text(key: str, value: Any) -> str:
    """`key=value` as Hydra reads it back (true/false/null, numbers as written)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return f"{key}={text}"
