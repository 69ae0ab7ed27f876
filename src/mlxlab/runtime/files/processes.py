"""Which process wrote something, and whether it still runs: the record a long write leaves
beside what it writes (a run's tags, a conversion's temporary folder), read back later by
whoever finds it unfinished.

A record names the host, the pid, on Linux the pid namespace (containers sharing a hostname do
not see each other's pids) and the process's start time (a pid the system gave to another
process since has another start time). A process is known dead only where its pid means
something: this host and this pid namespace; elsewhere `gone_reason` says nothing, and the
caller decides by other means (a heartbeat) or keeps what it found.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def process_start(pid: int, method: str | None = None) -> str | None:
    """When process `pid` started, as a stamp naming how it was read: `proc:<boot id>:<clock
    ticks since boot>` (Linux's /proc, exact), else `psutil:<seconds since the epoch>` (macOS);
    None when the process is gone or neither way is there. `method` reads it the way a stored
    stamp was read, so the two compare."""
    if method in (None, "proc"):
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
            # the command name (field 2) may hold spaces and parentheses: count after its end
            return f"proc:{boot}:{stat.rsplit(')', 1)[1].split()[19]}"
        except (OSError, IndexError):
            if method == "proc" or Path("/proc/self/stat").is_file():
                return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.0f}"
    except psutil.Error:
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace on Linux (`pid:[inode]`), None elsewhere."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def is_alive(pid: int) -> bool:
    """A process `pid` exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def same_start(a: str, b: str) -> bool:
    """Two start stamps of process_start name the same start."""
    if a.startswith("psutil:") and b.startswith("psutil:"):  # seconds from the boot time: +-1
        return abs(float(a.split(":")[1]) - float(b.split(":")[1])) <= 1
    return a == b


def this_process() -> dict[str, str]:
    """The record of this process: host, pid, and where known pid_namespace and start."""
    record = {"host": socket.gethostname(), "pid": str(os.getpid())}
    namespace = pid_namespace()
    if namespace is not None:
        record["pid_namespace"] = namespace
    start = process_start(os.getpid())
    if start is not None:
        record["start"] = start
    return record


def gone_reason(pid: str, host: str | None, namespace: str | None = None,
                start: str | None = None, here: str | None = None) -> str | None:
    """Why the recorded process (pid, host, pid namespace, start stamp) runs no more, or None:
    alive, or not one this process can see (another host than `here`, this host by default,
    or another pid namespace)."""
    here = here or socket.gethostname()
    visible = namespace is None or namespace == pid_namespace()
    if host != here or not str(pid).isdigit() or not visible:
        return None
    if not is_alive(int(pid)):
        return f"process {pid} on {host} is gone"
    if start:
        now = process_start(int(pid), start.split(":", 1)[0])
        if now is not None and not same_start(start, now):
            return f"process {pid} on {host} is another process now (started {now}, not {start})"
    return None
