"""The sandboxed interpreter's first steps: confine this process, then run the code.

Run by sandbox/confine.py as `python -I child.py CONFIG STATUS_FD` (a script by path: it
imports nothing of mlxlab, so nothing runs before the confinement but the interpreter's own
start-up). In order, each layer the config asks for (sandbox/confine.py says what each
guarantees):

1. `rlimits`: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and no core
   files; and SIGKILL when the parent (the tool's worker) dies (Linux prctl).
2. `netns`: unshare(CLONE_NEWUSER | CLONE_NEWNET): a network namespace of its own, whose only
   interface is a loopback that is down (Linux, where unprivileged user namespaces are allowed).
3. `pidns`: unshare(CLONE_NEWPID | CLONE_NEWNS), then fork: the code runs as PID 1 of a PID
   namespace of its own, where no other process exists (kill, killpg, F_SETOWN, prlimit, ptrace
   by pid find nothing), with /proc remounted to show only that namespace. This process stays
   outside as its relay: it waits for PID 1 and ends as it ended (exit code or signal), so the
   parent's wait and its SIGKILL to the process group work as before.
4. `landlock`: the Landlock LSM (Linux 5.13+): files readable only under the `read` paths (the
   interpreter's installation, system libraries), readable and writable only in the scratch
   folder, nothing else; TCP bind/connect refused (ABI 4+), abstract unix sockets and signals
   to processes outside scoped away (ABI 6+). It also forbids mount and pivot_root.
5. `seccomp`: a seccomp-BPF filter (x86_64, aarch64): no new processes (fork, vfork, clone
   without CLONE_THREAD; clone3 answers ENOSYS so threads fall back to clone), no sockets
   (socket, socketpair), no io_uring; signals to itself only (kill to 0 or its own pid; tkill,
   tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo to its own; pidfd_send_signal, pidfd_open,
   pidfd_getfd, ptrace, process_vm_readv/writev never; prlimit64 on itself only; fcntl's
   F_SETOWN and F_SETOWN_EX, which aim SIGIO at any pid, never); each refused with EPERM. The
   filter is built knowing its own pid (1 in its PID namespace), as BPF cannot read it.
6. `audit`: for the layers above that this kernel refused, a Python audit hook refusing the
   same from Python (sockets; processes: os.fork, exec, spawn, system, subprocess, pty,
   sub-interpreters and `_posixsubprocess` by every loader; opening or listing files outside
   the folders and changing any file outside its folder: open for writing, os.remove, rename,
   mkdir, rmdir, chmod, truncate, utime, links, shutil, sqlite3; signals to other processes:
   os.kill, os.killpg, F_SETOWN, resource.prlimit); beside Landlock, a file's mode, owner,
   times and extended attributes outside the folder (Landlock has no right for them).
   Python-level only: code that reaches C (ctypes is refused by it too, but other C
   extensions are not) can pass.

Where no kernel layer confines files and processes (landlock and seccomp, or the parent's
seatbelt on macOS), the code does not run: the status says the one line refusing it, unless
the config opts in (`python_only_not_a_boundary`).

Off Linux, a thread ends the process when its parent (the tool's worker) is gone, as
PR_SET_PDEATHSIG does on Linux. What each layer enforces here (a name and a line each) is
written to STATUS_FD as JSON before the code runs ({"layers": ..., "refused": line or null}).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import resource
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
SECCOMP_MODE_FILTER = 2
CLONE_THREAD, CLONE_NEWUSER, CLONE_NEWNET = 0x10000, 0x10000000, 0x40000000
CLONE_NEWNS, CLONE_NEWPID = 0x20000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
EPERM, ENOSYS = 1, 38
F_SETOWN, F_SETOWN_EX = 8, 15  # fcntl commands that aim SIGIO/SIGURG at a pid or pgid
PARENT_CHECK_S = 0.2  # off Linux: how often the child looks for its parent

# The system-call numbers the filter names (x86_64's, aarch64's) and the audit arch value.
SYSCALLS = {
    "x86_64": {"arch": 0xC000003E, "socket": 41, "socketpair": 53, "clone": 56, "fork": 57,
               "vfork": 58, "clone3": 435, "io_uring_setup": 425, "kill": 62, "tkill": 200,
               "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
               "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "prlimit64": 302,
               "fcntl": 72},
    "aarch64": {"arch": 0xC00000B7, "socket": 198, "socketpair": 199, "clone": 220,
                "clone3": 435, "io_uring_setup": 425, "kill": 129, "tkill": 130, "tgkill": 131,
                "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424,
                "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "prlimit64": 261, "fcntl": 25},
}
# Never allowed: processes and sockets, and the calls that reach another process by pidfd or
# by ptrace (a pidfd names no pid the filter could compare).
DENIED = ("socket", "socketpair", "fork", "vfork", "io_uring_setup", "pidfd_send_signal",
          "pidfd_open", "pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev")
# Allowed only when this argument (its low 32 bits: the kernel reads a pid_t) is 0 or its own
# pid: kill(0) is its own process group, prlimit64(0) itself.
SELF_ONLY = {"kill": (0, True), "tkill": (0, False), "tgkill": (0, False),
             "rt_sigqueueinfo": (0, False), "rt_tgsigqueueinfo": (0, False),
             "prlimit64": (0, True)}
LANDLOCK = {"create": 444, "add_rule": 445, "restrict": 446}  # the same on every arch

# The audit hook's events (audit layer). Processes: what starts one or another interpreter
# (whose own audit hooks are none of this one's).
PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system",
                            "os.exec", "subprocess.Popen", "pty.spawn", "os.startfile",
                            "cpython.PyInterpreterState_New"})
SOCKET_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                           "socket.getaddrinfo", "syslog.openlog", "syslog.syslog"})
CTYPES_EVENTS = frozenset({"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                           "ctypes.call_function"})
# Where an object the hook keeps out of reach could be found again (a loader guard's original,
# the interpreter's kept copy of _posixsubprocess): refused with the process rules.
FINDING_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
# Extension modules whose C code starts a process or an interpreter with no event of its own,
# refused by the last part of their name however they are loaded (with the process rules)
PROCESS_MODULES = frozenset({"_posixsubprocess", "_xxsubinterpreters", "_interpreters",
                             "_xxinterpchannels", "_interpchannels", "_interpqueues",
                             "_testcapi", "_testinternalcapi", "_testmultiphase",
                             "_testsinglephase"})
# ... and those that make files with no event (POSIX shared memory and named semaphores in
# /dev/shm, dbm files, readline's history files): refused with the file rules, as the calls
# below are taken out
FILE_MODULES = frozenset({"_posixshmem", "_multiprocessing", "_dbm", "_gdbm", "readline"})
NO_EVENT_FILE_CALLS = ("mkfifo", "mknod")
# File-changing events: (the argument naming a path it changes, the argument naming that
# path's dir_fd or None), as CPython 3.10-3.13 raise them (os.unlink raises os.remove,
# os.replace os.rename, os.lchmod and os.fchmod os.chmod, os.ftruncate os.truncate)
WRITES = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
          "os.rename": ((0, 2), (1, 3)), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
          "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.setxattr": ((0, None),),
          "os.removexattr": ((0, None),), "os.chflags": ((0, None),),
          "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),),
          "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
          "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)),
          "shutil.chown": ((0, None),), "shutil.make_archive": ((0, None),),
          "shutil.unpack_archive": ((1, None),)}
# What Landlock does not cover (it has no right for a file's mode, owner, times or extended
# attributes; truncate only from ABI 3): checked by the hook whether Landlock took effect or not
METADATA = frozenset({"os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr",
                      "os.chflags", "shutil.copymode", "shutil.copystat", "shutil.chown",
                      "os.truncate"})
# Links are refused outright: one made in the folder could point out of it between the
# hook's check of a path and the call that follows it
LINK_EVENTS = frozenset({"os.symlink", "os.link"})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _fail(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int | ctypes.c_void_p = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        raise _fail(f"prctl({option})")


def set_limits(limits: dict) -> str:
    """The resource limits (bytes, seconds, counts) and death with the parent; what they are."""
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    memory = "the parent's RSS watchdog"  # macOS takes RLIMIT_AS and ignores it
    if sys.platform == "linux":
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
        memory = f"RLIMIT_AS {limits['memory_bytes'] >> 20} MiB"
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        death = "PR_SET_PDEATHSIG"
    else:
        threading.Thread(target=_exit_with_parent, args=(os.getppid,), daemon=True).start()
        death = f"a thread looking every {PARENT_CHECK_S} s"
    if os.getppid() != limits["parent"]:  # it died before the lines above
        os._exit(1)
    return (f"CPU {cpu} s, memory: {memory}, files {limits['file_bytes'] >> 20} MiB, "
            f"{limits['open_files']} descriptors, no core files; dies with its parent "
            f"({death})")


def _exit_with_parent(getppid: Callable[[], int]) -> None:
    """Off Linux: end this process once its parent is gone (reparented: another parent pid).
    `getppid` is os.getppid, taken before the code runs (which could replace os's)."""
    parent = getppid()
    while getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def own_network() -> str:
    """A network namespace of its own (in a user namespace: no privilege needed)."""
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise _fail("unshare")
    return "its own network namespace: only a loopback, down"


def _mount(source: str | None, target: str, kind: str | None, flags: int) -> None:
    if _libc.mount(source and source.encode(), target.encode(), kind and kind.encode(),
                   ctypes.c_ulong(flags), None) != 0:
        raise _fail(f"mount({target})")


def own_pids(in_user_namespace: bool, limits: dict | None, status_fd: int) -> str:
    """Fork into a PID namespace of its own; from here on the caller is its PID 1 (module
    docstring). This process returns only in the child: the parent relays its end."""
    flags = CLONE_NEWPID | CLONE_NEWNS | (0 if in_user_namespace else CLONE_NEWUSER)
    if _libc.unshare(flags) != 0:
        raise _fail("unshare")
    alive_r, alive_w = os.pipe()  # EOF for the child: its relay is gone
    # The relay keeps every signal blocked from before the fork on: the code's kill(0, ...)
    # reaches its process group, the relay included, and must not end it (SIGKILL still does)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    child = os.fork()
    if child:
        try:
            os.close(alive_r)
            os.close(status_fd)
            _relay(child)
        finally:
            os._exit(1)  # never on to the code, whatever happened
    os.close(alive_w)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # dies with its relay (fork cleared the setting): the parent's kill of it ends the code too
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if limits is not None:
        # the soft limit's SIGXCPU does not end a PID 1 (it ignores signals it has no handler
        # for): the hard limit's SIGKILL does, so it comes at cpu_s
        cpu = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if select.select([alive_r], [], [], 0)[0]:  # the relay died before the lines above
        os._exit(1)
    os.close(alive_r)
    try:  # a /proc of this namespace: the host's would still list every process
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        proc = "/proc remounted: only itself"
    except OSError:
        proc = "/proc still the host's (landlock or the audit hook keep it unread)"
    return f"its own PID namespace: it is PID {os.getpid()} and sees no other process; {proc}"


def _relay(child: int) -> None:
    """Wait for PID 1 and end as it ended (its exit code, or the signal that ended it)."""
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number not in (signal.SIGKILL, signal.SIGSTOP):  # they have no other disposition
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
        os.kill(os.getpid(), number)
        os._exit(128 + number)  # a signal whose default is not to end a process
    os._exit(os.waitstatus_to_exitcode(status))


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_rights(abi: int) -> tuple[int, int, int, int]:
    """(every filesystem right this ABI handles, the rights a file may get, net, scoped)."""
    handled = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        handled |= 1 << 13  # REFER
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE
    if abi >= 5:
        handled |= 1 << 15  # IOCTL_DEV
    file_rights = handled & ((1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15))
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP: no rule grants them
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    return handled, file_rights, net, scoped


def landlock(read: list[str], write: list[str]) -> str:
    """Restrict this process to reading under `read` and everything under `write`; what that
    enforces with this kernel's ABI."""
    abi = _libc.syscall(LANDLOCK["create"], None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise _fail("landlock_create_ruleset")
    handled, file_rights, net, scoped = _landlock_rights(abi)
    attr = _RulesetAttr(handled, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(LANDLOCK["create"], ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    reading = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
    for paths, rights in ((read, reading), (write, handled)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path this system lacks
            allowed = rights if os.path.isdir(path) else rights & file_rights
            rule = _PathBeneath(allowed, fd)
            done = _libc.syscall(LANDLOCK["add_rule"], ruleset, 1, ctypes.byref(rule), 0)
            os.close(fd)
            if done != 0:
                raise _fail(f"landlock_add_rule({path})")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _libc.syscall(LANDLOCK["restrict"], ruleset, 0) != 0:
        raise _fail("landlock_restrict_self")
    os.close(ruleset)
    return "; ".join([f"ABI {abi}: reads only the interpreter's and system files and its folder,"
                      " writes only its folder",
                      "TCP bind/connect refused" if net else "no TCP rules (they need ABI 4)",
                      "signals and abstract unix sockets only to itself" if scoped else
                      "no signal or abstract-socket scopes (they need ABI 6)"])


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


LOAD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
ALLOW, DENY, NOSYS = 0x7FFF0000, 0x00050000 | EPERM, 0x00050000 | ENOSYS


def _argument_rule(number: int, argument: int, values: list[int], matching: int,
                   other: int) -> list[bytes]:
    """System call `number`: `matching` when its argument's low 32 bits are one of `values`,
    else `other` (a block that returns: the accumulator holds the argument afterwards)."""
    block = [_bpf(LOAD, 16 + 8 * argument)]  # seccomp_data.args[argument], low half (LE)
    block += [_bpf(JEQ, v, len(values) - i, 0) for i, v in enumerate(values)]
    block += [_bpf(RET, other), _bpf(RET, matching)]
    return [_bpf(JEQ, number, 0, len(block)), *block]


def seccomp(pid: int) -> str:
    """The filter of the module docstring, for a process whose pid is `pid`; what it refuses."""
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"no seccomp filter for {platform.machine()}")
    program = [_bpf(LOAD, 4), _bpf(JEQ, numbers["arch"], 1, 0), _bpf(RET, 0x80000000),
               _bpf(LOAD, 0)]
    if platform.machine() == "x86_64":  # x32 numbers (bit 30) would pass by the checks below
        program += [_bpf(JGE, 0x40000000, 0, 1), _bpf(RET, DENY)]
    for name in DENIED:
        if name in numbers:
            program += [_bpf(JEQ, numbers[name], 0, 1), _bpf(RET, DENY)]
    # each block below returns, leaving an argument in the accumulator: the number is reloaded
    for name, (argument, group) in SELF_ONLY.items():
        program += _argument_rule(numbers[name], argument, [0, pid] if group else [pid],
                                  ALLOW, DENY)
        program += [_bpf(LOAD, 0)]
    program += _argument_rule(numbers["fcntl"], 1, [F_SETOWN, F_SETOWN_EX], DENY, ALLOW)
    program += [_bpf(LOAD, 0)]
    program += [_bpf(JEQ, numbers["clone3"], 0, 1), _bpf(RET, NOSYS),
                _bpf(JEQ, numbers["clone"], 0, 3), _bpf(LOAD, 16),  # clone's flags (low half)
                _bpf(JSET, CLONE_THREAD, 1, 0), _bpf(RET, DENY),
                _bpf(RET, ALLOW)]
    blob = b"".join(program)
    buffer = ctypes.create_string_buffer(blob, len(blob))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    prog = Program(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise _fail("seccomp")
    return (f"no new processes, sockets or io_uring; signals to itself only (pid {pid}): "
            "kill, tkill, tgkill, rt_(tg)sigqueueinfo; no pidfd, ptrace, process_vm, "
            "F_SETOWN; prlimit64 on itself only")


def _refused_fork_exec(*_: object, **__: object) -> int:
    raise PermissionError("the sandbox refuses _posixsubprocess.fork_exec")


def _module_name(spec: object) -> str:
    """The name a loader would load `spec` under, as the C code reads it (a str exactly: a
    subclass could answer one name to the check and another to the loader), or refused."""
    name = spec.name  # type: ignore[attr-defined]
    if type(name) is not str:
        raise PermissionError("the sandbox refuses a module name that is not a str")
    return name


def _last_part(name: str) -> str:
    """The part of a module's name its init function is looked up by (`PyInit_<it>`: the C
    code stops at a NUL)."""
    return name.rpartition(".")[2].partition("\x00")[0]


def _close_modules(denied: frozenset[str]) -> tuple[Callable, ...]:
    """Keep the `denied` extension modules (PROCESS_MODULES: C code that starts a process or an
    interpreter with no audit event) out of reach of every loader, as none raises an event for
    a module loaded before: `subprocess` keeps working but its fork_exec is a refusal (3.10
    calls `subprocess._posixsubprocess.fork_exec`, 3.11+ `subprocess._fork_exec`), the module
    leaves sys.modules (a later `import` raises the event the hook refuses), and `_imp`'s two
    loaders (BuiltinImporter's `create_builtin`, ExtensionFileLoader's `create_dynamic`, which
    return the interpreter's kept copy of a module loaded before without any event) refuse
    those names. The originals sit in keyword defaults, whose reading raises an event the hook
    refuses for these guards (returned)."""
    import _imp
    import subprocess
    import types

    stand_in = types.ModuleType("_posixsubprocess")
    stand_in.fork_exec = _refused_fork_exec  # type: ignore[attr-defined]
    subprocess._fork_exec = _refused_fork_exec  # type: ignore[attr-defined]
    subprocess._posixsubprocess = stand_in  # type: ignore[attr-defined]
    for name in denied:
        sys.modules.pop(name, None)
    refused = denied | {"_imp"}  # a fresh _imp would have the originals

    def create_builtin(spec: object, *, _original: Callable = _imp.create_builtin) -> object:
        name = _module_name(spec)
        if _last_part(name) in refused:
            raise PermissionError(f"the sandbox refuses to load {name}")
        return _original(types.SimpleNamespace(name=name))

    def create_dynamic(spec: object, file: object = None, *,
                       _original: Callable = _imp.create_dynamic) -> object:
        name, origin = _module_name(spec), spec.origin  # type: ignore[attr-defined]
        if _last_part(name) in refused or type(origin) is not str:
            raise PermissionError(f"the sandbox refuses to load {name}")
        return _original(types.SimpleNamespace(name=name, origin=origin), file)

    _imp.create_builtin, _imp.create_dynamic = create_builtin, create_dynamic
    return create_builtin, create_dynamic


def _fd_path(fd: int) -> str:
    """The path of an open directory descriptor (a dir_fd argument)."""
    if sys.platform == "linux":
        return os.readlink(f"/proc/self/fd/{fd}")
    import fcntl

    return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\x00"))


def _written_paths(event: str, args: tuple) -> list[str]:
    """The real paths a file-changing event (WRITES) changes; descriptors (an int where a path
    may be) are left out: only `open`, which the hook checks, makes them."""
    paths = []
    for at, dir_at in WRITES[event]:
        if at >= len(args) or not isinstance(args[at], str | bytes | os.PathLike):
            continue
        path = os.fsdecode(args[at])
        dir_fd = args[dir_at] if dir_at is not None and dir_at < len(args) else None
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(_fd_path(dir_fd), path)
        paths.append(os.path.realpath(path))
    return paths


def _sqlite_path(database: object) -> str | None:
    """The file sqlite3.connect would open (None: in memory)."""
    name = os.fsdecode(database) if isinstance(database, str | bytes | os.PathLike) else ""
    if name in ("", ":memory:") or name.startswith("file::memory:"):
        return None
    return os.path.realpath(name)


def _metadata_rule(write: list[str]) -> Callable[[str, tuple], None]:
    """The audit hook's file part beside Landlock: no mode, owner, times or extended attributes
    changed outside `write` (METADATA)."""

    def rule(event: str, args: tuple) -> None:
        if event in METADATA:
            for path in _written_paths(event, args):
                if not _under(path, write):
                    raise PermissionError(f"the sandbox refuses {event} of {path}")

    return rule


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _file_rule(read: list[str], write: list[str]) -> Callable[[str, tuple], None]:
    """The audit hook's file part where Landlock is missing: reading only under `read` and
    `write`, changing only under `write`, listing only under both, no links, no file-making
    module or call that raises no event (FILE_MODULES, NO_EVENT_FILE_CALLS)."""
    for module in (os, sys.modules["posix"]):
        for name in NO_EVENT_FILE_CALLS:
            with contextlib.suppress(AttributeError):  # where this Python and OS have it
                delattr(module, name)

    def check_open(args: tuple) -> None:
        raw = os.fsdecode(args[0])
        # os.open's dir_fd is not in the event: a relative path climbing out of a directory
        # descriptor is refused, and a directory outside the folder never becomes one
        if not os.path.isabs(raw) and ".." in raw.replace("\\", "/").split("/"):
            raise PermissionError(f"the sandbox refuses to open {raw} (a relative path with ..)")
        path = os.path.realpath(raw)
        mode, flags = args[1], args[2] or 0
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str) else
                   bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)))
        if not _under(path, write) and (writing or not _under(path, read) or os.path.isdir(path)):
            raise PermissionError(f"the sandbox refuses to open {path}")

    def rule(event: str, args: tuple) -> None:
        if event in LINK_EVENTS:
            raise PermissionError(f"the sandbox refuses {event}")
        if event == "import" and _last_part(args[0]) in FILE_MODULES:
            raise PermissionError(f"the sandbox refuses import {args[0]}")
        if event in WRITES:
            for path in _written_paths(event, args):
                if not _under(path, write):
                    raise PermissionError(f"the sandbox refuses {event} of {path}")
        elif event == "sqlite3.connect":
            path = _sqlite_path(args[0])
            if path is not None and not _under(path, write):
                raise PermissionError(f"the sandbox refuses sqlite3.connect of {path}")
        elif event == "open" and isinstance(args[0], str | bytes):
            check_open(args)
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], str | bytes):
            path = os.path.realpath(os.fsdecode(args[0]))
            if not _under(path, write + read):
                raise PermissionError(f"the sandbox refuses to list {path}")

    return rule


