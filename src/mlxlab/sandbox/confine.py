"""Code nobody reviewed (what a model writes) run in a confined interpreter of its own.

`run_code(code, limits)` writes the code into a fresh scratch folder, runs it in a new Python
process (this interpreter's executable, `-I`: no PYTHONPATH, no user site, not the caller's
working folder) with a small environment of its own (nothing of the caller's: no tokens, no
keys), waits at most `limits.wall_s`, kills it (its process group) if it is still running, and
deletes the folder. What the code printed comes back cut to `limits.output_chars`.

The child confines itself before it runs the code (sandbox/child.py, in this order).
What each layer guarantees, and where it does not exist:

| layer | stops | enforced by | where it is missing |
|---|---|---|---|
| seatbelt | on macOS: everything its profile (`seatbelt_profile`) does not allow: any network, reading but the interpreter's installation, the system's libraries and the scratch folder, writing outside the folder, any new process (exec of the interpreter alone) | the kernel (Seatbelt: the parent starts the child with `/usr/bin/sandbox-exec -p PROFILE`, as OpenAI's Codex CLI confines a model's commands) | Linux (there: landlock and seccomp) |
| rlimits | CPU time past `cpu_s` (SIGXCPU, then SIGKILL), an address space past `memory_bytes` (MemoryError), files past `file_bytes` (EFBIG), more than `open_files` descriptors, core files; death with its parent | the kernel (setrlimit, prctl) | never (RLIMIT_NPROC counts all of a user's processes and does not bind root: the seccomp layer is what stops processes); macOS takes RLIMIT_AS and ignores it, and has no prctl: there a watchdog thread in the parent kills the run when its resident size passes `memory_bytes` (read every 0.1 s, so it may pass it by what it allocates in that time), and a thread in the child ends it once its parent is gone |
| netns | every network connection: its own network namespace, with only a loopback that is down | the kernel (user + network namespaces) | kernels or containers that refuse unprivileged user namespaces, macOS |
| pidns | reaching any other process by pid (kill, killpg, kill(-1), F_SETOWN's SIGIO, prlimit, ptrace, /proc/PID): its own PID namespace, where it is PID 1 and alone, with a /proc of its own | the kernel (user + PID + mount namespaces) | as netns; a /proc that cannot be remounted (some containers) stays the host's, which landlock or the audit hook keep unread |
| landlock | reading files outside the interpreter's installation, the system libraries and the scratch folder; writing outside the scratch folder; TCP bind/connect; signals and abstract unix sockets to processes outside | the kernel (Landlock LSM, Linux 5.13+: files from ABI 1, TCP from ABI 4 (6.7+), signal and abstract-socket scopes from ABI 6 (6.12+)) | older kernels (on 5.13-6.11, e.g. Ubuntu 22.04/24.04 and Debian 12: no scopes, so no signal rule), kernels without Landlock in their LSM list, macOS |
| seccomp | starting any process (fork, vfork, clone without CLONE_THREAD), creating a socket, io_uring; any signal but to itself (kill to 0 or its own pid; tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo to its own; pidfd_send_signal never), F_SETOWN, ptrace, process_vm_readv/writev, pidfd_open/getfd, prlimit64 on another process | the kernel (seccomp-BPF, x86_64 and aarch64; the filter holds its pid, 1 in its namespace) | other architectures, macOS |
| audit | always: ctypes, and signals to other processes (os.kill but to 0 or itself, os.killpg but of 0, F_SETOWN, resource.prlimit of another process; os.pidfd_open and signal.pidfd_send_signal are taken out); for each missing layer above, the same from Python: sockets, processes (os.fork, exec, spawn, system, subprocess, pty, sub-interpreters; `_posixsubprocess`, whose fork_exec raises no event, by every loader: sys.modules, subprocess's namespace, import, `_imp.create_builtin` and `create_dynamic`), opening or listing files outside the folders, changing any file outside its folder (open for writing, os.remove, rename, mkdir, rmdir, chmod, chown, truncate, utime, xattrs, links, mkfifo, mknod, shutil, sqlite3, POSIX shared memory); beside Landlock, a file's mode, owner, times and extended attributes outside its folder (Landlock has no right for them) | the sandboxed interpreter itself (sys.addaudithook) | never, but Python-level: code that reaches C through an extension module it may import passes it |

Landlock has no rule for another process's resource limits (prlimit): pidns, seccomp and the
audit hook each stop that. `sandbox_layers()` says which took effect on this machine and what
each enforces there, e.g.
Landlock's ABI (`SandboxResult.layers` for each run: name -> that line, in order; "watchdog"
where the parent bounded the memory). Being PID 1 changes how signals end the code: a signal it
sends itself without a handler (SIGTERM, abort's SIGABRT) does not end it, nor does SIGXCPU
(its CPU limit ends it by SIGKILL instead, at the same `cpu_s`); its parent outside the
namespace waits for it and ends as it ended. Not covered by any layer: the wall clock past
`wall_s` (the parent kills it), disk space inside the scratch folder beyond `file_bytes` per
file, reading what the interpreter's installation holds (its site-packages: no secrets by
convention, but readable), and kernel bugs. Where the kernel layers are all there, the code
runs with no network, no new processes, no other process in reach and no files but its folder
and the interpreter's; where they are not, treat it as a guard against accidents, not against an
adversary. On macOS, seatbelt is the boundary (with rlimits without RLIMIT_AS, the watchdog
and the audit hook).

Where no kernel layer confines the code's files and processes (landlock and seccomp, or
seatbelt), `run_code` refuses it: SandboxRefused, one line naming what is missing, nothing of
the code run; `sandbox_refusal()` says that line for this machine ahead of a run. Limits with
`python_only_not_a_boundary=True` run it under the audit hook alone (with what else took
effect), a guard against accidents and no security boundary; the GRPO tool for that is
objectives/rl/python_only_not_a_boundary.py's `run_python`.
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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHILD = Path(__file__).with_name("child.py")
LAYERS = ("seatbelt", "rlimits", "netns", "pidns", "landlock", "seccomp", "audit")
WATCH_S = 0.1  # how often the memory watchdog (where no RLIMIT_AS binds) reads the RSS
# What the confined interpreter may read besides its scratch folder: the system's libraries
# (the loader and what extension modules link), nothing of /etc but the loader's cache.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache",
               "/etc/localtime", "/dev/null", "/dev/zero", "/dev/urandom",
               "/sys/devices/system/cpu")
SANDBOX_EXEC = "/usr/bin/sandbox-exec"  # macOS's, by its path: never one found on PATH
# What a macOS interpreter reads besides its installation: the system's libraries and
# frameworks (the dyld cache under /System), time zones, the random and null devices.
SEATBELT_READ = ("/System", "/usr/lib", "/usr/share", "/Library/Apple", "/private/var/db/dyld",
                 "/private/var/db/timezone", "/private/etc/localtime", "/dev/urandom",
                 "/dev/random", "/dev/null", "/dev/zero")


@dataclass(frozen=True)
class SandboxLimits:
    """What a sandboxed run may use: seconds of CPU and of wall clock, bytes of address space
    and per file written, open descriptors, processes (RLIMIT_NPROC: per user), characters of
    output kept (each of stdout and stderr), and the layers applied (module docstring).
    `python_only_not_a_boundary`: run the code even where no kernel layer confines its files
    and processes (no Landlock and seccomp, no seatbelt), under the Python audit hook alone,
    which code reaching C can pass: a guard against accidents, not a security boundary."""

    cpu_s: int = 5
    wall_s: float = 8.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 256
    output_chars: int = 4000
    layers: tuple[str, ...] = LAYERS
    python_only_not_a_boundary: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layers) - set(LAYERS))
        if unknown:
            raise ValueError(f"unknown sandbox layers {unknown}: choose from {list(LAYERS)}")


class SandboxRefused(PermissionError):
    """No kernel boundary confines model-written code here and the limits do not opt in to the
    Python-level confinement alone (`SandboxLimits.python_only_not_a_boundary`): the message
    is one line naming what is missing."""


@dataclass
class SandboxResult:
    """A sandboxed run: its exit code (negative: the signal that ended it), what it printed
    (each cut to output_chars; `cut`: how many characters were left out), whether the parent
    killed it at the wall limit, the layers that took effect (in order: name -> what it
    enforced on this machine; "watchdog" where the parent bounded its memory), the seconds it
    took and whether the watchdog killed it."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    layers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cut: int = 0
    over_memory: bool = False

    @property
    def boundary(self) -> list[str]:
        """The kernel layers that confined its files and processes: ["seatbelt"] or
        ["landlock", "seccomp"]; [] where none did (the audit hook alone, opted in to)."""
        if "seatbelt" in self.layers:
            return ["seatbelt"]
        return ["landlock", "seccomp"] if {"landlock", "seccomp"} <= set(self.layers) else []

    @property
    def stopped(self) -> str | None:
        """Why the run was stopped by a limit (None: it ended by itself)."""
        if self.timed_out:
            return "wall-clock limit"
        if self.over_memory:
            return "memory limit"
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


