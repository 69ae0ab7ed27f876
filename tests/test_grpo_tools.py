"""Multi-turn GRPO with tools: tools from config with their JSON schemas, the templates' tool-call
formats, bad tools as answers (not crashes), the trajectory's mask and loss equal to TRL's
GRPOTrainer tool loop on the same tokens, and real rollouts of a tiny model taught to call the tool
(a short SFT on the call format, as people do), trained and resumed bitwise."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from chat_fixtures import base_tokenizer, save_style
from conftest import REPO
from hf_helpers import save_tiny_model, tiny
from mlxlab.data.batching import Batching
from mlxlab.data.chat import load_chat_template
from mlxlab.data.prompts import PromptRows
from mlxlab.errors import ConfigError
from mlxlab.objectives.base import ObjectiveSetup
from mlxlab.objectives.rl.environments import Environment, Step, ToolEnvironment
from mlxlab.objectives.rl.grpo import GRPO
from mlxlab.objectives.rl.grpo_loss import policy_loss
from mlxlab.objectives.rl.lookup_tools import code_of, lookup_code
from mlxlab.objectives.rl.tool_format import (
    ParsedTurn,
    ToolFormat,
    parse_llama3,
    parse_tagged,
    template_format,
)
from mlxlab.objectives.rl.tools import ToolAnswer, Toolbox, ToolCall, build_tools
from mlxlab.runtime.cluster import distributed

TOOL = {"_target_": "mlxlab.objectives.rl.lookup_tools.lookup_code"}
COMPACT = REPO / "tests" / "chat_templates" / "hermes_compact.jinja"
CALL = '<tool_call>\n{"name": "lookup_code", "arguments": {"name": "kalomi"}}\n</tool_call>'


# --- tools written for these tests ---------------------------------------------------------------


def no_hints(name):
    """A tool without type hints.

    Args:
        name: a name
    """
    return name


def no_doc(name: str) -> str:
    return name


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "late"


def fails(name: str) -> str:
    """Always raises.

    Args:
        name: a name
    """
    raise RuntimeError(f"cannot look up {name}")


def returns_object(name: str) -> str:
    """Returns something that is neither text nor JSON.

    Args:
        name: a name
    """
    return object()  # type: ignore[return-value]


def returns_json(name: str) -> dict:
    """Returns a JSON object.

    Args:
        name: a name
    """
    return {"name": name, "length": len(name)}


def spec(fn) -> dict:
    return {"_target_": f"test_grpo_tools.{fn.__name__}"}


# --- tools as config --------------------------------------------------------------------------


def test_a_tools_schema_is_transformers_from_its_signature():
    from transformers.utils import get_json_schema

    (tool,) = build_tools([TOOL])
    assert tool.name == "lookup_code" and tool.schema == get_json_schema(lookup_code)
    assert tool.schema["function"]["parameters"]["required"] == ["name"]
    (bound,) = build_tools([{**spec(slow), "seconds": 0.0}])  # a bound argument leaves the schema
    assert bound.schema["function"]["parameters"]["properties"] == {}
    assert bound.fn() == "late"


@pytest.mark.parametrize(("tools", "message"), [
    ([{"_target_": "no.such.tool"}], "cannot be imported"),
    ([spec(no_hints)], "has no type hint for name"),
    ([{"_target_": "mlxlab.objectives.rl.lookup_tools.NAMES"}], "not a function"),
    ([spec(no_doc)], "cannot be described to the model.*no docstring"),
    ([TOOL, TOOL], "two tools are named 'lookup_code'"),
    ([{"weight": 1}], "has no _target_"),
])
def test_a_tool_that_cannot_be_imported_or_described_is_refused(tools, message):
    with pytest.raises(ConfigError, match=message):
        build_tools(tools)


def test_a_bad_tool_is_refused_at_config_time_before_anything_is_created(tmp_path, make_cfg):
    """validate() (what train() runs first) refuses a tool without type hints in one line and
    the run folder is never made."""
    from mlxlab.config import validate

    cfg = make_cfg("experiment=agent_tools", f"model.pretrained={tmp_path / 'nowhere'}",
                   f"objective.tools=[{{_target_: test_grpo_tools.{no_hints.__name__}}}]")
    with pytest.raises(ConfigError, match="test_grpo_tools.no_hints has no type hint for name"):
        validate(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
    env = OmegaConf.merge(cfg, {"objective": {"tools": [TOOL], "environment": {
        "_target_": "test_grpo_tools.no_hints"}}})
    with pytest.raises(ConfigError, match="is not a class with reset"):
        GRPO.check_config(env, "prompts")


# --- bad tools are answers ----------------------------------------------------------------------


def test_every_kind_of_bad_call_is_an_error_answer_and_a_counter():
    """Raising, timing out, returning neither text nor JSON, arguments that do not fit, a name
    that is no tool, a call that does not parse: each answered with {"error": ...} (what TRL
    answers), counted by kind; good calls answer text and JSON."""
    box = Toolbox(build_tools([TOOL, spec(slow), spec(fails), spec(returns_object),
                               spec(returns_json)]), timeout_s=0.3)
    env = ToolEnvironment()
    env.reset([{"role": "user", "content": "q"}], {}, box)
    calls = [ToolCall("lookup_code", {"name": "kalomi"}), ToolCall("slow", {"seconds": 5}),
             ToolCall("fails", {"name": "x"}), ToolCall("returns_object", {"name": "x"}),
             ToolCall("lookup_code", {"nome": "x"}), ToolCall("nope", {}),
             ToolCall("returns_json", {"name": "ab"}), ToolCall("lookup_code", {"name": "zzz"})]
    step = env.step(ParsedTurn("", calls, ["the tool call is not JSON"]))
    answers = [(a.failure, a.content) for a in step.answers]
    assert answers[0] == (None, code_of("kalomi"))
    assert answers[6] == (None, '{"name": "ab", "length": 2}')
    kinds = [a.failure for a in step.answers]
    assert kinds == [None, "timeout", "raised", "bad_result", "bad_arguments", "unknown_tool",
                     None, "raised", "bad_arguments"]
    for failure, content in answers:
        if failure:
            assert set(json.loads(content)) == {"error"}
    assert "RuntimeError: cannot look up x" in answers[2][1]
    assert "KeyError" in answers[7][1] and not step.done
    assert box.take_counts() == {"calls": 9.0, "unknown_tool": 1.0, "bad_arguments": 2.0,
                                 "raised": 2.0, "timeout": 1.0, "bad_result": 1.0,
                                 "truncated": 0.0}
    assert env.step(ParsedTurn("the code is 123")).done  # no call: the final answer


def test_the_parsers_read_qwens_llamas_and_the_tagged_format():
    hermes = parse_tagged(f"let me look. {CALL}", "<tool_call>", "</tool_call>")
    assert hermes.calls == [ToolCall("lookup_code", {"name": "kalomi"})]
    assert hermes.text == "let me look." and not hermes.errors
    two = parse_tagged(CALL + CALL.replace("kalomi", "lomine"), "<tool_call>", "</tool_call>")
    assert [c.arguments["name"] for c in two.calls] == ["kalomi", "lomine"]
    assert parse_tagged('<call>{"name": "f", "arguments": "{\\"a\\": 1}"}</call>', "<call>",
                        "</call>").calls == [ToolCall("f", {"a": 1})]
    assert "not JSON" in parse_tagged("<tool_call>{name: f}</tool_call>", "<tool_call>",
                                      "</tool_call>").errors[0]
    assert "not closed" in parse_tagged("<tool_call>{", "<tool_call>", "</tool_call>").errors[0]
    assert parse_llama3('<|python_tag|>{"name": "f", "parameters": {"a": 2}}').calls == [
        ToolCall("f", {"a": 2})]
    assert parse_llama3("The answer is 4.").text == "The answer is 4."
    assert parse_llama3('{"name": "f", "parameters": [1]}').errors
    assert not parse_tagged("no call here", "<tool_call>", "</tool_call>").wants_tools


@pytest.mark.parametrize(("style", "kind"), [("qwen3", "hermes"), ("llama3.2", "llama3"),
                                             ("smollm2", "tagged")])
def test_the_format_is_the_templates_own(tmp_path, style, kind):
    """auto: Qwen3's template writes <tool_call> (hermes), Llama 3.2's JSON with "parameters"
    (llama3), SmolLM2's ChatML no tool at all (tagged); Mistral's [TOOL_CALLS] is refused."""
    base = base_tokenizer()
    assert template_format(load_chat_template(save_style(style, tmp_path / style, base))) == kind
    with pytest.raises(ConfigError, match="set objective.tool_format=tagged"):
        template_format(load_chat_template(save_style("mistral-v0.3", tmp_path / "m", base)))


@pytest.mark.parametrize(("style", "answer"), [
    ("qwen3", "<|im_end|>\n<|im_start|>user\n<tool_response>\n412\n</tool_response><|im_end|>\n"
              "<|im_start|>assistant\n"),
    ("llama3.2", "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"412\"<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("smollm2", "<|im_end|>\n<|im_start|>user\n<tool_response>412</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n"),
])
def test_a_tool_answer_is_the_templates_tool_turn(tmp_path, style, answer):
    """The tokens after the model's end of turn are the template's own tool turn and the next
    generation prompt (Qwen3: a user turn of <tool_response>; Llama 3.2: an ipython turn;
    SmolLM2, tagged: a user turn between the result tags), and a tagged prompt carries the tools
    in its system message."""
    from tokenizers import Tokenizer

    from mlxlab.objectives.rl.tool_format import answer_ids, resolve_format
    from mlxlab.objectives.rl.tools import ToolAnswer

    folder = save_style(style, tmp_path / style, base_tokenizer())
    template = load_chat_template(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fmt = resolve_format("auto", template, ("<tool_call>", "</tool_call>"),
                         ("<tool_response>", "</tool_response>"), "user", None)
    end = tok.token_to_id(template.stop_tokens[0])
    ids = answer_ids(fmt, template, tok, [ToolAnswer("lookup_code", "412")], [end])
    assert tok.decode([end, *ids.tolist()], skip_special_tokens=False) == answer
    messages, tools = fmt.prompt_messages([{"role": "user", "content": "q"}], [get_schema()])
    if style == "smollm2":
        assert tools is None and messages[0]["role"] == "system"
        assert '"name": "lookup_code"' in messages[0]["content"]
    else:
        assert tools == [get_schema()] and messages == [{"role": "user", "content": "q"}]


def get_schema() -> dict:
    return build_tools([TOOL])[0].schema


# --- a tiny model taught to call the tool -------------------------------------------------------


@pytest.fixture(scope="module")
def caller(tmp_path_factory) -> dict:
    """A tiny random Qwen2 with ChatML's tokens and a short Hermes tool template, trained (torch,
    a few dozen steps) to answer every question with CALL, then "done" after the tool's answer;
    its lookup prompts (chats) beside it."""
    from mlxlab.objectives.rl.lookup_tools import rows, write_rows

    root = tmp_path_factory.mktemp("tools")
    folder = save_tiny_model("qwen2", root / "caller", chat="qwen2.5",
                             max_position_embeddings=512)
    (folder / "chat_template.jinja").write_text(COMPACT.read_text())
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "lookup_code", "arguments": {"name": "kalomi"}}}]}
    chats = [(row["messages"], [*row["messages"], call,
                                {"role": "tool", "name": "lookup_code", "content": code_of("kalomi")},
                                {"role": "assistant", "content": "done"}])
             for row in rows(("kalomi", "lomine", "rutavo", "zipesu"))]
    loss = tiny.teach_chats(folder, chats, [get_schema()], steps=80, stop_loss=0.02)
    write_rows(root / "codes", heldout=380)  # 20 training prompts, the rest held out
    heldout = (root / "codes" / "heldout.jsonl").read_text().splitlines()[:8]
    (root / "codes" / "val.jsonl").write_text("".join(line + "\n" for line in heldout))
    return {"folder": folder, "train": root / "codes" / "train.jsonl",
            "val": root / "codes" / "val.jsonl", "loss": loss}


def caller_data(caller: dict) -> PromptRows:
    data = PromptRows(str(caller["train"]), val_file=str(caller["val"]),
                      tokenizer={"path": str(caller["folder"] / "tokenizer.json")})
    data.setup(None)
    return data


def caller_model(caller: dict, data: PromptRows):
    from mlxlab.models.decoders.mlx_lm_decoder import MLXLMDecoder

    mx.random.seed(0)
    return MLXLMDecoder(vocab_size=data.vocab_size, pretrained=str(caller["folder"]),
                        lora={"rank": 4, "targets": ["query", "value"]})


def agent_grpo(caller: dict, data: PromptRows, model, **kwargs) -> GRPO:
    settings = {"num_generations": 2, "max_completion_length": 128, "max_turns": 3,
                "tools": [TOOL], **kwargs}
    grpo = GRPO([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"},
                 {"_target_": "test_grpo.char_variety"}], **settings)
    grpo.setup(ObjectiveSetup(model=model, data=data, batching=Batching(batch_size=2),
                              world=distributed.World()))
    return grpo


def test_rollouts_call_the_tool_and_train_only_the_models_tokens(caller):
    """The taught model calls the tool in its first turn, reads the answer, says "done": each
    trajectory is prompt + call + the template's tool turn + the reply, the tool turn's tokens
    masked 0, both model turns 1; the loss's gradient reaches the adapters."""
    assert caller["loss"] < 0.1
    data = caller_data(caller)
    model = caller_model(caller, data)
    grpo = agent_grpo(caller, data, model, temperature=0.3)
    assert grpo.agent.format.kind == "hermes"
    batch = next(iter(grpo.train_batches(data, Batching(batch_size=2), 0, model)))
    logs = grpo.logs()
    assert logs["tools/call_frequency"] >= 0.5 and logs["turns/mean"] >= 1.5, logs
    assert 0.0 <= logs["tools/failure_frequency"] <= 1.0  # a sampled call may not parse
    tok = data.tokenizer
    answer = f"<|im_start|>user\n<tool_response>\n{code_of('kalomi')}\n</tool_response>"
    seen = 0
    for labels, mask in zip(np.array(batch["labels"]), np.array(batch["loss_mask"])):
        trained = tok.decode(labels[mask == 1].tolist(), skip_special_tokens=False)
        context = tok.decode(labels[(mask == 0) & (np.arange(len(mask)) > np.argmax(mask))]
                             .tolist(), skip_special_tokens=False)
        if CALL in trained:
            seen += 1
            assert answer in context and answer not in trained
            assert trained.startswith(CALL + "<|im_end|>")  # the first turn, then the second
            assert trained.count("<|im_end|>") == 2
    assert seen >= 2
    (loss, aux), grads = nn.value_and_grad(model, grpo.loss)(model, batch)
    adapters = [float(mx.abs(g).sum()) for n, g in tree_flatten(grads) if "lora_b" in n]
    assert np.isfinite(loss.item()) and all(v > 0 for v in adapters)
    assert aux["ntokens"].item() == np.array(batch["loss_mask"]).sum()