def audit_hook(missing: set[str], read: list[str], write: list[str]) -> str:
    """Refuse from Python what the missing kernel layers would have refused, and always signals
    to other processes and ctypes; what it refuses."""
    read = [os.path.realpath(p) for p in read]
    write = [os.path.realpath(p) for p in write]
    refused = set(CTYPES_EVENTS)
    said = ["ctypes", "signals to other processes (os.kill, os.killpg, F_SETOWN, "
            "resource.prlimit; no os.pidfd_open, signal.pidfd_send_signal)"]
    guards: tuple[Callable, ...] = ()
    if "seccomp" in missing:
        refused |= PROCESS_EVENTS | FINDING_EVENTS
        guards = _close_modules(PROCESS_MODULES)
        said.append("processes (os.fork, exec, spawn, system, subprocess, pty, sub-"
                    "interpreters; _posixsubprocess by every loader)")
    if missing & {"seccomp", "netns", "landlock"}:
        refused |= SOCKET_EVENTS
        said.append("sockets")
    if "landlock" in missing:
        files = _file_rule(read, write)
        said.append("reading or listing files outside its folders, changing any file outside "
                    "its folder (open for writing, os.remove, rename, mkdir, rmdir, chmod, "
                    "chown, truncate, utime, xattrs, shutil, sqlite3), links, mkfifo, mknod")
    else:
        files = _metadata_rule(write)
        said.append("changing a file's mode, owner, times or extended attributes outside its "
                    "folder (Landlock has no rule for them)")
    # The calls with no audit event that reach a process by pid: gone from their modules
    for module in (os, signal, sys.modules["posix"], sys.modules["_signal"]):
        for name in ("pidfd_open", "pidfd_send_signal"):
            with contextlib.suppress(AttributeError):  # where this Python and OS have it
                delattr(module, name)
    own = os.getpid()

    def to_other(event: str, args: tuple) -> bool:
        """A signal (or SIGIO owner, resource limit) aimed at another process."""
        if event == "os.kill" or event == "resource.prlimit":
            return args[0] not in (0, own)
        if event == "os.killpg":
            return args[0] != 0  # killpg(0): its own process group, kill(0)
        return event == "fcntl.fcntl" and args[1] in (F_SETOWN, F_SETOWN_EX)

    def hook(event: str, args: tuple) -> None:
        if event in refused or to_other(event, args):
            raise PermissionError(f"the sandbox refuses {event}")
        if guards and event == "import" and _last_part(args[0]) in PROCESS_MODULES:
            raise PermissionError(f"the sandbox refuses import {args[0]}")
        if guards and event == "object.__getattr__" and any(args[0] is g for g in guards):
            raise PermissionError(f"the sandbox refuses reading the loader guard's {args[1]}")
        files(event, args)

    sys.addaudithook(hook)
    return "Python-level, refuses " + "; ".join(said)