def _sbpl(path: str) -> str:
    """A path as a Seatbelt profile's string literal."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _interpreters() -> list[str]:
    """The interpreter's executable as sandbox-exec starts it, and what that may exec in turn
    (a framework build's bin/python3 execs its Python.app)."""
    app = os.path.join(sys.base_prefix, "Resources", "Python.app", "Contents", "MacOS", "Python")
    found = {sys.executable, os.path.realpath(sys.executable), app, os.path.realpath(app)}
    return sorted(found)


def seatbelt_profile(scratch: str, read: list[str]) -> str:
    """The Seatbelt (macOS sandbox) profile of a run, as OpenAI's Codex CLI confines the
    commands a model writes there: everything denied but reading the interpreter's
    installation, `read` and SEATBELT_READ, reading and writing under `scratch`, exec of the
    interpreter alone (no fork: no other process), signals to itself; no network at all.
    Paths by their real path (Seatbelt matches /private/var, not /var). File metadata (stat)
    stays readable everywhere: the interpreter's start-up looks at paths it then does not
    open; names and contents outside are not listed or read."""
    reads = sorted({os.path.realpath(p) for p in (*read, *SEATBELT_READ)})
    lines = [
        "(version 1)",
        "(deny default)",
        "(deny network*)",
        "(allow process-exec " + " ".join(f"(literal {_sbpl(p)})" for p in _interpreters())
        + ")",
        "(allow signal (target self))",
        "(allow process-info* (target self))",
        "(allow sysctl-read)",
        "(allow file-read-metadata)",
        "(allow file-read* file-map-executable " + " ".join(f"(subpath {_sbpl(p)})"
                                                            for p in reads) + ")",
        f"(allow file-read* file-write* (subpath {_sbpl(os.path.realpath(scratch))}))",
        '(allow file-write-data (literal "/dev/null"))',
    ]
    return "\n".join(lines) + "\n"


def _seatbelt(limits: SandboxLimits) -> bool:
    """Whether this run starts under sandbox-exec (macOS, the layer asked for and there)."""
    return (sys.platform == "darwin" and "seatbelt" in limits.layers
            and os.path.exists(SANDBOX_EXEC))


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


def _watch_memory(pid: int, limit: int, done: threading.Event, over: list[bool]) -> None:
    """SIGKILL to process group `pid` once its processes' resident size passes `limit` bytes,
    read every WATCH_S (where no RLIMIT_AS bounds it: it allocates at most WATCH_S more)."""
    import psutil  # a dependency (macOS too), needed only where this runs

    def rss(process: psutil.Process) -> int:
        try:
            return process.memory_info().rss
        except psutil.Error:  # it ended between the listing and the reading
            return 0

    try:
        root = psutil.Process(pid)
        while not done.wait(WATCH_S):
            if sum(rss(p) for p in [root, *root.children(recursive=True)]) > limit:
                over.append(True)
                os.killpg(pid, signal.SIGKILL)
                return
    except (psutil.Error, ProcessLookupError):
        return  # it ended


def _command(config: dict, status_w: int, seatbelt: bool) -> list[str]:
    """The child's command line: the interpreter running child.py, under sandbox-exec with the
    run's profile where `seatbelt`."""
    command = [sys.executable, "-I", str(CHILD), json.dumps(config), str(status_w)]
    if seatbelt:
        return [SANDBOX_EXEC, "-p", seatbelt_profile(config["scratch"], config["read"]),
                *command]
    return command


def _wait(child: subprocess.Popen, limits: SandboxLimits, watched: bool) -> tuple[bool, bool]:
    """Wait for the child at most wall_s (then kill its process group), with the memory
    watchdog where `watched`; (timed out, over memory)."""
    done, over = threading.Event(), []
    if watched:
        threading.Thread(target=_watch_memory, daemon=True,
                         args=(child.pid, limits.memory_bytes, done, over)).start()
    timed_out = False
    try:
        child.wait(limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    done.set()
    return timed_out, bool(over)


def _run(code: str, limits: SandboxLimits) -> tuple[SandboxResult, str | None]:
    """A confined run of `code` (module docstring) and the line refusing it (None: it ran)."""
    start = time.monotonic()
    seatbelt = _seatbelt(limits)
    with tempfile.TemporaryDirectory(prefix="mlxlab-sandbox-") as private:
        scratch = Path(private) / "work"
        scratch.mkdir(mode=0o700)
        program = scratch / "main.py"
        program.write_text(code, encoding="utf-8")
        config = {"layers": list(limits.layers), "scratch": str(scratch), "code": str(program),
                  "read": _read_paths(), "limits": {**asdict(limits), "parent": os.getpid()},
                  "python_only_not_a_boundary": limits.python_only_not_a_boundary,
                  "seatbelt": "sandbox-exec profile: no network, reads only the interpreter's "
                              "and system files and its folder, writes only its folder, no "
                              "process but the interpreter itself" if seatbelt else None}
        for key in ("layers", "python_only_not_a_boundary"):
            config["limits"].pop(key)
        status_r, status_w = os.pipe()
        with open(Path(private) / "stdout", "wb") as out, \
                open(Path(private) / "stderr", "wb") as err:
            child = subprocess.Popen(
                _command(config, status_w, seatbelt), stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, cwd=scratch, env=_environment(str(scratch)), pass_fds=(status_w,),
                start_new_session=True)
            os.close(status_w)
            # RLIMIT_AS bounds memory on Linux only (macOS accepts it and ignores it)
            watched = sys.platform != "linux" or "rlimits" not in limits.layers
            timed_out, over = _wait(child, limits, watched)
        with os.fdopen(status_r) as status:
            said = json.loads(status.read() or "{}")
        stdout, cut_out = _cut(Path(private) / "stdout", limits.output_chars)
        stderr, cut_err = _cut(Path(private) / "stderr", limits.output_chars)
        shutil.rmtree(scratch, ignore_errors=True)
    layers, refused = said.get("layers", {}), said.get("refused")
    if seatbelt and not said:  # sandbox-exec refused the profile: the child never started
        refused = ("the sandbox refuses to run model-written code: sandbox-exec did not start "
                   f"it ({stderr.strip().splitlines()[-1:] or child.returncode})")
    if watched:
        layers["watchdog"] = (f"the parent kills it past {limits.memory_bytes >> 20} MiB "
                              f"resident, read every {WATCH_S} s")
    return SandboxResult(child.returncode, stdout, stderr, timed_out, layers,
                         time.monotonic() - start, cut_out + cut_err, over), refused


def run_code(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` confined (module docstring); the scratch folder is gone when this returns.
    SandboxRefused (one line naming what is missing) where no kernel boundary confines it and
    the limits do not opt in to the Python-level confinement alone; nothing of it ran."""
    result, refused = _run(code, limits or SandboxLimits())
    if refused:
        raise SandboxRefused(refused)
    return result


_found: dict[str, object] = {}


def _this_machine() -> tuple[dict[str, str], str | None]:
    """The layers the default limits get here and their refusal line (one run of nothing, once)."""
    if not _found:
        result, refused = _run("pass", SandboxLimits())
        _found.update(layers=result.layers, refused=refused)
    return dict(_found["layers"]), _found["refused"]  # type: ignore[arg-type, return-value]


def sandbox_layers() -> dict[str, str]:
    """The layers that take effect on this machine, each with what it enforces here (a copy)."""
    return _this_machine()[0]


def sandbox_refusal() -> str | None:
    """The line run_code refuses model-written code with on this machine under the default
    limits (no kernel boundary here), or None: a config check can say it before a run starts."""
    return _this_machine()[1]
