"""Every metric mlxlab logs, by its logged name: which way it improves and its range.

The definitions live where the metrics are computed (each objective's `metrics`,
stats/definitions.py SCORE_DEFINITIONS); this reads them for what has only a name in hand: a
sweep's verdict and `mlxlab runs compare --metric val/logps/rejected` (sweeps/store.metric_mode),
a mean's interval cut to the metric's range (sweeps/groups.metric_bounds). The objectives are
those conf/objective/ names (a new one joins by its file, nothing here names it), over the kinds
of data mlxlab has.
A name two objectives define in opposite ways is not defined here (the caller asks for --mode).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from mlxlab.objectives.base import Objective
from mlxlab.stats import SCORE_DEFINITIONS, MetricDefinition

# the kinds of mlxlab's data (base.data_kind: a data module's task, or prompts alone)
KINDS = ("classification", "lm", "preference", "unpaired", "prompts", "embedding", "speech")
# prefixes of a validation metric's logged name: val/, train/ (the loss's own aux), a quantized
# model's val_q4/, a best checkpoint's best/
PREFIX = re.compile(r"^(?:best/)?(?:val|train|val_q\d+)/")


@cache
def objective_classes() -> tuple[type[Objective], ...]:
    """The classes the shipped conf/objective/*.yaml name (their `_target_`)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from mlxlab.config import config_dir

    classes: list[type[Objective]] = []
    for path in sorted((Path(config_dir()) / "objective").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target:
            found = get_class(str(target))
            if found not in classes:
                classes.append(found)
    return tuple(classes)


@cache
def objective_metrics() -> dict[str, MetricDefinition | None]:
    """name -> definition over every objective and kind (None: defined two opposite ways)."""
    out: dict[str, MetricDefinition | None] = {}
    for cls in objective_classes():
        for kind in KINDS:
            for name, mine in cls.metrics(kind).definitions.items():
                if name in out and out[name] is not None and out[name].mode != mine.mode:
                    out[name] = None
                else:
                    out.setdefault(name, mine)
    return out


def metric_definition(metric: str) -> MetricDefinition | None:
    """The definition of a logged metric (`val/loss`, `best/val/rewards/accuracy`,
    `eval/<task>/acc`), None for one mlxlab does not define (or defines two ways)."""
    name = metric.removeprefix("best/")
    if name.startswith("eval/"):  # an lm-eval filter's score, acc.<filter>: the score's own
        score = name.split("/", 2)[-1]
        return SCORE_DEFINITIONS.get(score) or SCORE_DEFINITIONS.get(score.split(".", 1)[0])
    return objective_metrics().get(PREFIX.sub("", metric))