def test_max_turns_and_the_length_budget_end_a_trajectory(caller):
    data = caller_data(caller)
    model = caller_model(caller, data)
    one = agent_grpo(caller, data, model, max_turns=1, temperature=0.3)
    trajectories = one.agent.rollout(model, *one.sampler.prompts("train", [0])[:2],
                                     one.sampler.prompts("train", [0])[2], 2, one.sampling,
                                     one.sampler.next_key)
    assert all(t.turns == 1 and t.ended in ("max_turns", "length") for t in trajectories)
    assert all(min(t.mask) == 1 for t in trajectories)  # no tool turn: nothing masked
    short = agent_grpo(caller, data, model, max_completion_length=80, temperature=0.3)
    trajectories = short.agent.rollout(model, *short.sampler.prompts("train", [0])[:2],
                                       short.sampler.prompts("train", [0])[2], 2, short.sampling,
                                       short.sampler.next_key)
    assert all(len(t.tokens) <= 80 and t.ended == "length" for t in trajectories)


class CountdownEnvironment(Environment):
    """An environment that is not a tool: it answers every turn with the turns left and a
    reward of 0.25 a turn, and ends the trajectory after `turns`."""

    def __init__(self, turns: int = 2) -> None:
        self.turns = turns

    def step(self, turn: ParsedTurn) -> Step:
        self.turns -= 1
        return Step([ToolAnswer("countdown", f"{self.turns} turns left")], reward=0.25,
                    done=self.turns <= 0)


