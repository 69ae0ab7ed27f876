"""Teachers of the objectives that learn from them (distill, gkd): built from the config's
specs by the loader their node names (`load_teachers`, a Hydra partial of runs.load_teachers),
and learned weights for an ensemble of them (`objective=distill
objective.teacher_weights=learned`).

The weights w = softmax(theta) that minimise the cross-entropy of the mixture sum_k w_k p_k(x)
(each teacher at temperature 1) on the student's training rows: a teacher that is right where the
others are wrong gets more say. The teachers never trained on the student's validation rows
(the split is fixed before they train), so the weights are fitted without looking at them.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxlab.config.records import check_number
from mlxlab.errors import ConfigError
from mlxlab.models.sources import describe
from mlxlab.objectives import losses

# (teacher specs, vocab_size, num_labels, label_names) -> (frozen teacher models, weights): how an
# objective that learns from finished runs builds their models, handed in by its config node
# (conf/objective/distill.yaml: runs.load_teachers), since objectives/ never reaches up into runs
TeacherLoader = Callable[[list, int, "int | None", "list[str] | None"],
                         tuple[list[nn.Module], list[float]]]

log = logging.getLogger(__name__)


TEACHER_KEYS = ("run", "weight")


def check_teacher_specs(specs: Sequence | None) -> None:
    """objective.teachers as config validation checks it, nothing loaded or downloaded: each
    entry a source (`run: <path>` or the path itself) that exists where it is a path, keys
    `run` and `weight` only, a weight a number >= 0; else one ConfigError line naming the
    entry's key."""
    for i, spec in enumerate(specs or []):
        key = f"objective.teachers[{i}]"
        spec = {"run": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key} is {spec!r}: give {{run: <finished run or model folder>, "
                              "weight: 1.0}")
        for name in spec:
            if name not in TEACHER_KEYS:
                near = difflib.get_close_matches(str(name), TEACHER_KEYS, 1)
                raise ConfigError(f"{key}.{name} is not a teacher's key: "
                                  + (f"did you mean {near[0]}?" if near else
                                     f"a teacher takes {list(TEACHER_KEYS)}"))
        run = spec.get("run")
        if not run or not isinstance(run, str):
            raise ConfigError(f"{key} needs run=<finished run dir, model folder, GGUF file or "
                              "hub id>")
        if describe(run) == "unknown" and not Path(run).expanduser().exists():
            raise ConfigError(f"{key}.run={run} does not exist: give a finished run's folder, a "
                              "model folder, a .gguf file, ollama:NAME or a hub id ORG/NAME")
        check_number(f"{key}.weight", spec.get("weight", 1.0), float, 0.0)


def build_teachers(load: TeacherLoader | None, specs: list, data: Any
                   ) -> tuple[list[nn.Module], list[float]]:
    """(the frozen teacher models, their weights) of objective.teachers, built by `load` for the
    outputs of the student's `data`."""
    if load is None:
        raise ConfigError("objective.load_teachers is not set: an objective with teachers builds "
                          "them with it (conf/objective/distill.yaml: {_target_: "
                          "mlxlab.runs.load_teachers, _partial_: true})")
    return load(specs, data.vocab_size, data.num_labels, data.label_names)


def teacher_label_probs(teachers: Sequence[nn.Module], batches: Iterable[dict],
                        max_batches: int = 50) -> tuple[mx.array, mx.array]:
    """(p, mask): p[k, i] = teacher k's probability of the label of row/token i, and i's weight
    (loss_mask for language models, 1 for classifiers)."""
    columns, masks = [], []
    for n, batch in enumerate(batches):
        if n == max_batches:
            break
        per_teacher = []
        for teacher in teachers:
            logp = nn.log_softmax(losses.forward(teacher, batch).astype(mx.float32), axis=-1)
            picked = mx.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
            per_teacher.append(mx.exp(picked).reshape(-1))
        mask = batch.get("loss_mask")
        masks.append(mx.ones(per_teacher[0].shape) if mask is None else mask.reshape(-1))
        columns.append(mx.stack(per_teacher))
        mx.eval(columns[-1], masks[-1])
    return mx.concatenate(columns, axis=1), mx.concatenate(masks)


def fit_teacher_weights(teachers: Sequence[nn.Module], batches: Iterable[dict],
                        steps: int = 300, learning_rate: float = 0.1) -> list[float]:
    """Mixture weights (summing to 1) that minimise the mixture's cross-entropy on `batches`."""
    p, mask = teacher_label_probs(teachers, batches)
    theta = {"theta": mx.zeros((len(teachers),))}

    def nll(params: dict) -> mx.array:
        w = mx.softmax(params["theta"])
        mixture = (w[:, None] * p).sum(axis=0)
        return -(mx.log(mx.maximum(mixture, 1e-12)) * mask).sum() / mx.maximum(mask.sum(), 1.0)

    opt = optim.Adam(learning_rate=learning_rate)
    grad_fn = mx.value_and_grad(nll)
    start = float(nll(theta))
    for _ in range(steps):
        loss, grads = grad_fn(theta)
        theta = opt.apply_gradients(grads, theta)
        mx.eval(theta, opt.state)
    weights = mx.softmax(theta["theta"]).tolist()
    log.info("distillation: learned teacher weights %s (mixture CE %.4f -> %.4f)",
             [round(w, 3) for w in weights], start, float(nll(theta)))
    return weights
