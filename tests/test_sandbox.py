"""The sandbox for model-written code: each way out tried for real (a fork bomb, reading a file
outside its folder, a socket to a server listening on this machine, a 10 GB allocation, an
infinite loop, a sleep past the wall clock, a file past its size limit; signals, SIGIO, a raw
fork_exec and /proc against another process of the same user, the "trainer") and each shown
stopped, by every layer together, by each kernel layer alone where this machine has it and
with each layer removed in turn; signals to itself still delivered; the scratch folder gone
afterwards; `run_python` as a run's tool, in its killable worker."""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from mlxlab.objectives.rl.sandbox import answer_text, run_python
from mlxlab.objectives.rl.tools import Toolbox, ToolCall, build_tools
from mlxlab.runtime.files.processes import is_alive
from mlxlab.sandbox.confine import CHILD, LAYERS, SandboxLimits, run_code, sandbox_layers

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
    assert [x for x in layers if x != "seatbelt"][0] == "rlimits" and list(layers)[-1] == "audit"
    assert set(layers) <= set(LAYERS)


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
    """What sandbox/confine.py's table says of each layer, one at a time (beside the limits)."""
    if layer != "audit" and layer not in sandbox_layers():
        pytest.skip(f"this kernel has no {layer} layer")
    port, accepted = server
    secret = tmp_path / "secret.txt"
    secret.write_text("the trainer's secret")
    limits = SandboxLimits(cpu_s=1, wall_s=4.0, layers=("rlimits", layer),
                           python_only_not_a_boundary=True)  # one layer: no boundary alone
    result = run_code(escapes(port, secret)[name], limits)
    assert list(result.layers) == ["rlimits", layer]
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


# The trainer: another process of the sandbox's user, in a session of its own. Its SIGWINCH
# handler leaves a file: SIGWINCH is ignored by default, so `kill(-1, SIGWINCH)` getting past a
# layer would disturb no other process of this user, and the trainer still shows it got it.
TRAINER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGWINCH, lambda *_: open(sys.argv[1], 'w').close())\n"
           "open(sys.argv[2], 'w').close()\n"
           "time.sleep(120)\n")
# _posixsubprocess.fork_exec raises no audit event: the raw way to start a process from Python
FORK_EXEC = ("import _posixsubprocess, os, sys\n"
             "r, w = os.pipe()\n"
             "tail = ((-1, -1, None, -1, -1, None, False) if sys.version_info >= (3, 11)\n"
             "        else (None, None, None, -1, None))\n"
             "pid = _posixsubprocess.fork_exec([b'/bin/echo', b'escaped'], [b'/bin/echo'], True,\n"
             "    (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False, *tail)\n"
             "os.waitpid(pid, 0)\n")
# Signals to itself, each way, with handlers: what the layers must still let through (as PID 1
# of its own namespace too, and kill(0) reaching its own process group). One signal per way:
# two of the same pending together are delivered once.
TO_ITSELF = ("import os, signal, threading, time\n"
             "got = set()\n"
             "for s in ('SIGUSR1', 'SIGUSR2', 'SIGHUP', 'SIGALRM', 'SIGWINCH'):\n"
             "    signal.signal(getattr(signal, s), lambda n, _: got.add(n))\n"
             "os.kill(os.getpid(), signal.SIGUSR1)\n"
             "os.kill(0, signal.SIGUSR2)\n"
             "os.killpg(0, signal.SIGHUP)\n"
             "signal.raise_signal(signal.SIGALRM)\n"
             "stop = threading.Event()\n"
             "other = threading.Thread(target=stop.wait)\n"
             "other.start()\n"
             "signal.pthread_kill(other.ident, signal.SIGWINCH)\n"
             "stop.set()\n"
             "other.join()\n"
             "time.sleep(0.01)\n"
             "print('received', len(got))\n")