def test_an_environment_class_answers_and_rewards_the_trajectory(caller):
    data = caller_data(caller)
    model = caller_model(caller, data)
    grpo = agent_grpo(caller, data, model, temperature=0.3, environment={
        "_target_": "test_grpo_tools.CountdownEnvironment", "turns": 2})
    assert [r.name for r in grpo.rewards][-1] == "environment"
    next(iter(grpo.train_batches(data, Batching(batch_size=2), 0, model)))
    logs = grpo.logs()
    assert 0 < logs["rewards/environment/mean"] <= 0.5
    with pytest.raises(ConfigError, match="objective.tagged_format has no key call_tag"):
        GRPO([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"}], tools=[TOOL],
             tagged_format={"call_tag": ["<c>", "</c>"]})
    with pytest.raises(ConfigError, match="objective.environment.rounds is not an argument of "
                       "test_grpo_tools.CountdownEnvironment: it takes"):
        GRPO([{"_target_": "mlxlab.objectives.rl.rewards.exact_answer"}], environment={
            "_target_": "test_grpo_tools.CountdownEnvironment", "rounds": 2})


# --- parity with TRL's tool loop and loss -------------------------------------------------------


def test_the_mask_and_the_loss_equal_trls_tool_loop_on_the_same_tokens(caller):
    """Fixed trajectories (turns written out, one hitting the length budget, one answering at
    once): TRL 1.16's GRPOTrainer._tool_call_loop, run as it is on an object holding what it
    reads, with its generation handing back the same turns and its _get_tool_suffix_ids
    rendering with the same template (transformers' tokenizer), gives the completion ids and
    tool_mask mlxlab's agent gives; TRL's _compute_loss with that mask equals policy_loss on
    mlxlab's batch to 1e-5."""
    torch = pytest.importorskip("torch")
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from transformers import AutoTokenizer

    from mlxlab.objectives.rl.agent import Trajectory, trajectory_rows
    from mlxlab.objectives.rl.environments import ToolEnvironment
    from mlxlab.objectives.rollouts import rollout_batch

    data = caller_data(caller)
    model = caller_model(caller, data)
    budget = 180
    grpo = agent_grpo(caller, data, model, max_completion_length=budget, max_turns=3)
    agent, tok = grpo.agent, data.tokenizer
    end = tok.token_to_id("<|im_end|>")
    _, ids, _ = grpo.sampler.prompts("train", [0, 1, 2])

    def turn(text: str) -> list[int]:
        return [*tok.encode(text, add_special_tokens=False).ids, end]

    scripts = [[turn(CALL), turn("done")],                       # a call, then the answer
               [turn("123")],                                    # the answer at once
               [turn(CALL), turn(CALL), turn("x" * 40)]]         # runs into the budget
    ours = []
    for script in scripts:
        trajectory, environment = Trajectory(), ToolEnvironment()
        environment.reset([], {}, agent.toolbox)
        for tokens in script:
            room = budget - len(trajectory.tokens)
            if not agent._step(trajectory, environment, np.asarray(tokens[:room]), budget):
                break
        ours.append(trajectory)
    completions, masks = trajectory_rows(ours)

    # TRL's loop: the same turns as its generation's output, the tool run as TRL runs it
    hf = AutoTokenizer.from_pretrained(caller["folder"])
    turns_left = [list(s[1:]) for s in scripts]

    def generate(prompt_completion_tool_ids, images, fields, **_):
        out = []
        for pct in prompt_completion_tool_ids:
            row = next(i for i, p in enumerate(ids) if pct[:len(p)] == p.tolist())
            out.append(turns_left[row].pop(0))
        return out, None

    def parse(tokenizer, token_ids, prefix=None, **_):
        parsed = agent.format.parse(tok.decode([t for t in token_ids if t != end],
                                               skip_special_tokens=False))
        calls = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in parsed.calls]
        return {"role": "assistant", "content": parsed.text, **({"tool_calls": calls}
                                                                 if calls else {})}

    trainer = SimpleNamespace(
        processing_class=hf, _tokenizer=hf, chat_template=None, chat_template_kwargs={},
        _is_vlm=False, max_tool_calling_iterations=2, max_completion_length=budget,
        use_vllm=False, model=SimpleNamespace(config=SimpleNamespace(
            max_position_embeddings=512)), _generate_single_turn=generate,
        _sync_tool_dicts=[{"lookup_code": lookup_code}] * 3, _async_tool_dicts=[{}] * 3,
        tools=[lookup_code], environment_factories=None, _multi_environment=False)
    trainer._get_tool_suffix_ids = lambda messages: trl_grpo.GRPOTrainer._get_tool_suffix_ids(
        trainer, messages)
    first = [s[0][:budget] for s in scripts]
    trl_completions = [[parse(None, f)] for f in first]
    prompts = [[{"role": "user", "content": "q"}] for _ in scripts]
    original = trl_grpo.parse_response
    trl_grpo.parse_response = parse
    try:
        tool_mask, _, completion_ids, _, calls, failures, _ = \
            trl_grpo.GRPOTrainer._tool_call_loop(trainer, prompts, [p.tolist() for p in ids],
                                                 [list(f) for f in first], trl_completions,
                                                 None, None, {})
    finally:
        trl_grpo.parse_response = original
    for got, mask, want, want_mask in zip(completions, masks, completion_ids, tool_mask):
        assert got.tolist() == want and mask.tolist() == want_mask
    assert (calls, failures) == (3, 0) and sum(1 - m for m in tool_mask[0]) > 0
    # the third's second answer would pass the budget: dropped by both, the trajectory ended
    assert [t.ended for t in ours] == ["answer", "answer", "length"] and ours[2].turns == 2

    # the loss on those rows: TRL's _compute_loss with its tool_mask against policy_loss
    width = max(len(p) for p in ids) + budget - 1
    batch = rollout_batch(ids, completions, 1, width, data.pad_id, masks)
    rng = np.random.default_rng(0)
    rows = len(scripts)
    logps = rng.uniform(-3, -0.05, (rows, width)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, logps.shape)).astype(np.float32)
    adv = np.asarray([1.0, -0.5, 0.3], np.float32)
    c = max(len(x) for x in completion_ids)
    starts = [len(p) - 1 for p in ids]  # position predicting the first completion token
    trl_logps = np.stack([logps[r, s:s + c] for r, s in enumerate(starts)])
    trl_old = np.stack([old[r, s:s + c] for r, s in enumerate(starts)])
    completion_mask = np.asarray([[1] * len(x) + [0] * (c - len(x)) for x in completion_ids],
                                 np.float32)
    padded_tool = np.asarray([m + [1] * (c - len(m)) for m in tool_mask], np.float32)
    np.testing.assert_array_equal(
        np.stack([batch["loss_mask"][r, s:s + c] for r, s in enumerate(starts)]),
        completion_mask * padded_tool)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        policy = torch.tensor(trl_logps, requires_grad=True)
        holder = SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, p=policy, **k: (p, torch.zeros_like(p),
                                                                          None),
            aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level="token", beta=0.0, loss_type=loss_type, epsilon_low=0.2,
            epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1, max_completion_length=budget,
            accelerator=SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x,
                                        gather=lambda x: x, gather_for_metrics=lambda x: x),
            _entropy_bonus_enabled=False,
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                                 steps_per_generation=1),
            _metrics=defaultdict(lambda: defaultdict(list)))
        m = torch.tensor(completion_mask)
        want = trl_grpo.GRPOTrainer._compute_loss(holder, None, {
            "prompt_ids": torch.zeros((rows, 1), dtype=torch.long),
            "prompt_mask": torch.ones((rows, 1), dtype=torch.long),
            "completion_ids": torch.zeros((rows, c), dtype=torch.long), "completion_mask": m,
            "tool_mask": torch.tensor(padded_tool), "advantages": torch.tensor(adv),
            "old_per_token_logps": torch.tensor(trl_old),
            "num_items_in_batch": (m * torch.tensor(padded_tool)).sum()}).item()
        got, _, _ = policy_loss(loss_type, mx.array(logps), mx.array(adv),
                                mx.array(batch["loss_mask"]), mx.array(old), None, 0.0, 0.2,
                                0.28, budget)
        assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want)), loss_type


