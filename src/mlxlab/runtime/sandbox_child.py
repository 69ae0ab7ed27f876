"""The sandboxed interpreter's first steps: confine this process, then run the code.

Run by runtime/sandbox.py as `python -I sandbox_child.py CONFIG STATUS_FD` (a script by path: it
imports nothing of mlxlab, so nothing runs before the confinement but the interpreter's own
start-up). In order, each layer the config asks for (runtime/sandbox.py says what each
guarantees):

1. `rlimits`: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and no core
   files; and SIGKILL when the parent (the tool's worker) dies (Linux prctl).
2. `netns`: unshare(CLONE_NEWUSER | CLONE_NEWNET): a network namespace of its own, whose only
   interface is a loopback that is down (Linux, where unprivileged user namespaces are allowed).
3. `landlock`: the Landlock LSM (Linux 5.13+): files readable only under the `read` paths (the
   interpreter's installation, system libraries), readable and writable only in the scratch
   folder, nothing else; TCP bind/connect refused (ABI 4+), abstract unix sockets and signals
   to processes outside scoped away (ABI 6+). It also forbids mount and pivot_root.
4. `seccomp`: a seccomp-BPF filter (x86_64, aarch64): no new processes (fork, vfork, clone
   without CLONE_THREAD; clone3 answers ENOSYS so threads fall back to clone), no sockets
   (socket, socketpair), no io_uring; each refused with EPERM.
5. `audit`: for the layers above that this kernel refused, a Python audit hook refusing the
   same from Python (sockets, processes, opening files outside the folders). Python-level only:
   code that reaches C (ctypes is refused by it too, but other C extensions are not) can pass.

The layers that took effect are written to STATUS_FD as JSON before the code runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import signal
import struct
import sys

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
SECCOMP_MODE_FILTER = 2
CLONE_THREAD, CLONE_NEWUSER, CLONE_NEWNET = 0x10000, 0x10000000, 0x40000000
EPERM, ENOSYS = 1, 38

# The system-call numbers the filter names (x86_64's, aarch64's) and the audit arch value.
SYSCALLS = {
    "x86_64": {"arch": 0xC000003E, "socket": 41, "socketpair": 53, "clone": 56, "fork": 57,
               "vfork": 58, "clone3": 435, "io_uring_setup": 425},
    "aarch64": {"arch": 0xC00000B7, "socket": 198, "socketpair": 199, "clone": 220,
                "clone3": 435, "io_uring_setup": 425},
}
LANDLOCK = {"create": 444, "add_rule": 445, "restrict": 446}  # the same on every arch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _fail(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int | ctypes.c_void_p = 0) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        raise _fail(f"prctl({option})")


def set_limits(limits: dict) -> None:
    """The resource limits (bytes, seconds, counts) and death with the parent."""
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != limits["parent"]:  # it died before the line above
            os._exit(1)


def own_network() -> None:
    """A network namespace of its own (in a user namespace: no privilege needed)."""
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise _fail("unshare")


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


def landlock(read: list[str], write: list[str]) -> int:
    """Restrict this process to reading under `read` and everything under `write`; the ABI."""
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
    return int(abi)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp() -> None:
    """The filter of the module docstring (EPERM for processes and sockets)."""
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"no seccomp filter for {platform.machine()}")
    load, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | EPERM, 0x00050000 | ENOSYS
    kill = 0x80000000
    denied = [numbers[n] for n in ("socket", "socketpair", "fork", "vfork", "io_uring_setup")
              if n in numbers]
    program = [_bpf(load, 4), _bpf(jeq, numbers["arch"], 1, 0), _bpf(ret, kill),
               _bpf(load, 0)]
    if platform.machine() == "x86_64":  # x32 numbers (bit 30) would pass by the checks below
        program += [_bpf(jge, 0x40000000, 0, 1), _bpf(ret, deny)]
    for number in denied:
        program += [_bpf(jeq, number, 0, 1), _bpf(ret, deny)]
    program += [_bpf(jeq, numbers["clone3"], 0, 1), _bpf(ret, nosys),
                _bpf(jeq, numbers["clone"], 0, 3), _bpf(load, 16),  # clone's flags (low half)
                _bpf(jset, CLONE_THREAD, 1, 0), _bpf(ret, deny),
                _bpf(ret, allow)]
    blob = b"".join(program)
    buffer = ctypes.create_string_buffer(blob, len(blob))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    prog = Program(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise _fail("seccomp")


def audit_hook(missing: set[str], read: list[str], write: list[str]) -> None:
    """Refuse from Python what the missing kernel layers would have refused."""
    read = [os.path.realpath(p) for p in read]
    write = [os.path.realpath(p) for p in write]
    processes = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
                 "subprocess.Popen", "pty.spawn"}
    sockets = {"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
               "socket.getaddrinfo"}
    refused = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}
    if "seccomp" in missing:
        refused |= processes | sockets
    if "netns" in missing or "landlock" in missing:
        refused |= sockets

    def under(path: str, roots: list[str]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            raise PermissionError(f"the sandbox refuses {event}")
        if event == "open" and "landlock" in missing and isinstance(args[0], str | bytes):
            path = os.path.realpath(os.fsdecode(args[0]))
            mode, flags = args[1], args[2] or 0
            writing = (any(c in mode for c in "wax+") if isinstance(mode, str) else
                       bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)))
            if not under(path, write) and (writing or not under(path, read)):
                raise PermissionError(f"the sandbox refuses to open {path}")

    sys.addaudithook(hook)


def confine(config: dict) -> list[str]:
    """Apply the config's layers (module docstring); the names of those that took effect."""
    layers, active = config["layers"], []
    if "rlimits" in layers:
        set_limits(config["limits"])
        active.append("rlimits")
    steps = {"netns": own_network,
             "landlock": lambda: landlock(config["read"], [config["scratch"]]),
             "seccomp": seccomp}
    for name, step in steps.items():
        if name in layers and sys.platform == "linux":
            try:
                step()
                active.append(name)
            except OSError:
                pass  # this kernel refuses it: the audit hook stands in
    if "audit" in layers:
        audit_hook({"netns", "landlock", "seccomp"} - set(active), config["read"],
                   [config["scratch"]])
        active.append("audit")
    return active


def main() -> None:
    config = json.loads(sys.argv[1])
    with os.fdopen(int(sys.argv[2]), "w") as status:
        status.write(json.dumps(confine(config)))
    os.chdir(config["scratch"])
    sys.path[0] = config["scratch"]
    sys.argv = ["main.py"]
    source = open(config["code"], encoding="utf-8").read()  # noqa: SIM115 - closed at exit
    code = compile(source, "main.py", "exec")
    del config, source
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102


if __name__ == "__main__":
    main()
