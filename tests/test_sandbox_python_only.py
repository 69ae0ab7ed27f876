"""The sandbox where only its Python audit hook confines (macOS without sandbox-exec, or Linux
where a container forbids Landlock and seccomp), simulated by the sandbox's own switch
(`SandboxLimits.layers` without them), and with every layer on: each file-changing call aimed
at a folder outside the sandbox's, and each way to start a process (`_posixsubprocess` by every
loader, on this interpreter, on one where it is built in and on 3.10), shown stopped by trying
it for real; model-written code refused where no kernel boundary holds unless the limits opt in;
the macOS Seatbelt profile (its text here; the profile at work where sandbox-exec exists)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlxlab.sandbox.confine import (
    SANDBOX_EXEC,
    SandboxLimits,
    SandboxRefused,
    run_code,
    sandbox_layers,
    sandbox_refusal,
    seatbelt_profile,
)

CONFINE = Path(__file__).parents[1] / "src" / "mlxlab" / "sandbox" / "confine.py"
# The audit hook alone: the kernel layers switched off, the opt-in set
PYTHON_ONLY = SandboxLimits(cpu_s=2, wall_s=8.0, layers=("rlimits", "audit"),
                            python_only_not_a_boundary=True)
ALL_ON = SandboxLimits(cpu_s=2, wall_s=8.0)
SHM_NAME = f"mlxlab-sandbox-{uuid.uuid4().hex[:12]}"  # POSIX shared memory: /dev/shm/<it>


def changes(victim: Path) -> dict[str, str]:
    """Programs that try to change folder `victim` (holding f, sub/, and nothing else), by the
    call they use; each prints "escaped" if it got through."""
    f, sub, v = str(victim / "f"), str(victim / "sub"), str(victim)
    return {
        "os.remove": f"import os\nos.remove({f!r})",
        "os.unlink": f"import os\nos.unlink({f!r})",
        "os.rename": f"import os\nos.rename({f!r}, {v!r} + '/g')",
        "os.rename in": f"import os\nos.rename({f!r}, 'taken')",
        "os.replace": f"import os\nos.replace({f!r}, {v!r} + '/g')",
        "os.mkdir": f"import os\nos.mkdir({v!r} + '/d')",
        "os.makedirs": f"import os\nos.makedirs({v!r} + '/d/e')",
        "os.rmdir": f"import os\nos.rmdir({sub!r})",
        "os.chmod": f"import os\nos.chmod({f!r}, 0o777)",
        "os.utime": f"import os\nos.utime({f!r}, (0, 0))",
        "os.truncate": f"import os\nos.truncate({f!r}, 0)",
        "os.symlink": f"import os\nos.symlink({f!r}, 'link')\nopen('link', 'w').write('x')",
        "os.link": f"import os\nos.link({f!r}, 'hard')\nopen('hard', 'w').write('x')",
        "os.mkfifo": f"import os\nos.mkfifo({v!r} + '/fifo')",
        "os.mknod": f"import os\nos.mknod({v!r} + '/node')",
        "open w": f"open({f!r}, 'w').write('x')",
        "open a": f"open({f!r}, 'a').write('x')",
        "os.open": f"import os\nos.open({v!r} + '/new', os.O_CREAT | os.O_WRONLY)",
        "dir_fd": f"import os\nfd = os.open({v!r}, os.O_RDONLY)\nos.remove('f', dir_fd=fd)",
        "dir_fd open": "import os\nfd = os.open('.', os.O_RDONLY)\n"
                       "os.open('../../' * 20 + " + repr(v.lstrip("/") + "/new") +
                       ", os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        "shutil.rmtree": f"import shutil\nshutil.rmtree({sub!r})",
        "shutil.copy": f"import shutil\nopen('x', 'w').write('x')\nshutil.copy('x', {f!r})",
        "shutil.move": f"import shutil\nshutil.move({f!r}, 'moved')",
        "shutil.copytree": f"import shutil, os\nos.mkdir('t')\nshutil.copytree('t', {v!r} + '/t')",
        "readline": f"import readline\nreadline.write_history_file({v!r} + '/history')",
        "dbm": f"import dbm.ndbm\ndbm.ndbm.open({v!r} + '/db', 'c').close()",  # Debian's
        "sqlite3": f"import sqlite3\nsqlite3.connect({v!r} + '/db').execute('create table t(x)')",
        "shm": "from multiprocessing import shared_memory\n"
               f"shared_memory.SharedMemory({SHM_NAME!r}, create=True, size=8)",
    }


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every name under `folder` with its content, mode and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        out[str(path.relative_to(folder))] = (content, stat.st_mode, stat.st_mtime_ns)
    return out


@pytest.fixture()
def victim(tmp_path):
    """A folder outside the sandbox's that the user can write: f ("kept") and sub/."""
    folder = tmp_path / "victim"
    (folder / "sub").mkdir(parents=True)
    (folder / "f").write_text("kept")
    return folder