# --- experiment=agent_tools through the one loop ------------------------------------------------


def agent_args(caller: dict, *extra: str) -> list[str]:
    """experiment=agent_tools on the taught tiny model: 2 prompts x 2 trajectories a step of up
    to 3 turns, mu = 2, and a reward that differs between trajectories (so advantages move)."""
    return [
        "experiment=agent_tools",
        f"model.pretrained={caller['folder']}",
        f"data.train_file={caller['train']}",
        f"data.val_file={caller['val']}",
        "model.lora.rank=4",
        "objective.num_generations=2",
        "objective.num_iterations=2",
        "objective.max_completion_length=128",
        "objective.temperature=0.5",
        "objective.log_completions=8",  # every validation prompt's trajectory, not the first 2
        "objective.rewards=[{_target_: mlxlab.objectives.rl.rewards.exact_answer},"
        "{_target_: test_grpo.char_variety, name: variety, weight: 0.5},"
        "{_target_: mlxlab.objectives.rl.rewards.tool_call_parsed, weight: 0.0}]",
        "trainer.batch_size=2",
        "trainer.max_steps=4",
        "trainer.eval_every_steps=4",
        "trainer.log_every_steps=1",
        "callbacks.progress.enabled=false",
        *extra,
    ]


@pytest.mark.slow  # the tool rollouts train in test_rollouts_call_the_tool_and_train_only_...
def test_experiment_agent_tools_trains_and_logs_the_tool_calls(caller, make_cfg):
    """4 steps through train(): the tools' metrics (TRL's tools/call_frequency, the failures by
    kind, the turns) in MLflow at every generation and at the evaluation, and the logged sample
    trajectories hold the tool's answer."""
    from test_grpo import finished_run

    client, run, history = finished_run(make_cfg(*agent_args(caller)))
    calls = history("train/tools/call_frequency")
    assert len(calls) == 2 and max(calls) > 0, calls  # one value per generation (mu = 2)
    for key in ("tools/failure_frequency", "tools/failures/timeout", "turns/mean", "reward"):
        assert len(history(f"train/{key}")) == 2, key
    assert history("val/tools/call_frequency")[0] > 0
    parsed = history("train/rewards/tool_call_parsed/mean")  # weight 0: logged, not rewarded
    assert len(parsed) == 2 and max(parsed) > 0, parsed
    local = client.download_artifacts(run.info.run_id, "grpo_samples/step_00000004.jsonl")
    rows = [json.loads(line) for line in Path(local).read_text().splitlines()]
    assert len(rows) == 8 and any("<tool_response>" in r["completion"] for r in rows), rows
    assert {r["tool_call_parsed"] for r in rows} <= {0.0, 1.0}


