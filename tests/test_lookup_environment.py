"""The lookup task's environment that knows the question (objectives/rl/lookup_tools.py
QuestionLookup), and the agent benchmark's smoke (benchmarks/quality/bench_agent_tools.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from mlxlab.objectives.rl.lookup_tools import QUESTION, QuestionLookup, code_of
from mlxlab.objectives.rl.tool_format import ParsedTurn
from mlxlab.objectives.rl.tools import Toolbox, ToolCall, build_tools

TOOL = {"_target_": "mlxlab.objectives.rl.lookup_tools.lookup_code"}


def test_question_lookup_answers_the_questions_name_whatever_the_call_wrote():
    """The environment that knows the question (benchmarks/quality/bench_agent_tools.py's tiny
    model): a lookup_code call with no, wrong or misspelled arguments is answered with the
    code of the name the prompt asks about; another tool's call and an unparsed one are
    answered as ToolEnvironment answers them; a turn without a call ends the trajectory."""
    box = Toolbox(build_tools([TOOL]))
    env = QuestionLookup()
    env.reset([{"role": "user", "content": QUESTION.format(name="rutami")}], {}, box)
    step = env.step(ParsedTurn("", [ToolCall("lookup_code", {}),
                                    ToolCall("lookup_code", {"name": "kalomi"}),
                                    ToolCall("lookup_code", {"nome": "x"}), ToolCall("nope", {})],
                               ["the tool call is not JSON"]))
    assert [(a.failure, a.content) for a in step.answers[:3]] == [(None, code_of("rutami"))] * 3
    assert [a.failure for a in step.answers[3:]] == ["unknown_tool", "bad_arguments"]
    assert not step.done and env.step(ParsedTurn(code_of("rutami"))).done
    env.reset(QUESTION.format(name="zipene"), {}, box)  # a plain-text prompt
    assert env.step(ParsedTurn("", [ToolCall("lookup_code", {})])).answers[0].content == \
        code_of("zipene")


@pytest.mark.slow  # SFT, two sweeps of two seeds, a comparison and the speed rounds (~45 s on quiet
# cores, ~5 min on loaded ones)
def test_the_agent_benchmarks_smoke_runs_every_stage(tmp_path, cli_env):
    """benchmarks/quality/bench_agent_tools.py --smoke: the tiny model's SFT, GRPO with the tool
    and without over two seeds each, `mlxlab runs compare` of the two sweeps, and the rollout
    speed of both sides, all in its results.json."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality" /
                                               "bench_agent_tools.py"), "--smoke"],
                          capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(Path(done.stdout.rsplit("results: ", 1)[1].strip()).read_text())
    tiny_part = results["tiny"]
    assert {arm: [seed for seed, _ in rows] for arm, rows in
            tiny_part["heldout_accuracy_per_seed"].items()} == {"desk": ["42", "43"],
                                                                "none": ["42", "43"]}
    groups = tiny_part["compare"]["groups"]
    assert [g["n"] for g in groups] == [2, 2] and tiny_part["compare"]["metric"] == "val/reward"
    speed = results["speed_tiny"]
    assert set(speed["median_rollouts_per_s"]) == {"multi_turn", "single_turn"}
    assert all(row["rollouts_per_s"] > 0 and row["load_1min"] >= 0
               for rows in speed["rounds"].values() for row in rows)
