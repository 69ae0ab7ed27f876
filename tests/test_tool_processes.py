"""Where tool calls run: each in a worker process that is killed when it passes
objective.tool_timeout_s (a spinning tool costs one timeout and no CPU after it), a step's calls
side by side, results cut before anything tokenizes them, SystemExit and a dying process
answered as `raised`. Real processes, real spinning, real clocks."""

from __future__ import annotations

import resource
import threading
import time

from mlxlab.objectives.rl.agent import Agent, AgentSettings
from mlxlab.objectives.rl.environments import ToolEnvironment
from mlxlab.objectives.rl.tool_format import ParsedTurn
from mlxlab.objectives.rl.tools import Toolbox, ToolCall, build_tools
from mlxlab.runtime.files.processes import is_alive

NAMES = ("spin", "sleep", "huge", "exits", "dies", "pid")


def toolbox(timeout_s: float, **kwargs) -> Toolbox:
    return Toolbox(build_tools([{"_target_": f"hostile_tools.{n}"} for n in NAMES]), timeout_s,
                   **kwargs)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_spinning_tool_is_killed_at_its_timeout_and_costs_nothing_after():
    """The call is answered `timeout` at the limit, its worker process is gone, no thread of
    this process keeps spinning (the CPU this process spends in the next second is idle's), and
    the next call gets a fresh worker."""
    box = toolbox(0.5)
    first = int(box.call(ToolCall("pid", {"tag": "a"})).content)
    threads = threading.active_count()
    start = time.monotonic()
    answer = box.call(ToolCall("spin", {"seconds": -1}))
    assert answer.failure == "timeout" and "within 0.5 s" in answer.content
    assert time.monotonic() - start < 3.0
    assert not is_alive(first)  # the spinning worker was killed (and reaped)
    assert threading.active_count() == threads
    before = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - before < 0.3  # nothing of the call spins on in this process
    second = int(box.call(ToolCall("pid", {"tag": "b"})).content)
    assert second != first and box.processes.pids() == [second]
    box.close()
    assert not is_alive(second)


def test_a_huge_result_is_cut_before_it_is_tokenized_and_counted():
    box = toolbox(10.0, max_chars=1000)
    start = time.monotonic()
    answer = box.call(ToolCall("huge", {"chars": 5_000_000}))
    assert time.monotonic() - start < 5.0
    assert answer.failure == "truncated" and answer.content == "x" * 1000
    assert box.call(ToolCall("huge", {"chars": 1000})).failure is None
    assert box.take_counts()["truncated"] == 1.0


def test_system_exit_and_a_dying_process_are_raised_not_timeout():
    box = toolbox(10.0)
    start = time.monotonic()
    exits = box.call(ToolCall("exits", {"code": 3}))
    dies = box.call(ToolCall("dies", {"code": 7}))
    assert time.monotonic() - start < 5.0
    assert (exits.failure, exits.content) == ("raised", '{"error": "SystemExit: 3"}')
    assert dies.failure == "raised" and "exit code 7" in dies.content
    assert box.call(ToolCall("pid", {"tag": "after"})).failure is None  # a fresh worker
    counts = box.take_counts()
    assert (counts["raised"], counts["timeout"]) == (2.0, 0.0)


def test_a_steps_hung_calls_run_side_by_side():
    """8 trajectories each calling a tool that hangs: with 4 workers the step costs two
    timeouts (and the fresh workers' start), not eight, and every call is answered `timeout`."""
    agent = Agent(AgentSettings([{"_target_": "hostile_tools.sleep"}], None, 4, 2.0, "tagged",
                                {}, tool_workers=4))
    environments = []
    for _ in range(8):
        environment = ToolEnvironment()
        environment.reset("q", {}, agent.toolbox)
        environments.append(environment)
    turns = [ParsedTurn("", [ToolCall("sleep", {"seconds": 600})]) for _ in environments]
    agent.toolbox.call(ToolCall("sleep", {"seconds": 0}))  # a worker started: imports aside
    start = time.monotonic()
    steps = agent.answer(environments, turns)
    took = time.monotonic() - start
    assert [s.answers[0].failure for s in steps] == ["timeout"] * 8
    assert took < 10.0, took  # one after another: 16 s
    agent.toolbox.close()