def test_tool_call_parsed_rewards_a_call_the_format_read():
    """The format reward: 1 for a trajectory with a model turn whose call parsed, 0 for one
    whose call did not (SmolLM2's `}}}`: an error answer, no call) or that made none; a run
    without tools (no trajectories column) is told, in one line, that it needs them."""
    from mlxlab.objectives.rl.rewards import tool_call_parsed

    fmt = ToolFormat("tagged")
    turns = ['<tool_call>{"name": "lookup_code", "arguments": {"name": "kalomi"}}</tool_call>',
             '<tool_call>{"name": "lookup_code", "arguments": {"name": "kalomi"}}}</tool_call>',
             "123"]
    trajectories = []
    for text in turns:
        parsed = fmt.parse(text)
        message = {"role": "assistant", "content": text}
        if parsed.calls:
            message["tool_calls"] = [{"type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in parsed.calls]
        trajectories.append([{"role": "user", "content": "q"}, message])
    assert tool_call_parsed(["q"] * 3, ["", "", "123"], trajectories=trajectories) == [1.0, 0.0,
                                                                                      0.0]
    with pytest.raises(ConfigError, match="tool_call_parsed .* needs a run with tools"):
        tool_call_parsed(["q"], ["123"], answer=["123"])


@pytest.mark.slow  # three runs in subprocesses (~1 min on 2 loaded cores)
def test_a_sigkilled_agent_run_resumes_bitwise_with_resume_auto(caller, tmp_path, cli_env):
    """experiment=agent_tools (mu = 2, tool calls in its trajectories) SIGKILLed after its
    checkpoint at step 5, between the two passes over a generation, and resumed with
    resume=auto: the weights, the whole MLflow history (the tools' metrics included) equal an
    uninterrupted run's."""
    from run_helpers import committed_steps, kill_when, run, start
    from test_resume import assert_same_history, assert_same_weights, run_id_of

    args = agent_args(caller, "trainer.max_steps=10", "trainer.eval_every_steps=5",
                      "trainer.log_every_steps=2", "checkpoint.save_every_steps=5",
                      "checkpoint.save_every_minutes=null")
    cli_env["PYTHONPATH"] = f"{Path(__file__).parent}:{cli_env.get('PYTHONPATH', '')}"
    runs = tmp_path / "outputs" / "agent_tools"
    runs.mkdir(parents=True)
    killed = runs / "killed"
    proc = start(args, killed, cli_env)
    kill_when(proc, lambda: any(s >= 5 for s in committed_steps(killed)))
    assert max(committed_steps(killed)) < 10
    resumed = runs / "resumed"
    run([*args, "resume=auto"], resumed, cli_env)
    reference = tmp_path / "reference"
    run(args, reference, cli_env)
    assert_same_weights(reference, resumed, "agent_tools")
    assert run_id_of(resumed) == run_id_of(killed)
    assert_same_history(f"sqlite:///{tmp_path}/mlruns/mlflow.db", reference, resumed,
                        "agent_tools")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    calls = [m.value for m in client.get_metric_history(run_id_of(resumed),
                                                        "train/tools/call_frequency")]
    assert calls and max(calls) > 0