def _start_trainer(folder: Path) -> tuple[subprocess.Popen, Path]:
    hit, ready = folder / "hit", folder / "ready"
    process = subprocess.Popen([sys.executable, "-c", TRAINER, str(hit), str(ready)],
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return process, hit


@pytest.fixture(scope="module")
def _trainers():
    started: list[tuple[subprocess.Popen, Path]] = []
    yield started
    for process, _ in started:
        process.kill()
        process.wait()


@pytest.fixture()
def trainer(_trainers, tmp_path_factory):
    """A process the sandboxed code must not reach, (it, the file it creates on SIGWINCH): the
    one the test before used while it is untouched (a start-up saved), else a fresh one."""
    if not _trainers or _trainers[-1][0].poll() is not None or _trainers[-1][1].exists():
        _trainers.append(_start_trainer(tmp_path_factory.mktemp("trainer")))
    return _trainers[-1]


def reaching(pid: int) -> dict[str, str]:
    """Programs that try to reach process `pid`, by name."""
    return {
        "kill": f"import os, signal\nos.kill({pid}, signal.SIGKILL)\nprint('sent')\n",
        "kill -1": "import os, signal\nos.kill(-1, signal.SIGWINCH)\nprint('sent')\n",
        "killpg": f"import os, signal\nos.killpg({pid}, signal.SIGKILL)\nprint('sent')\n",
        "sigio": f"import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {pid})\n"
                 "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')\nprint('sent')\n",
        "fork_exec": FORK_EXEC,
        # another process's resource limits: a low RLIMIT_CPU would end it (a harmless one here)
        "prlimit": f"import resource\nresource.prlimit({pid}, resource.RLIMIT_MSGQUEUE, (7, 7))\n"
                   "print('set')\n",
        "proc": "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n",
    }


def untouched(process: subprocess.Popen, hit: Path, results: dict) -> None:
    """The trainer alive and never signalled; nothing started; its pid not listed."""
    time.sleep(0.05)  # a signal that got through is delivered by now
    said = {name: r.stderr[-300:] for name, r in results.items()}
    assert process.poll() is None and not hit.exists(), said
    if hasattr(resource, "prlimit"):  # Linux
        assert resource.prlimit(process.pid, resource.RLIMIT_MSGQUEUE) != (7, 7), said
    for name, result in results.items():
        assert "escaped" not in result.stdout, name
        assert str(process.pid) not in re.findall(r"\d+", result.stdout), name


def run_each(programs: dict[str, str], limits: SandboxLimits) -> dict:
    """Each program's result, four at a time (each run waits mostly on its start-up)."""
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(programs, pool.map(lambda c: run_code(c, limits), programs.values()),
                        strict=True))


@pytest.mark.parametrize("removed", [None, *LAYERS])
def test_no_layer_removed_lets_the_code_reach_the_trainer(trainer, removed):
    """Every way to the trainer stopped with all layers and with each one removed in turn (the
    audit hook stands in for a kernel layer that is not there); signals to itself still work."""
    process, hit = trainer
    limits = SandboxLimits(cpu_s=1, wall_s=4.0, layers=tuple(x for x in LAYERS if x != removed),
                           python_only_not_a_boundary=True)  # landlock or seccomp removed
    results = run_each({**reaching(process.pid), "itself": TO_ITSELF}, limits)
    assert results.pop("itself").stdout == "received 5\n"
    untouched(process, hit, results)


def _landlock_abi() -> int:
    found = re.search(r"ABI (\d+)", sandbox_layers().get("landlock", ""))
    return int(found.group(1)) if found else 0


# What each layer alone answers each way to the trainer it stops ("": no error, e.g. the
# kernel answers kill(-1) with 0 when Landlock refused every target; the trainer is untouched).
# Landlock has no rule for another process's resource limits: prlimit is not in its row.
ALONE = {
    "pidns": {"kill": "No such process", "kill -1": "No such process",
              "killpg": "No such process", "sigio": "No such process", "proc": "",
              "prlimit": "No such process"},
    "landlock": {"kill": "Operation not permitted", "kill -1": "",
                 "killpg": "Operation not permitted", "sigio": "", "proc": "Permission denied"},
    "seccomp": {"kill": "Operation not permitted", "kill -1": "Operation not permitted",
                "killpg": "Operation not permitted", "sigio": "Operation not permitted",
                "fork_exec": "Operation not permitted", "prlimit": "Operation not permitted"},
    "audit": {"kill": "the sandbox refuses os.kill", "kill -1": "the sandbox refuses os.kill",
              "killpg": "the sandbox refuses os.killpg", "sigio": "the sandbox refuses fcntl.fcntl",
              "fork_exec": "the sandbox refuses import _posixsubprocess",
              "proc": "the sandbox refuses to list",
              "prlimit": "the sandbox refuses resource.prlimit"},
}


