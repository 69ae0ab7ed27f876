"""On-policy distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes") as an objective of the one loop: the student learns from
its teachers on its own samples (objective=gkd, data=prompts).

Per batch of prompts the data module hands out (data/prompts.py: rows such as {"prompt": "3+4=",
"completion": "7"}), each prompt is completed, with probability `lmbda`, by the student itself
(objectives/rollouts.py: KV cache, GRPO's sampling settings, the objective's own mx.random key),
else by the dataset's completion (the `completion_key` column, cut at max_new_tokens): lmbda = 1 is
purely on-policy, 0 is off-policy distillation on the data (TRL's GKDTrainer flips one coin per
batch, here one per prompt: the same rate, a smoother mix). The loss (gkd_loss.py) is TRL's
generalized JSD with `beta` (0: forward KL, 1: reverse KL) between the teachers' and the student's
token distributions at `temperature`, on the completion tokens only (TRL 1.16's compute_loss calls
that function at temperature 1, its temperature only sampling; objective.temperature=1 trains TRL's
loss exactly). The teachers are distillation's
(a model folder or a finished run each, built by the node's `load_teachers`, several weighted:
losses.teacher_log_probs), frozen, run inside the compiled step; they must read the student's
token ids, which `check_config` checks on the tokenizer files before anything is built.

Each generated batch is trained by the step that draws it (no rollout outlives its step), so the
state is the generator's key (the coins and the samples) and the metric sums since the last
logged line: a run SIGKILLed between two steps resumes to the same bits (tests/test_gkd.py).

Metrics: train/loss (TRL's), train/on_policy_fraction (the rows the student completed) and TRL's
completions/mean_length, /min_length, /max_length, /clipped_ratio of the student's samples;
val/loss (TRL's eval_loss: the divergence on the validation prompts' dataset completions, the
student's greedy completion where a row has none), with the student's greedy completions logged
as the artifact gkd_samples/step_<step>.jsonl. With `draft_tokens` k > 0 (the student is a draft
for speculative decoding: experiment=draft_model), also val/acceptance (how often the student's
and the teacher's most likely next token agree on those completions), val/tokens_per_target_pass
and val/expected_speedup at k draft tokens a step (decoding/speculative.py draft_metrics).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from mlxlab.data.batching import Batch, Batching
from mlxlab.data.tokenizer import folder_tokenizer, vocabulary_difference
from mlxlab.decoding.speculative import draft_metrics
from mlxlab.errors import ConfigError
from mlxlab.models import num_parameters
from mlxlab.objectives import losses
from mlxlab.objectives.base import Evaluation, MetricSpec, Objective, ObjectiveSetup
from mlxlab.objectives.rollouts import Sampler, Sampling, check_sampling_config, completion_metrics
from mlxlab.objectives.supervised.gkd_loss import generalized_jsd
from mlxlab.objectives.supervised.teacher_weights import (
    TeacherLoader,
    build_teachers,
    check_teacher_specs,
)
from mlxlab.runtime import distributed
from mlxlab.stats import MetricDefinition
from mlxlab.tracking import tags as T

SAMPLES = "gkd_samples"


class GKD(Objective):
    """Generalized knowledge distillation on data=prompts (module docstring); the arguments
    are TRL's GKDConfig names (lmbda, beta, temperature, max_new_tokens) and GRPO's sampling
    (top_p, top_k, eval_temperature, log_completions)."""

    def __init__(self, teachers: Sequence[Mapping | str], lmbda: float = 0.5, beta: float = 0.5,
                 temperature: float = 0.9, max_new_tokens: int = 128, top_p: float = 1.0,
                 top_k: int = 0, eval_temperature: float = 0.0,
                 completion_key: str = "completion", log_completions: int = 8,
                 seed: int = 0, load_teachers: TeacherLoader | None = None,
                 draft_tokens: int = 0) -> None:
        if isinstance(teachers, DictConfig | ListConfig):
            teachers = OmegaConf.to_container(teachers, resolve=True)
        if not teachers:
            raise ConfigError("objective=gkd needs a teacher: set objective.teachers=[{run: "
                              "<model folder or finished run>, weight: 1.0}]")
        for key, value in (("lmbda", lmbda), ("beta", beta)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"objective.{key}={value} must be in [0, 1]")
        sampling, eval_sampling = Sampling.checked("max_new_tokens", max_new_tokens,
                                                   temperature, top_p, top_k, eval_temperature)
        check_teacher_specs(teachers)
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
            raise ConfigError(f"objective.draft_tokens={draft_tokens!r}: the draft tokens a "
                              "speculative step proposes (e.g. 3), or 0 for no draft metrics")
        self.draft_tokens = int(draft_tokens)
        self.teacher_specs, self.load_teachers = list(teachers), load_teachers
        self.lmbda, self.beta, self.temperature = float(lmbda), float(beta), float(temperature)
        self.completion_key = str(completion_key)
        self.sampler = Sampler(sampling, eval_sampling, seed, log_completions, SAMPLES)
        self.weights: list[float] = []

    @classmethod
    def check_config(cls, cfg: Any, kind: str | None) -> None:
        """data=prompts, and every teacher's tokenizer.json gives each token the id the
        student's gives it (the student's: data.tokenizer.path, else model.pretrained's, else the
        first teacher's, which train.py hands the data then)."""
        check_sampling_config(cls, cfg, kind)
        super().check_config(cfg, kind)
        _check_completion_column(cfg)
        specs = cfg.objective.get("teachers") or []
        given = (cfg.data.get("tokenizer") or {}).get("path") or cfg.model.get("pretrained")
        student = folder_tokenizer(given) if given and Path(str(given)).is_dir() else given
        for spec in specs:
            folder = str(spec if isinstance(spec, str) else spec.get("run"))
            theirs = folder_tokenizer(folder)
            if theirs is None:
                raise ConfigError(f"teacher {folder} has no tokenizer.json (in it or its run "
                                  "folder): objective=gkd scores the student's tokens with the "
                                  "teacher, so both must read one tokenizer; give a model "
                                  "folder or finished run with its tokenizer.json")
            if not student or not Path(str(student)).is_file():
                student = theirs  # the data reads the first teacher's tokenizer (train.py)
                continue
            differs = vocabulary_difference(student, theirs)
            if differs:
                raise ConfigError(f"teacher {folder} and the student tokenize differently "
                                  f"({differs}: {student} vs {theirs}): objective=gkd scores "
                                  "the student's tokens with the teacher, so both must share a "
                                  "tokenizer; pick a teacher of the student's family")

    # --- setup and state ------------------------------------------------------------------------

    def setup(self, setup: ObjectiveSetup) -> dict[str, str]:
        """The sampler, the teachers' log-probs; returns each teacher's weight as the run's tag."""
        data = self.sampler.setup(setup, "gkd")
        if self.lmbda < 1.0:
            lines = data.rows_without("train", self.completion_key)
            if lines:
                raise ConfigError(
                    f"{data.train_file}: {len(lines)} prompt rows (line {lines[0]} first) have "
                    f"no {self.completion_key!r} string, which objective.lmbda={self.lmbda} < 1 "
                    "trains on: add it, set objective.completion_key= to the column holding "
                    "completions, or objective.lmbda=1 (on-policy only)")
        teachers, weights = build_teachers(self.load_teachers, self.teacher_specs, data)
        # a draft's cost beside its target's, by parameters (the expected speed-up's)
        self._teacher_size = max(num_parameters(t) for t in teachers)
        self._teacher_logps = losses.teacher_log_probs(teachers, weights, self.temperature)
        self.weights = [w / sum(weights) for w in weights]
        return {T.DISTILL_TEACHER_WEIGHTS: str([round(w, 4) for w in self.weights])}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    # --- the batches it makes -------------------------------------------------------------------

    def probe_batch(self, data: Any, batching: Batching) -> Batch:
        """A batch of the run's first prompts, each with a completion of max_new_tokens."""
        return self.sampler.probe_batch(data, batching, 1)

    def probe_loss(self) -> None:
        return None  # it trains on completions it makes, not on the data's rows

    def train_batches(self, data: Any, batching: Batching, epoch: int,
                      model: nn.Module) -> Iterator[Batch]:
        """Per batch of prompts: one batch of the same rows, each completed by the student
        (probability lmbda) or by the dataset."""
        for prompt_batch in data.train_batches(batching, epoch):
            yield {k: mx.array(v) for k, v in
                   self._fill(model, data, np.array(prompt_batch["index"])).items()}

    def _fill(self, model: nn.Module, data: Any, index: np.ndarray) -> dict[str, np.ndarray]:
        _, ids, columns = data.prompts("train", index)
        coins = np.array(mx.random.uniform(shape=(len(ids),), key=self.sampler.next_key()))
        student = [i for i in range(len(ids)) if coins[i] < self.lmbda]
        completions = self._dataset_completions(data, columns, len(ids))
        sampled = self.sampler.sample(model, [ids[i] for i in student], 1) if student else []
        for i, completion in zip(student, sampled):
            completions[i] = completion
        logs = {"on_policy_fraction": len(student) / len(ids)}
        self.sampler.add_logs(logs | (completion_metrics(sampled, self.sampler.stop_ids)
                                      if sampled else {}))
        return self.sampler.batch(ids, completions, 1)

    def _dataset_completions(self, data: Any, columns: dict[str, list], rows: int
                             ) -> list[np.ndarray | None]:
        """The `completion_key` column's completions as tokens (cut at max_new_tokens), None
        for a row without one."""
        texts = columns.get(self.completion_key) or [None] * rows
        given = [i for i, t in enumerate(texts) if isinstance(t, str)]
        out: list[np.ndarray | None] = [None] * rows
        longest = self.sampler.sampling.max_new_tokens
        for i, ids in zip(given, data.encode_completions([texts[i] for i in given])):
            out[i] = ids[:longest]
        return out

    # --- the loss (compiled by the step) --------------------------------------------------------

    def loss(self, model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
        loss, _, tokens = generalized_jsd(model(batch["input_ids"]), self._teacher_logps(batch),
                                          batch["loss_mask"], self.beta, self.temperature)
        return loss, {"ntokens": tokens}

    # --- logs and evaluation --------------------------------------------------------------------

    def logs(self) -> dict[str, float]:
        """The rollouts' metrics averaged over the batches since the last logged line."""
        return self.sampler.logs()

    def evaluate(self, model: nn.Module, data: Any, batching: Batching,
                 world: distributed.World | None = None, prefix: str = "val",
                 step: int | None = None) -> Evaluation:
        """The divergence on every validation prompt's dataset completion (the student's greedy
        one where a row has none), `batching.batch_size` rows at a time; the student's greedy
        completions of the first log_completions prompts as the artifact
        gkd_samples/step_<step>.jsonl (none outside a fit, step None)."""
        n = len(data.val)
        prompts, ids, columns = data.prompts("val", np.arange(n))
        completions = self._dataset_completions(data, columns, n)
        missing = [i for i, c in enumerate(completions) if c is None]
        for i, completion in zip(missing, self.sampler.sample_eval(model, [ids[i] for i in missing])
                                 if missing else []):
            completions[i] = completion
        total, tokens, agreed = self._divergence(model, ids, completions,
                                                 max(1, batching.batch_size))
        if step is not None and self.sampler.log_completions:
            shown = min(n, self.sampler.log_completions)
            texts = self.sampler.texts(self.sampler.sample_eval(model, ids[:shown]))
            self.sampler.log_samples([{"prompt": p, "completion": t}
                                      for p, t in zip(prompts, texts)], step)
        metrics = {f"{prefix}/loss": total / max(tokens, 1.0)}
        if self.draft_tokens:
            metrics.update(draft_metrics(agreed / max(tokens, 1.0), self.draft_tokens,
                                         num_parameters(model) / self._teacher_size, prefix))
        return Evaluation(metrics)

    def _divergence(self, model: nn.Module, ids: list[np.ndarray],
                    completions: list[np.ndarray], rows: int) -> tuple[float, float, float]:
        """(the divergence summed over the completions' tokens, their count, how many of them
        the student's and the teacher's most likely next token agree on), in eval mode."""
        training = model.training
        model.eval()
        total, tokens, agreed = 0.0, 0.0, 0.0
        try:
            for start in range(0, len(ids), rows):
                batch = {k: mx.array(v) for k, v in self.sampler.batch(
                    ids[start:start + rows], completions[start:start + rows], 1).items()}
                logits, teacher = model(batch["input_ids"]), self._teacher_logps(batch)
                _, per_token, count = generalized_jsd(logits, teacher, batch["loss_mask"],
                                                      self.beta, self.temperature)
                total += float((per_token * batch["loss_mask"]).sum())
                tokens += float(count)
                same = logits.argmax(axis=-1) == teacher.argmax(axis=-1)
                agreed += float((same * batch["loss_mask"]).sum())
        finally:
            model.train(training)
        return total, tokens, agreed

    @classmethod
    def metrics(cls, kind: str | None) -> MetricSpec:
        if kind != "prompts":  # prompts for a language model (data=prompts) only
            return MetricSpec()
        return MetricSpec({"loss": MetricDefinition("min", 0.0),
                           "acceptance": MetricDefinition("max", 0.0, 1.0),
                           "tokens_per_target_pass": MetricDefinition("max", 1.0),
                           "expected_speedup": MetricDefinition("max", 0.0)})


def _check_completion_column(cfg: Any) -> None:
    """objective.lmbda < 1 trains on the dataset's completions: a prompt file none of whose rows
    has the `completion_key` column is refused before the run folder exists (a file where only
    some rows lack it is named row by row at setup)."""
    from mlxlab.data.prompts import read_prompts

    lmbda = cfg.objective.get("lmbda", 0.5)
    train_file = OmegaConf.select(cfg, "data.train_file", default=None)
    if lmbda is None or float(lmbda) >= 1.0 or not train_file or not Path(str(train_file)).is_file():
        return
    key = str(cfg.objective.get("completion_key") or "completion")
    rows = read_prompts(train_file, str(cfg.data.get("prompt_key") or "prompt"),
                        str(cfg.data.get("messages_key") or "messages"))
    if not any(isinstance(row.get(key), str) for _, row in rows.rows):
        raise ConfigError(f"{train_file}: no prompt row has a {key!r} string, which "
                          f"objective.lmbda={lmbda} < 1 trains on: set objective.completion_key= "
                          "to the column holding completions (a chat ending with the "
                          "assistant's reply has it as 'completion'), or objective.lmbda=1 "
                          "(on-policy only)")
