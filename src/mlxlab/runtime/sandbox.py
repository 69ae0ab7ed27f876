"""Code nobody reviewed (what a model writes) run in a confined interpreter of its own.

`run_code(code, limits)` writes the code into a fresh scratch folder, runs it in a new Python
process (this interpreter's executable, `-I`: no PYTHONPATH, no user site, not the caller's
working folder) with a small environment of its own (nothing of the caller's: no tokens, no
keys), waits at most `limits.wall_s`, kills it (its process group) if it is still running, and
deletes the folder. What the code printed comes back cut to `limits.output_chars`.

The child confines itself before it runs the code (runtime/sandbox_child.py, in this order).
What each layer guarantees, and where it does not exist:

| layer | stops | enforced by | where it is missing |
|---|---|---|---|
| rlimits | CPU time past `cpu_s` (SIGXCPU, then SIGKILL), an address space past `memory_bytes` (MemoryError), files past `file_bytes` (EFBIG), more than `open_files` descriptors, core files; death with its parent | the kernel (setrlimit, prctl) | never (RLIMIT_NPROC counts all of a user's processes and does not bind root: the seccomp layer is what stops processes) |
| netns | every network connection: its own network namespace, with only a loopback that is down | the kernel (user + network namespaces) | kernels or containers that refuse unprivileged user namespaces |
| landlock | reading files outside the interpreter's installation, the system libraries and the scratch folder; writing outside the scratch folder; TCP bind/connect; signals and abstract unix sockets to processes outside | the kernel (Landlock LSM, Linux 5.13+; net 6.7+, scopes 6.12+) | older kernels, kernels without Landlock in their LSM list, macOS |
| seccomp | starting any process (fork, vfork, clone without CLONE_THREAD), creating a socket, io_uring | the kernel (seccomp-BPF, x86_64 and aarch64) | other architectures, macOS |
| audit | for each missing layer above, the same from Python: sockets, processes, opening files outside the folders; and ctypes | the sandboxed interpreter itself (sys.addaudithook) | never, but Python-level: code that reaches C through an extension module it may import passes it |

`sandbox_layers()` says which took effect on this machine (`SandboxResult.layers` for each run).
Not covered by any layer: the wall clock past `wall_s` (the parent kills it), disk space inside
the scratch folder beyond `file_bytes` per file, reading what the interpreter's installation
holds (its site-packages: no secrets by convention, but readable), and kernel bugs. Where the
kernel layers are all there, the code runs with no network, no new processes and no files but
its folder and the interpreter's; where they are not, treat it as a guard against accidents, not
against an adversary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
LAYERS = ("rlimits", "netns", "landlock", "seccomp", "audit")
# What the confined interpreter may read besides its scratch folder: the system's libraries
# (the loader and what extension modules link), nothing of /etc but the loader's cache.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache",
               "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom",
               "/sys/devices/system/cpu")


@dataclass(frozen=True)
class SandboxLimits:
    """What a sandboxed run may use: seconds of CPU and of wall clock, bytes of address space
    and per file written, open descriptors, processes (RLIMIT_NPROC: per user), characters of
    output kept (each of stdout and stderr), and the layers applied (module docstring)."""

    cpu_s: int = 5
    wall_s: float = 8.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 256
    output_chars: int = 4000
    layers: tuple[str, ...] = LAYERS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layers) - set(LAYERS))
        if unknown:
            raise ValueError(f"unknown sandbox layers {unknown}: choose from {list(LAYERS)}")


@dataclass
class SandboxResult:
    """A sandboxed run: its exit code (negative: the signal that ended it), what it printed
    (each cut to output_chars; `cut`: how many characters were left out), whether the parent
    killed it at the wall limit, the layers that took effect and the seconds it took."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cut: int = 0

    @property
    def stopped(self) -> str | None:
        """Why the run was stopped by a limit (None: it ended by itself)."""
        if self.timed_out:
            return "wall-clock limit"
        if self.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "CPU time limit"
        if self.returncode == -signal.SIGXFSZ:
            return "file size limit"
        return None


def _read_paths() -> list[str]:
    """The interpreter's installation (stdlib, extension modules, site-packages) and SYSTEM_READ."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {p for p in sysconfig.get_paths().values() if p}
    return sorted(paths | set(SYSTEM_READ))


def _environment(scratch: str) -> dict[str, str]:
    """The child's whole environment: none of the caller's variables."""
    return {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cut(path: Path, chars: int) -> tuple[str, int]:
    """The first `chars` characters of a file the child wrote (at most file_bytes) and how many
    more it held."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text[:chars], max(0, len(text) - chars)


def run_code(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` confined (module docstring); the scratch folder is gone when this returns."""
    limits = limits or SandboxLimits()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlxlab-sandbox-") as private:
        scratch = Path(private) / "work"
        scratch.mkdir(mode=0o700)
        program = scratch / "main.py"
        program.write_text(code, encoding="utf-8")
        config = {"layers": list(limits.layers), "scratch": str(scratch), "code": str(program),
                  "read": _read_paths(),
                  "limits": {**asdict(limits), "parent": os.getpid()}}
        config["limits"].pop("layers")
        status_r, status_w = os.pipe()
        with open(Path(private) / "stdout", "wb") as out, \
                open(Path(private) / "stderr", "wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-I", str(CHILD), json.dumps(config), str(status_w)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch,
                env=_environment(str(scratch)), pass_fds=(status_w,), start_new_session=True)
            os.close(status_w)
            timed_out = False
            try:
                child.wait(limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        with os.fdopen(status_r) as status:
            said = status.read()
        stdout, cut_out = _cut(Path(private) / "stdout", limits.output_chars)
        stderr, cut_err = _cut(Path(private) / "stderr", limits.output_chars)
        shutil.rmtree(scratch, ignore_errors=True)
    layers = json.loads(said) if said else []
    return SandboxResult(child.returncode, stdout, stderr, timed_out, layers,
                         time.monotonic() - start, cut_out + cut_err)


_layers: list[str] = []


def sandbox_layers() -> list[str]:
    """The layers that take effect on this machine (one sandboxed run of nothing, once)."""
    if not _layers:
        _layers.extend(run_code("pass").layers)
    return list(_layers)