def run_each(programs: dict[str, str], limits: SandboxLimits) -> dict:
    """Each program's result, four at a time; each prints "escaped" when it got through."""
    with ThreadPoolExecutor(4) as pool:
        runs = pool.map(lambda code: run_code(code + "\nprint('escaped')\n", limits),
                        programs.values())
        return dict(zip(programs, runs, strict=True))


def kernel_layers() -> list[str]:
    return [name for name in ("landlock", "seccomp") if name not in sandbox_layers()]


@pytest.mark.parametrize("python", ["this", "built in", "3.10"])
def test_no_file_outside_the_folder_changes_under_the_audit_hook_alone(victim, python):
    """Each call, here (3.11), on Debian's interpreter (its _dbm) and on 3.10."""
    before = snapshot(victim)
    results = on(python, changes(victim))
    assert snapshot(victim) == before, {name: r[1][-300:] for name, r in results.items()}
    assert not Path("/dev/shm", SHM_NAME).exists()
    for name, (stdout, stderr, layers) in results.items():
        assert "escaped" not in stdout and "Error" in stderr, (name, stderr)
        assert layers[:2] == ["rlimits", "audit"], name


def test_the_result_says_which_boundary_held():
    assert run_code("pass", PYTHON_ONLY).boundary == []
    if not kernel_layers():
        assert run_code("pass").boundary == ["landlock", "seccomp"]


def test_no_file_outside_the_folder_changes_with_every_layer_on(victim):
    """Landlock has no right for a file's mode, owner, times or extended attributes (nor, before
    ABI 3, truncate): the audit hook checks those beside it (os.chmod and os.utime got through
    Landlock and seccomp before)."""
    if kernel_layers():
        pytest.skip(f"this kernel lacks {kernel_layers()}")
    before = snapshot(victim)
    results = run_each(changes(victim), ALL_ON)
    assert snapshot(victim) == before, {name: r.stderr[-300:] for name, r in results.items()}
    assert not Path("/dev/shm", SHM_NAME).exists()
    for name, result in results.items():
        assert "escaped" not in result.stdout, (name, result.stderr[-400:])


def test_the_folder_itself_stays_writable_under_the_audit_hook():
    """What the hook refuses outside the folder, it lets through inside it."""
    code = ("import os, shutil, sqlite3\nos.makedirs('d/e')\nopen('d/x', 'w').write('1')\n"
            "os.rename('d/x', 'd/y')\nos.replace('d/y', 'd/z')\nos.chmod('d/z', 0o600)\n"
            "os.utime('d/z', (0, 0))\nos.truncate('d/z', 0)\nshutil.copy('d/z', 'c')\n"
            "shutil.move('c', 'd/e/c')\nsqlite3.connect('db').execute('create table t(x)')\n"
            "fd = os.open('d', os.O_RDONLY)\nos.remove('z', dir_fd=fd)\nos.close(fd)\n"
            "os.rmdir('d/e') if False else shutil.rmtree('d')\nos.remove('db')\n"
            "print(sorted(os.listdir('.')))\n")
    result = run_code(code, PYTHON_ONLY)
    assert result.stdout == "['main.py']\n", result.stderr[-600:]


# Each way to start a process: it would leave MARKER behind. FORK_EXEC calls the function `fe`
# the line before it found (the raw _posixsubprocess.fork_exec, which raises no audit event).
FORK_EXEC = ("import os, sys\nr, w = os.pipe()\n"
             "tail = ((-1, -1, None, -1, -1, None, False) if sys.version_info >= (3, 11)\n"
             "        else (None, None, None, -1, None))\n"
             "pid = fe([b'/bin/sh', b'-c', b'touch MARKER'], [b'/bin/sh'], True, (w,), None,\n"
             "         None, -1, -1, -1, -1, -1, -1, r, w, False, False, *tail)\n"
             "os.waitpid(pid, 0)\n")