@pytest.mark.parametrize("layer", list(ALONE))
def test_each_layer_alone_keeps_the_trainer_out_of_reach(trainer, layer):
    """What sandbox/confine.py's table says each layer does about other processes, one at a
    time (beside the limits); signals to itself delivered under each."""
    if layer != "audit" and layer not in sandbox_layers():
        pytest.skip(f"this kernel has no {layer} layer")
    stops = dict(ALONE[layer])
    if layer == "landlock" and _landlock_abi() < 6:  # files only: its scopes are ABI 6
        stops = {"proc": stops["proc"]}
    process, hit = trainer
    limits = SandboxLimits(cpu_s=1, wall_s=4.0, layers=("rlimits", layer),
                           python_only_not_a_boundary=True)
    programs = reaching(process.pid)
    results = run_each({**{name: programs[name] for name in stops}, "itself": TO_ITSELF},
                       limits)
    assert results.pop("itself").stdout == "received 5\n"
    for name, result in results.items():
        assert list(result.layers) == ["rlimits", layer]
        assert stops[name] in result.stderr, (name, result.stderr[-500:])
    untouched(process, hit, results)
    if layer == "pidns":  # its own /proc: only itself, PID 1
        assert results["proc"].stdout == "[1]\n", results["proc"].stderr[-500:]


def test_the_layers_record_says_what_each_enforces_here():
    """A name and what it enforces on this kernel, for each layer that took effect."""
    layers = sandbox_layers()
    assert isinstance(layers, dict) and all(isinstance(v, str) and v for v in layers.values())
    if "landlock" in layers:
        abi = _landlock_abi()
        said = layers["landlock"]
        assert abi >= 1 and ("signals and abstract unix sockets only to itself" in said) == \
            (abi >= 6)
        assert ("TCP bind/connect refused" in said) == (abi >= 4)
    if "seccomp" in layers:
        assert "signals to itself only" in layers["seccomp"]
    if "pidns" in layers:
        assert "PID 1" in layers["pidns"]
    assert sandbox_layers() is not sandbox_layers()  # a copy: the cached record stays as found


def test_a_watchdog_bounds_memory_where_no_address_space_limit_does():
    """Without RLIMIT_AS (macOS ignores it; here: the rlimits layer left out) the parent kills
    the run when its resident size passes memory_bytes."""
    result = run_code("x = b'x' * (3 << 30)\nprint('allocated')\n",
                      SandboxLimits(wall_s=20.0, memory_bytes=256 << 20, layers=("audit",),
                                    python_only_not_a_boundary=True))
    assert result.stdout == "" and result.stopped == "memory limit", result
    assert "watchdog" in result.layers


def test_off_linux_a_thread_ends_the_program_when_its_parent_is_gone(tmp_path):
    """What stands in for PR_SET_PDEATHSIG on macOS (its helper, run here): a process whose
    parent exits ends within a check or two, not at its own end."""
    started = tmp_path / "started"
    orphan = ("import os, sys, threading, time\n"
              f"sys.path.insert(0, {str(CHILD.parent)!r})\n"  # the child's script alone
              "from child import _exit_with_parent\n"
              "threading.Thread(target=_exit_with_parent, args=(os.getppid,), daemon=True)"
              ".start()\n"
              f"open({str(started)!r}, 'w').write(str(os.getpid()))\n"
              "time.sleep(60)\n")
    parent = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {orphan!r}])\n"
              f"while not __import__('os').path.exists({str(started)!r}):\n"
              "    time.sleep(0.01)\n")
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=10)
    while not started.read_text():
        time.sleep(0.01)
    pid = int(started.read_text())
    deadline = time.monotonic() + 5
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(pid)