def boundary(active: dict[str, str], platform_name: str) -> str | None:
    """None where kernel layers confine the code's files and processes (landlock and seccomp,
    or seatbelt), else the one line that refuses to run it, naming what is missing."""
    if "seatbelt" in active or {"landlock", "seccomp"} <= set(active):
        return None
    if platform_name == "darwin":
        missing = "seatbelt (macOS's sandbox-exec)"
    else:
        missing = " and ".join(f"{name} ({what})" for name, what in (
            ("landlock", "files"), ("seccomp", "processes and sockets")) if name not in active)
    return (f"the sandbox refuses to run model-written code: no OS boundary here, {missing} "
            "missing; the Python audit hook alone is no security boundary (set "
            "SandboxLimits(python_only_not_a_boundary=True) to run it so anyway)")


def confine(config: dict, status_fd: int) -> tuple[dict[str, str], str | None]:
    """Apply the config's layers (module docstring); what each that took effect enforces, and
    the line refusing the code where no kernel boundary took effect (and the config does not
    opt in to the Python-level confinement alone)."""
    layers, active = config["layers"], {}
    if config["seatbelt"]:  # the parent started this process under sandbox-exec
        active["seatbelt"] = config["seatbelt"]
    if "rlimits" in layers:
        active["rlimits"] = set_limits(config["limits"])
    steps = {"netns": own_network,
             "pidns": lambda: own_pids("netns" in active,
                                       config["limits"] if "rlimits" in active else None,
                                       status_fd),
             "landlock": lambda: landlock(config["read"], [config["scratch"]]),
             "seccomp": lambda: seccomp(os.getpid())}  # after the fork: its pid in its namespace
    for name, step in steps.items():
        if name in layers and sys.platform == "linux":
            with contextlib.suppress(OSError):  # this kernel refuses it: audit stands in
                active[name] = step()
    if "audit" in layers:
        active["audit"] = audit_hook(set(steps) - set(active), config["read"],
                                     [config["scratch"]])
    refused = boundary(active, sys.platform)
    return active, None if config["python_only_not_a_boundary"] else refused


def main() -> None:
    config = json.loads(sys.argv[1])
    with os.fdopen(int(sys.argv[2]), "w") as status:
        layers, refused = confine(config, status.fileno())
        status.write(json.dumps({"layers": layers, "refused": refused}))
    if refused:  # nothing of the code runs (the parent raises the line)
        os._exit(2)
    os.chdir(config["scratch"])
    sys.path[0] = config["scratch"]
    sys.argv = ["main.py"]
    source = open(config["code"], encoding="utf-8").read()  # noqa: SIM115 - closed at exit
    code = compile(source, "main.py", "exec")
    del config, source
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102


if __name__ == "__main__":
    main()