def starts(marker: str) -> dict[str, str]:
    """Programs that try to start a process (`touch marker`), by the route they take."""
    so = "glob.glob(os.path.dirname(os.__file__) + '/lib-dynload/_posixsubprocess*')[0]"
    loaders = {
        "sys.modules": "import subprocess, sys\nfe = sys.modules['_posixsubprocess'].fork_exec",
        "import": "import _posixsubprocess\nfe = _posixsubprocess.fork_exec",
        "subprocess namespace": "import subprocess\n"
                                "fe = getattr(subprocess, '_posixsubprocess', None)\n"
                                "fe = fe.fork_exec if fe else subprocess._fork_exec",
        "BuiltinImporter": "import importlib.machinery as m\nfe = m.BuiltinImporter."
                           "create_module(m.ModuleSpec('_posixsubprocess', None)).fork_exec",
        "_imp.create_builtin": "import _imp, importlib.machinery as m\nfe = _imp.create_builtin("
                               "m.ModuleSpec('_posixsubprocess', None)).fork_exec",
        "_imp.create_builtin dotted": "import _imp, importlib.machinery as m\n"
                                      "fe = _imp.create_builtin(m.ModuleSpec("
                                      "'x._posixsubprocess', None)).fork_exec",
        "ExtensionFileLoader": "import glob, os, importlib.util as u\nfe = u.module_from_spec("
                               f"u.spec_from_file_location('_posixsubprocess', {so})).fork_exec",
        "guard's original": "import _imp, importlib.machinery as m\n"
                            "fe = _imp.create_builtin.__kwdefaults__['_original'](m.ModuleSpec("
                            "'_posixsubprocess', None)).fork_exec",
        "gc": "import gc\nfe = next(o for o in gc.get_objects() if getattr(o, '__name__', '') "
              "== 'fork_exec' and 'posix' in repr(o))",
    }
    programs = {name: code + "\n" + FORK_EXEC.replace("MARKER", marker)
                for name, code in loaders.items()}
    touch = f"['/bin/sh', '-c', 'touch {marker}']"
    programs |= {
        "subprocess.run": f"import subprocess\nsubprocess.run({touch})",
        "os.system": f"import os\nos.system('touch {marker}')",
        "os.popen": f"import os\nos.popen('touch {marker}').read()",
        "os.posix_spawn": f"import os\nos.waitpid(os.posix_spawn('/bin/sh', {touch}, {{}}), 0)",
        "os.fork": f"import os\nif os.fork() == 0:\n    open({marker!r}, 'w')\n    os._exit(0)",
        "os.execv": f"import os\nos.execv('/bin/sh', {touch})",
        "pty.spawn": f"import pty\npty.spawn({touch})",
        "multiprocessing": "import multiprocessing as mp\n"
                           f"p = mp.Process(target=open, args=({marker!r}, 'w'))\np.start()\n"
                           "p.join()",
        "ctypes": f"import ctypes\nctypes.CDLL(None).system(b'touch {marker}')",
        "subinterpreter": "import _xxsubinterpreters as i\n"
                          f"i.run_string(i.create(), 'import os; os.system(\"touch {marker}\")')",
    }
    return programs


# Run by another interpreter: confine.py by its path (it imports nothing of mlxlab), the
# programs given, their results as JSON
OTHER = """import importlib.util, json, sys
spec = importlib.util.spec_from_file_location('confine', sys.argv[1])
confine = importlib.util.module_from_spec(spec)
sys.modules['confine'] = confine
spec.loader.exec_module(confine)
programs = json.loads(sys.argv[2])
limits = confine.SandboxLimits(cpu_s=2, wall_s=8.0, layers=('rlimits', 'audit'),
                               python_only_not_a_boundary=True)
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(4) as pool:
    runs = pool.map(lambda code: confine.run_code(code + "\\nprint('escaped')\\n", limits),
                    programs.values())
    out = dict(zip(programs, runs))
print(json.dumps({name: [r.stdout, r.stderr[-400:], list(r.layers)] for name, r in out.items()}))
"""


