"""A task scored on a loaded language model: each example's scores kept, the task's metrics
computed from them.

The model is any mlxlab decoder (`model(input_ids) -> logits`: a training run's model at an
evaluation, a finished run's, a Hugging Face / mlx-lm / exported folder's) and the tokenizer the
`tokenizers` one it reads ids of. Prompts are plain text after the tokenizer's BOS, as the
training data lays them out (data/completions.py), or, for a chat model, its chat template's
rendering of one user turn with the generation prompt (data/chat.py, `chat_template`): the
answer follows the assistant turn's start, and generation stops at the template's end of turn.

Multiple choice follows lm-eval-harness (`HFLM._encode_pair`, `_loglikelihood_tokens`,
`ConfigurableTask.process_results`): the continuation is " " + choice (trailing whitespace of
the prompt moves onto it), its ids are those of prompt + continuation after the prompt's ids,
inputs longer than the model's context keep their last max_seq_len tokens, the log-likelihood is
the float32 log-softmax summed over the continuation; acc is the argmax (the first of equals),
acc_norm the argmax of log-likelihood / len(choice) in characters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from mlxlab.data.chat import ChatTemplate
from mlxlab.data.tokenizer import EOT_TOKENS, start_ids
from mlxlab.decoding.batched_greedy import greedy_batch
from mlxlab.errors import ConfigError
from mlxlab.evaluation.settings import TaskSettings
from mlxlab.evaluation.task_scores import TaskScores, eval_mode
from mlxlab.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, TRANSCRIPTION, Example, Task
from mlxlab.models.base import Model
from mlxlab.runtime.progress import Progress

log = logging.getLogger(__name__)

TARGET_DELIMITER = " "  # lm-eval's default between a prompt and a choice


class Prompts:
    """How a prompt becomes ids: plain text after BOS (the tokenizer's start ids, else its
    end-of-text as lm-eval's prefix token), or, with a chat `template`, the user turn rendered
    with the generation prompt (the template writes its own BOS and the assistant turn's start;
    its special tokens are parsed). A generation stops at any of `stops`: with a template, its
    end of turn and the model's end-of-text tokens (ChatTemplate.stop_tokens: Phi-3's <|end|>,
    Gemma's <end_of_turn>), else the end-of-text."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None = None) -> None:
        self.tokenizer, self.template = tokenizer, template
        ends = template.stop_tokens if template is not None else EOT_TOKENS
        stops = [i for i in (tokenizer.token_to_id(t) for t in ends) if i is not None]
        # a plain prompt of a tokenizer none of EOT_TOKENS names (Gemma's <eos>) has no stop id:
        # its generations end at max_new_tokens or the task's stop strings, its prompts after BOS
        self.eot: int | None = stops[0] if stops else None
        self.stops = frozenset(stops[:1] if template is None else stops)
        self.start = [] if template is not None else start_ids(tokenizer)
        # a chat template's assistant turn begins right after it: no space before the answer
        self.delimiter = "" if template is not None else TARGET_DELIMITER

    def text(self, prompt: str) -> str:
        if self.template is None:
            return prompt
        return self.template.render([{"role": "user", "content": prompt}],
                                    add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """`text` after the start ids (BOS); an empty result starts from end-of-text."""
        ids = [*self.start, *self.tokenizer.encode(text, add_special_tokens=False).ids]
        if not ids and self.eot is None:
            raise ConfigError("an empty prompt needs a token to start from, and this tokenizer "
                              "adds no BOS and has none of the end-of-text tokens "
                              f"{list(EOT_TOKENS)}: give the example a prompt")
        return ids or [self.eot]


def score_task(model: Model, tokenizer: Tokenizer, task: Task,
               settings: TaskSettings | None = None,
               template: ChatTemplate | None = None) -> TaskScores:
    """`task` scored on `model` (left in the mode it was in). `template`: a chat model's chat
    template, through which its prompts are rendered (None: plain prompts; chat_template). A
    transcription task is a Whisper model's (evaluation/speech/scoring.py)."""
    settings = settings or TaskSettings()
    if task.kind == TRANSCRIPTION:  # a Whisper's: its tokenizer is transformers' WhisperTokenizer
        from mlxlab.evaluation.speech.scoring import score_transcription

        return score_transcription(model, tokenizer, task, settings)
    prompts = Prompts(tokenizer, template)
    with eval_mode(model):
        if task.kind == MULTIPLE_CHOICE:
            scores = _multiple_choice(model, prompts, task, settings.batch_size)
        elif task.kind == GENERATION:
            scores = _generation(model, prompts, task, settings)
        else:
            scores = _perplexity(model, prompts, task, settings.batch_size)
    scores.prompts = "plain" if template is None else "chat template"
    return scores


def _context_length(model: Model) -> int:
    if not isinstance(model, Model):
        raise TypeError(f"{type(model).__name__} is not a model of mlxlab (models/base.py "
                        "Model): task scoring reads its max_seq_len and make_cache")
    return int(model.max_seq_len)


# --- multiple choice -------------------------------------------------------------------------


def encode_pair(prompts: Prompts, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: (context ids, continuation ids), the continuation's ids those of
    the whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = prompts.encode(context + continuation)
    head = prompts.encode(context)
    return head, whole[len(head):]


def loglikelihoods(model: Model, requests: Sequence[tuple[list[int], list[int]]],
                   batch_size: int, progress: Progress | None = None
                   ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) of
    each (context ids, continuation ids), in the order given. Right-padded batches: under causal
    attention the padding after a row never changes the row. `progress` counts the requests
    scored."""
    limit = _context_length(model)
    inputs, targets = [], []
    for context, continuation in requests:
        if not continuation:
            raise ConfigError("a choice encodes to no tokens after its prompt: give non-empty "
                              "choices")
        whole = (context + continuation)[-(limit + 1):]
        if len(continuation) > len(whole) - 1:
            raise ConfigError(f"a choice of {len(continuation)} tokens does not fit the model's "
                              f"context of {limit}")
        inputs.append(whole[:-1])
        targets.append(len(continuation))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths batched
    out: list[tuple[float, bool]] = [(math.nan, False)] * len(inputs)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(inputs[i]) for i in rows)
        ids = np.zeros((len(rows), width), np.int32)
        labels = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for r, i in enumerate(rows):
            context, continuation = requests[i]
            whole = (context + continuation)[-(limit + 1):]
            n = len(whole) - 1
            ids[r, :n] = whole[:-1]
            labels[r, :n] = whole[1:]
            mask[r, n - targets[i]:n] = 1.0
        logits = model(mx.array(ids)).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, mx.array(labels)[..., None], axis=-1)[..., 0]
        m = mx.array(mask)
        total = (picked * m).sum(axis=-1)
        greedy = ((logits.argmax(axis=-1) == mx.array(labels)) | (m == 0)).all(axis=-1)
        mx.eval(total, greedy)
        for r, i in enumerate(rows):
            out[i] = (float(total[r].item()), bool(greedy[r].item()))
        if progress is not None:
            progress.add(len(rows))
    return out


def _multiple_choice(model: Model, prompts: Prompts, task: Task, batch_size: int
                     ) -> TaskScores:
    requests, owner = [], []
    for k, ex in enumerate(task.examples):
        context = prompts.text(ex.prompt)
        for choice in ex.choices:
            requests.append(encode_pair(prompts, context, prompts.delimiter + choice))
            owner.append(k)
    progress = Progress(f"task {task.name}", len(requests), "choices", log)
    try:
        results = loglikelihoods(model, requests, batch_size, progress)
    finally:
        progress.close()
    rows, at = [], 0
    for ex in task.examples:
        lls = np.array([ll for ll, _ in results[at:at + len(ex.choices)]])
        greedy = [g for _, g in results[at:at + len(ex.choices)]]
        at += len(ex.choices)
        lengths = np.array([float(len(c)) for c in ex.choices])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
        rows.append({"id": ex.id, "acc": float(pred == ex.answer),
                     "acc_norm": float(pred_norm == ex.answer), "pred": pred,
                     "pred_norm": pred_norm, "answer": ex.answer,
                     "loglikelihoods": lls.tolist(), "greedy": greedy})
    return TaskScores(task.name, task.kind, _means(rows, ("acc", "acc_norm")), rows)


# --- generation -------------------------------------------------------------------------------


def greedy_ids(model: Model, prompt: list[int], max_new_tokens: int, eot: int | Collection[int],
               done: Callable[[list[int]], bool] = lambda ids: False,
               inputs: dict | None = None) -> list[int]:
    """Greedy continuation of `prompt`: at most `max_new_tokens`, ending before end-of-text
    (`eot`: one id, or several: any of them) or once `done(ids)`; with the model's KV cache
    where it has one. `inputs`: what the prompt's forward pass also reads (a picture's pixel
    arrays); the prompt is then never cut."""
    stops = {eot} if isinstance(eot, int) else set(eot)
    limit = _context_length(model)
    if not inputs:
        prompt = prompt[-max(1, limit - max_new_tokens):]
    cache = model.make_cache()  # None: a model without one recomputes the whole sequence
    out: list[int] = []
    tokens = mx.array([prompt], dtype=mx.int32)
    while len(out) < max_new_tokens and len(prompt) + len(out) < limit:
        first = {} if out or not inputs else inputs
        logits = model(tokens, cache=cache, **first) if cache is not None else model(tokens)
        token = int(logits[0, -1].argmax().item())
        if token in stops:
            break
        out.append(token)
        if done(out):
            break
        tokens = (mx.array([[token]], dtype=mx.int32) if cache is not None
                  else mx.array([prompt + out], dtype=mx.int32))
    return out


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _generation(model: Model, prompts: Prompts, task: Task, settings: TaskSettings
                ) -> TaskScores:
    """Every example's greedy answer, `settings.batch_size` decoding at once (greedy_batch:
    the answers one-at-a-time decoding gives); a model without a KV cache one at a time."""
    tok = prompts.tokenizer

    def stopped(ids: list[int]) -> bool:
        return _cut(tok.decode(ids), settings.stop)[1]

    if any(ex.images for ex in task.examples):
        return _image_generation(model, prompts, task, settings, stopped)
    encoded = [prompts.encode(prompts.text(ex.prompt)) for ex in task.examples]
    _context_length(model)
    progress = Progress(f"task {task.name}", len(encoded), "answers", log)
    try:
        if model.make_cache() is None:
            answers = []
            for ids in encoded:
                answers.append(greedy_ids(model, ids, settings.max_new_tokens, prompts.stops,
                                          stopped))
                progress.add(1)
        else:
            answers = greedy_batch(model, encoded, settings.max_new_tokens, prompts.stops,
                                   stopped, settings.batch_size, on_group=progress.add)
    finally:
        progress.close()
    rows = []
    for ex, ids in zip(task.examples, answers):
        output, _ = _cut(tok.decode(ids), settings.stop)
        rows.append({"id": ex.id, **generation_scores(output, ex), "output": output})
    return TaskScores(task.name, task.kind, _means(rows, ("exact_match", "contains")), rows)


def _image_generation(model: Model, prompts: Prompts, task: Task, settings: TaskSettings,
                      stopped: Callable[[list[int]], bool]) -> TaskScores:
    """A generation task whose rows show pictures: each prompt a user turn with its pictures,
    through the model's chat template and processor (a vision-language model's), answered
    greedily one at a time (each row's pictures differ)."""
    from mlxlab.data.images import open_image
    from mlxlab.data.vision_chat import image_keys, load_processor

    folder = model.processor_folder
    if folder is None or prompts.template is None:
        raise ConfigError(f"task {task.name} shows pictures (an image column): score it on a "
                          "vision-language model with its chat template")
    processor = load_processor(folder)
    progress = Progress(f"task {task.name}", len(task.examples), "answers", log)
    rows = []
    try:
        for ex in task.examples:
            messages = [{"role": "user", "content": [*({"type": "image"} for _ in ex.images),
                                                     {"type": "text", "text": ex.prompt}]}]
            text = prompts.template.render(messages, add_generation_prompt=True)
            pictures = [open_image(ref, task.path.parent) for ref in ex.images]
            out = processor(text=[text], images=[pictures], return_tensors="np")
            arrays = {k: np.asarray(v) for k, v in out.items()}
            ids = greedy_ids(model, arrays["input_ids"][0].astype(int).tolist(),
                             settings.max_new_tokens, prompts.stops, stopped,
                             {k: mx.array(arrays[k]) for k in image_keys(arrays)})
            output, _ = _cut(prompts.tokenizer.decode(ids), settings.stop)
            rows.append({"id": ex.id, **generation_scores(output, ex), "output": output})
            progress.add(1)
    finally:
        progress.close()
    return TaskScores(task.name, task.kind, _means(rows, ("exact_match", "contains")), rows)


def generation_scores(output: str, example: Example) -> dict[str, float]:
    """exact_match: the output, stripped, is an accepted answer (stripped); contains: an
    accepted answer (stripped) is in the output."""
    answers = [a.strip() for a in example.answer]
    return {"exact_match": float(output.strip() in answers),
            "contains": float(any(a in output for a in answers))}


# --- perplexity -------------------------------------------------------------------------------


def _perplexity(model: Model, prompts: Prompts, task: Task, batch_size: int) -> TaskScores:
    """Each text after BOS, in windows of the model's context (each window predicts its own
    tokens from its own start): summed negative log-likelihood, tokens, UTF-8 bytes."""
    limit = _context_length(model)
    rows = []
    progress = Progress(f"task {task.name}", len(task.examples), "texts", log)
    for ex in task.examples:
        ids = prompts.encode(ex.text)
        if len(ids) < 2:
            progress.close()
            raise ConfigError(f"task {task.name}, example {ex.id}: the text is too short to score "
                              "(one token)")
        windows = [ids[s:s + limit + 1] for s in range(0, len(ids) - 1, limit)]
        nll = -sum(ll for ll, _ in loglikelihoods(model, [(w[:1], w[1:]) for w in windows],
                                                   batch_size))
        progress.add(1)
        tokens = len(ids) - 1
        rows.append({"id": ex.id, "loss": nll / tokens, "nll": nll, "tokens": tokens,
                     "bytes": len(ex.text.encode())})
    nll = sum(r["nll"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    progress.close()
    loss = nll / tokens
    metrics = {"loss": loss, "perplexity": math.exp(loss),
               "bits_per_byte": nll / math.log(2) / sum(r["bytes"] for r in rows)}
    return TaskScores(task.name, task.kind, metrics, rows)


def _means(rows: list[dict], keys: Sequence[str]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def score_tasks(model: Model, tokenizer: Tokenizer, tasks: Sequence[Task],
                settings: TaskSettings | None = None,
                template: ChatTemplate | None = None) -> list[TaskScores]:
    """Every task scored (score_task)."""
    return [score_task(model, tokenizer, t, settings, template) for t in tasks]


def metric_keys(scores: Sequence[TaskScores], prefix: str = "eval") -> dict[str, float]:
    """The tasks' metrics as `<prefix>/<task>/<metric>` (what is logged to MLflow)."""
    return {f"{prefix}/{s.task}/{k}": v for s in scores for k, v in s.metrics.items()}
