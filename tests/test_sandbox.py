"""The sandbox for model-written code: each way out tried for real (a fork bomb, reading a file
outside its folder, a socket to a server listening on this machine, a 10 GB allocation, an
infinite loop, a sleep past the wall clock, a file past its size limit) and each shown stopped,
by every layer together and by each kernel layer alone where this machine has it; the scratch
folder gone afterwards; `run_python` as a run's tool, in its killable worker."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from mlxlab.objectives.rl.sandbox import answer_text, run_python
from mlxlab.objectives.rl.tools import Toolbox, ToolCall, build_tools
from mlxlab.runtime.processes import is_alive
from mlxlab.runtime.sandbox import SandboxLimits, run_code, sandbox_layers

FAST = SandboxLimits(cpu_s=1, wall_s=4.0, memory_bytes=512 << 20, file_bytes=1 << 20)


@pytest.fixture()
def server():
    """A TCP server on this machine's loopback; yields (port, the connections it accepted)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    listener.close()


def escapes(port: int, secret: Path) -> dict[str, str]:
    """Programs that try to get out, by name."""
    return {
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "subprocess": "import subprocess\nprint(subprocess.run(['id'], capture_output=True))\n",
        "read outside": f"print(open({str(secret)!r}).read())\n",
        "list root": "import os\nprint(os.listdir('/'))\n",
        "passwd": "print(open('/etc/passwd').read())\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                  "print('connected')\n",
        "10 GB": "x = bytearray(10 * 2**30)\nprint('allocated')\n",
        "infinite loop": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(600)\n",
        "big file": "open('big', 'wb').write(b'x' * (4 << 20))\nprint('written')\n",
    }


def test_the_limits_and_the_audit_hook_are_always_there():
    """The kernel layers depend on the machine (each is tested alone below where it exists;
    the development machine, Linux 6.18, has all of them)."""
    layers = sandbox_layers()
    assert layers[0] == "rlimits" and layers[-1] == "audit"
    assert set(layers) <= {"rlimits", "netns", "landlock", "seccomp", "audit"}


def test_each_way_out_is_stopped(server, tmp_path):
    port, accepted = server
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's secret")
    results = {name: run_code(code, SandboxLimits(cpu_s=1, wall_s=30.0) if name == "infinite "
                              "loop" else FAST) for name, code in escapes(port, secret).items()}
    for name in ("fork bomb", "subprocess", "socket", "read outside", "list root", "passwd"):
        assert "PermissionError" in results[name].stderr, (name, results[name].stderr)
        assert results[name].stdout == "", name
    assert accepted == [] and "connected" not in results["socket"].stdout
    assert results["10 GB"].stderr.strip().endswith("MemoryError")
    assert results["infinite loop"].stopped == "CPU time limit"
    assert results["sleep"].stopped == "wall-clock limit"
    assert "File too large" in results["big file"].stderr


def test_code_runs_in_a_scratch_folder_deleted_afterwards_with_its_output_cut():
    result = run_code("import os\nopen('note.txt', 'w').write('kept')\n"
                      "print(os.getcwd(), open('note.txt').read())\nprint('x' * 10000)\n",
                      SandboxLimits(output_chars=200))
    folder, text = result.stdout.split("\n")[0].split()
    assert text == "kept" and not Path(folder).exists()
    assert len(result.stdout) == 200 and result.cut > 9000
    assert "more characters of output left out" in answer_text(result)


@pytest.mark.parametrize(("layer", "name", "stopped"), [
    ("netns", "socket", "Network is unreachable"),
    ("landlock", "socket", "Permission denied"),
    ("landlock", "read outside", "Permission denied"),
    ("seccomp", "socket", "Operation not permitted"),
    ("seccomp", "fork bomb", "Operation not permitted"),
    ("audit", "socket", "the sandbox refuses socket"),
    ("audit", "fork bomb", "the sandbox refuses os.fork"),
    ("audit", "read outside", "the sandbox refuses to open"),
])
def test_each_layer_alone_stops_what_it_says(server, tmp_path, layer, name, stopped):
    """What runtime/sandbox.py's table says of each layer, one at a time (beside the limits)."""
    if layer != "audit" and layer not in sandbox_layers():
        pytest.skip(f"this kernel has no {layer} layer")
    port, accepted = server
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's secret")
    limits = SandboxLimits(cpu_s=1, wall_s=4.0, layers=("rlimits", layer))
    result = run_code(escapes(port, secret)[name], limits)
    assert result.layers == ["rlimits", layer]
    assert stopped in result.stderr, result.stderr[-500:]
    assert accepted == [] and result.stdout == ""


def test_run_python_is_a_tool_in_a_worker_and_dies_with_it():
    """Through a run's Toolbox: a product answered; a program still sleeping when its worker
    is killed at tool_timeout_s is killed with it (it dies with its parent)."""
    assert run_python("print(48271 * 99173)") == str(48271 * 99173)
    box = Toolbox(build_tools([{"_target_": "mlxlab.objectives.rl.sandbox.run_python"}]),
                  timeout_s=4.0)
    assert box.call(ToolCall("run_python", {"code": "print(2 ** 100)"})).content == \
        str(2 ** 100)
    (worker,) = box.processes.pids()
    found: list[int] = []

    def watch() -> None:
        while not found:
            found.extend(c.pid for c in psutil.Process(worker).children())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    answer = box.call(ToolCall("run_python", {"code": "import time\ntime.sleep(600)"}))
    assert answer.failure == "timeout"
    watcher.join(5)
    (sandboxed,) = found
    deadline = time.monotonic() + 5
    while is_alive(sandboxed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(sandboxed)