def other_python(version: str) -> str | None:
    """An interpreter of `version` on this machine (on PATH or pyenv's), None if none runs."""
    names = [shutil.which(f"python{version}"), f"/usr/bin/python{version}",
             *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))]
    for name in filter(os.path.exists, filter(None, names)):
        found = subprocess.run([name, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return name
    return None


def builtin_posixsubprocess_python() -> str | None:
    """An interpreter with _posixsubprocess built in (Debian's), None if none here."""
    for name in ("/usr/bin/python3.11", "/usr/bin/python3"):
        if os.path.exists(name):
            found = subprocess.run([name, "-c", "import sys; print('_posixsubprocess' in "
                                    "sys.builtin_module_names)"], capture_output=True, text=True)
            if found.stdout.strip() == "True":
                return name
    return None


def run_other(python: str, programs: dict[str, str]) -> dict:
    done = subprocess.run([python, "-c", OTHER, str(CONFINE), json.dumps(programs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def on(python: str, programs: dict[str, str]) -> dict:
    """Each program's [stdout, stderr, layer names] under the audit hook alone, run by this
    interpreter, by one with _posixsubprocess built in, or by 3.10 (skipped where none is)."""
    if python == "this":
        return {name: [r.stdout, r.stderr, list(r.layers)]
                for name, r in run_each(programs, PYTHON_ONLY).items()}
    found = builtin_posixsubprocess_python() if python == "built in" else other_python("3.10")
    if found is None:
        pytest.skip("no interpreter with _posixsubprocess built in here" if python == "built in"
                    else "no Python 3.10 here (apt has none; pyenv's is looked for)")
    return run_other(found, programs)


def assert_none_started(results: dict, marker: Path) -> None:
    said = {name: result[1][-300:] for name, result in results.items()}
    assert not marker.exists(), said
    for name, (stdout, stderr, layers) in results.items():
        assert "escaped" not in stdout, (name, stderr)
        assert "Error" in stderr, (name, stderr)
        assert layers[:2] == ["rlimits", "audit"], name


@pytest.mark.parametrize("python", ["this", "built in", "3.10"])
def test_no_process_starts_under_the_audit_hook_alone(tmp_path, python):
    """Each route, _posixsubprocess by every loader: here (3.11, an extension module), on an
    interpreter with it built in (Debian's: BuiltinImporter's route) and on 3.10 (where
    subprocess calls `subprocess._posixsubprocess.fork_exec`)."""
    marker = tmp_path / "marker"
    assert_none_started(on(python, starts(str(marker))), marker)


def test_no_process_starts_with_every_layer_on(tmp_path):
    if kernel_layers():
        pytest.skip(f"this kernel lacks {kernel_layers()}")
    marker = tmp_path / "marker"
    results = run_each(starts(str(marker)), ALL_ON)
    # the marker alone: os.system and os.popen answer a failed fork with a status, no error
    assert not marker.exists(), {name: r.stderr[-300:] for name, r in results.items()}
    assert all({"landlock", "seccomp", "audit"} <= set(r.layers) for r in results.values())


@pytest.mark.parametrize(("layers", "missing"), [
    (("rlimits", "audit"), ["landlock", "seccomp"]),
    (("rlimits", "netns", "pidns", "seccomp", "audit"), ["landlock"]),
    (("rlimits", "netns", "pidns", "landlock", "audit"), ["seccomp"]),
])
def test_code_is_refused_where_no_kernel_boundary_holds(tmp_path, layers, missing):
    """One line naming what is missing, nothing of the code run; the opt-in runs it."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w')\n"
    with pytest.raises(SandboxRefused) as refused:
        run_code(code, SandboxLimits(layers=layers))
    line = str(refused.value)
    assert "\n" not in line and "python_only_not_a_boundary" in line
    assert all(name in line for name in missing) and not marker.exists()
    if set(kernel_layers()) & (set(layers) - {"rlimits", "audit"}):
        return  # the kernel lacks a layer the opt-in run would still need for the marker
    run_code(code.replace(str(marker), "inside"), SandboxLimits(
        layers=layers, python_only_not_a_boundary=True))


def test_a_kernel_boundary_runs_the_code_without_the_opt_in():
    if kernel_layers():
        pytest.skip(f"this kernel lacks {kernel_layers()}")
    result = run_code("print('ran')")
    assert result.stdout == "ran\n" and {"landlock", "seccomp"} <= set(result.layers)
    assert sandbox_refusal() is None


@pytest.mark.slow  # transformers' import (the tool's schema) costs ~10 s
def test_the_opt_in_is_a_tool_target_the_model_cannot_set():
    """The opt-in's tool is `run_python` to the model, with `code` its only argument."""
    from mlxlab.objectives.rl import python_only_not_a_boundary
    from mlxlab.objectives.rl.tools import build_tools

    (tool,) = build_tools([{"_target_": "mlxlab.objectives.rl.python_only_not_a_boundary."
                                        "run_python"}])
    assert tool.name == "run_python"
    assert list(tool.schema["function"]["parameters"]["properties"]) == ["code"]
    assert python_only_not_a_boundary.PYTHON_ONLY.python_only_not_a_boundary
    assert tool.fn("print(6 * 7)") == "42"


def test_the_seatbelt_profile_confines_to_its_folder_and_has_no_network(tmp_path):
    """The profile's text (macOS's sandbox-exec reads it): everything denied but what it
    allows; writing only under the run's folder (its real path, quoted); no network rule."""
    scratch = tmp_path / 'run "1"' / "work"
    scratch.mkdir(parents=True)
    profile = seatbelt_profile(str(scratch), ["/opt/python"])
    lines = profile.splitlines()
    assert lines[:3] == ["(version 1)", "(deny default)", "(deny network*)"]
    quoted = '"' + os.path.realpath(scratch).replace('"', '\\"') + '"'
    writes = [line for line in lines if "file-write*" in line]
    assert writes == [f"(allow file-read* file-write* (subpath {quoted}))"]
    assert not any("network" in line for line in lines if line.startswith("(allow"))
    assert "process-fork" not in profile and "(allow process-exec (literal" in profile
    assert '(subpath "/opt/python")' in profile


@pytest.mark.skipif(not os.path.exists(SANDBOX_EXEC),
                    reason=f"no {SANDBOX_EXEC}: Seatbelt is macOS's")
def test_seatbelt_holds_on_macos(victim, tmp_path):
    """Where sandbox-exec exists: the code runs under the profile, which stops writes outside
    its folder, processes and network by itself (the Python layers aside: the kernel's)."""
    marker = tmp_path / "marker"
    programs = {"write": f"open({str(victim / 'f')!r}, 'w').write('x')",
                "process": "import os\n" + FORK_EXEC.replace("fe(", "__import__("
                           "'_posixsubprocess').fork_exec(").replace("MARKER", str(marker)),
                "socket": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)"}
    limits = SandboxLimits(cpu_s=2, wall_s=8.0, layers=("seatbelt", "rlimits"))
    before = snapshot(victim)
    for name, result in run_each(programs, limits).items():
        assert "seatbelt" in result.layers and "escaped" not in result.stdout, name
    assert snapshot(victim) == before and not marker.exists()


def test_the_config_check_refuses_a_tool_that_would_refuse_here(tmp_path, monkeypatch):
    """objective.tools is checked before the run folder exists: run_python passes where a kernel
    boundary holds and is refused with the sandbox's own line where none does; any tool whose
    `machine_refusal()` says a line is refused the same way."""
    import re

    from mlxlab.errors import ConfigError
    from mlxlab.objectives.rl.tools import check_tool_specs
    from mlxlab.sandbox.confine import sandbox_refusal

    said = sandbox_refusal()
    spec = [{"_target_": "mlxlab.objectives.rl.sandbox.run_python"}]
    if said is None:
        check_tool_specs(spec)
    else:
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_tool_specs(spec)
    (tmp_path / "refusing_tool.py").write_text(
        "def lookup(key: str) -> str:\n"
        "    \"\"\"Look a key up.\n\n    Args:\n        key: the key\n    \"\"\"\n"
        "    return key\n\n\n"
        "lookup.machine_refusal = lambda: 'no boundary on this machine'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"objective.tools\[0\] \(refusing_tool.lookup\): no "
                       "boundary on this machine"):
        check_tool_specs([{"_target_": "refusing_tool.lookup"}])
