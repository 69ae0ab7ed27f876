"""mlxlab-train's supervising parent: a run that runs out of memory restarts itself from its last
committed checkpoint at half the micro-batch and twice the accumulation.

Why a parent: on MLX's CPU backend a failed allocation is a segmentation fault (MLX 0.32.4 under
`ulimit -v`), and the kernel's OOM killer sends SIGKILL; neither leaves the process a chance to
do anything. So `mlxlab-train ...` (and `mlxlab train ...`) is this small process, which imports
neither MLX nor Hydra and runs the training as its child, `python -m mlxlab.train ...` with the
same arguments; `python -m mlxlab.train` itself trains in-process, unsupervised, as before.

Parent and child share a folder named by MLXLAB_SUPERVISOR:
- run.json: written by the child once its fit knows its plan (training/micro_batch.py): the run
  folder, micro-batch, accumulation, trainer.oom_restarts, trainer.stall_timeout_s, whether a
  restart can keep the effective batch, and whether it is a sweep's job;
- tracked.json: the tracked run's id and store, once it started (training/loop.py): a restart
  continues that run, a stalled child's run is marked KILLED;
- step: 8 bytes the child's loop overwrites at every optimizer step (a shared mapping: what it
  wrote is there after a segfault), so the parent can say how many steps were lost;
- oom.json: MLX's raising out of memory (Metal, CUDA) under a parent: the child writes it and
  exits with OOM_EXIT at once, as a crash would (runtime/supervision/failures.py);
- probe.json: written by trainer.micro_batch=auto before each micro-batch it measures (the run
  folder, the size): a crash while it is there is that size's "does not fit", recorded in the
  run folder's note (NOTE's "probe"), and the child starts again, measuring below it.

A launcher's worker processes (hydra/launcher=joblib) are not the parent's child: their out of
memory stays their job's (a failed trial, as without a parent); the parent restarts sweeps whose
jobs run in its child (Hydra's basic launcher, the default).

On an out of memory (OOM_EXIT, SIGSEGV, SIGBUS, SIGKILL not sent by the parent) the parent writes
the run folder's memory_restarts.json (NOTE: the halved plan and each restart, an event a human
can read) and runs the child again: a single run with `hydra.run.dir=` and `resume=` naming the
same folder (the same MLflow run continues from its checkpoint), a sweep with its own command
(sweeps/jobs.py resumes the killed job, keeps the finished ones). The child reads NOTE before its
first step. Past trainer.oom_restarts, or at micro-batch 1, the parent ends with one line and
exit 2 (a sweep's job is failed by its next start instead, and the sweep goes on).

A child that hangs (MLX waiting for ever on a thread that never started, a deadlock) would hold
its run RUNNING for good. After its first step the parent watches it: a step done, CPU time
used (a tenth of a core), or bytes read or written (an evaluation, a checkpoint written to a
slow disk) is progress; none of them for trainer.stall_timeout_s (run.json) ends the child
(SIGTERM, then SIGKILL after STALL_GRACE_S), with one line naming the last step and checkpoint,
the tracked run marked KILLED, and exit STALL_EXIT; it is not restarted.

Signals sent to the parent (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) are passed to the child,
which checkpoints and leaves as it would alone; the child dies with the parent (PDEATHSIG).
MLXLAB_SUPERVISE=0, `mlx.launch` ranks and Slurm's srun steps train in-process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mlxlab.runtime import settings

ENV = "MLXLAB_SUPERVISOR"      # the folder the parent shares with its child
PID_ENV = "MLXLAB_SUPERVISOR_PID"  # the parent's pid: only its own child talks to it
OFF_ENV = "MLXLAB_SUPERVISE"   # "0": train in-process, no parent
ARGV0_ENV = "MLXLAB_ARGV0"     # the command the user typed (the child's argv[0] is -m's path)
OOM_EXIT = 3                   # the child's exit after MLX raised out of memory under a parent
STALL_EXIT = 124               # the parent's exit after it ended a stalled child (timeout(1)'s)
STALL_POLL_S = 1.0             # how often the parent looks at its child
STALL_CPU_SHARE = 0.1          # CPU time per second (a tenth of a core) that is progress
STALL_IO_RATE = 256 * 1024     # bytes read or written per second that are progress
STALL_GRACE_S = 10.0           # a stalled child's time between SIGTERM and SIGKILL
NOTE = "memory_restarts.json"  # in the run folder: the halved plan and each restart
CRASHES = {signal.SIGSEGV: "SIGSEGV", signal.SIGBUS: "SIGBUS", signal.SIGKILL: "SIGKILL"}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# Launchers whose ranks must stay the processes they started: a restarted rank alone can't rejoin
PR_SET_PDEATHSIG = 1
# Restarts one command may make in all (a sweep's jobs each have trainer.oom_restarts): a bound
# should a child keep dying without reading its note
MAX_RESTARTS = 100
MarkKilled = Callable[[str, str, str], None]  # (store uri, run id, reason): the run KILLED


# --- the child's side ---------------------------------------------------------------------------

_sweeping = False
_step_map: mmap.mmap | None = None


def folder() -> Path | None:
    """The folder shared with a supervising parent (None: no parent). Only the parent's own
    child has one: a launcher's worker processes (joblib's) inherit the variables, but their
    out of memory is their job's (a failed trial), not a restart of the whole command."""
    env = settings.current()
    if not env.supervisor or env.supervisor_pid != str(os.getppid()):
        return None
    return Path(env.supervisor)


def as_typed() -> None:
    """The child's argv[0] as the user typed it (`mlxlab-train`, `mlxlab train`): what the run's
    Source and command tags name (tracking/source.py), not `python -m mlxlab.train`."""
    if folder() is not None and settings.current().argv0:
        sys.argv[0] = settings.current().argv0


def set_sweeping(sweeping: bool) -> None:
    """train.py says whether this process runs a sweep's jobs (a restart then runs the sweep's
    command again rather than one run)."""
    global _sweeping
    _sweeping = bool(sweeping)


def report_run(run_dir: Path, micro_batch: int, grad_accum: int, oom_restarts: int,
               restartable: bool, stall_timeout_s: float | None = None) -> None:
    """The fit's plan, for the parent (nothing without one)."""
    shared = folder()
    if shared is None:
        return
    _write_json(shared / "run.json", {
        "run_dir": str(Path(run_dir).resolve()), "micro_batch": int(micro_batch),
        "grad_accum": int(grad_accum), "oom_restarts": int(oom_restarts),
        "restartable": bool(restartable), "sweep": _sweeping, "pid": os.getpid(),
        "stall_timeout_s": stall_timeout_s})
    mark_step(0)


def report_tracked(run_id: str | None, uri: str | None) -> None:
    """The tracked run has started: its id and store, for the parent (a restart continues it, a
    stalled child's is marked KILLED)."""
    shared = folder()
    if shared is None or not run_id:
        return
    _write_json(shared / "tracked.json", {"run_id": str(run_id), "uri": uri})


def continued_run_id(run_dir: Path) -> str | None:
    """The tracked run a restart of this run folder continues (the parent put it in the note):
    a run restarted before its first checkpoint stays one run."""
    return (read_note(run_dir) or {}).get("run_id")


def mark_step(step: int) -> None:
    """The optimizer step just done (one memory write; the parent reads it after a crash)."""
    global _step_map
    if _step_map is None:
        shared = folder()
        if shared is None:
            return
        path = shared / "step"
        with open(path, "a+b") as f:
            f.truncate(8)
            _step_map = mmap.mmap(f.fileno(), 8)
    _step_map[:8] = struct.pack("<q", int(step))


def report_probe(run_dir: Path, micro_batch: int | None) -> None:
    """trainer.micro_batch=auto measures `micro_batch` rows next (None: the search is over), for
    the parent: a crash until the next call is that size's out of memory."""
    shared = folder()
    if shared is None:
        return
    if micro_batch is None:
        (shared / "probe.json").unlink(missing_ok=True)
        return
    _write_json(shared / "probe.json", {"run_dir": str(Path(run_dir).resolve()),
                                        "micro_batch": int(micro_batch), "sweep": _sweeping})


def probe_ceiling(run_dir: Path) -> tuple[int, str] | None:
    """(the smallest micro-batch whose measurement crashed, how) from the run folder's note;
    None: none did."""
    probe = (read_note(run_dir) or {}).get("probe")
    return (int(probe["micro_batch"]), str(probe["how"])) if probe else None


def report_oom(step: int, message: str) -> bool:
    """MLX raised out of memory at `step`: under a parent, recorded for it (True: the caller ends
    the process with OOM_EXIT, as a crash would end it, and the parent restarts it)."""
    shared = folder()
    if shared is None or not (shared / "run.json").is_file():
        return False  # no parent, or the fit never planned: the one line, as without one
    mark_step(step)
    _write_json(shared / "oom.json", {"step": int(step), "message": message[:2000]})
    return True


def read_note(run_dir: Path) -> dict | None:
    """The run folder's memory_restarts.json (None: never restarted)."""
    try:
        return json.loads((Path(run_dir) / NOTE).read_text())
    except (OSError, ValueError):
        return None


def write_note(run_dir: Path, note: dict) -> None:
    _write_json(Path(run_dir) / NOTE, note)


def _write_json(path: Path, data: dict) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(json.dumps(data, indent=1))
    os.replace(staged, path)


# --- the parent's side --------------------------------------------------------------------------


def wanted() -> bool:
    """Whether this start supervises (else it trains in-process)."""
    env = settings.current()
    if not env.supervise or env.supervisor:
        return False  # off, or already under a parent
    return not (env.launched or env.slurm_step)  # a rank of mlx.launch / mpirun, a Slurm step


def committed_steps(run_dir: Path) -> list[int]:
    """The steps of the run folder's committed checkpoints (checkpoint/layout.py's names)."""
    steps = []
    for marker in Path(run_dir).glob("checkpoints/step_*/COMMITTED"):
        with contextlib.suppress(ValueError):
            steps.append(int(marker.parent.name.removeprefix("step_")))
    return sorted(steps)


def _last_step(shared: Path) -> int | None:
    try:
        return struct.unpack("<q", (shared / "step").read_bytes()[:8])[0]
    except (OSError, struct.error):
        return None


def _pdeathsig() -> None:  # in the child before exec: it dies with its parent
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Child:
    """One start of the child, signals passed on; `run` returns its exit status (-N: signal N)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.signalled = False  # the parent was told to stop: no restart
        self.stalled: Stall | None = None  # the parent ended it: it made no progress
        for sig in FORWARDED:
            signal.signal(sig, self._forward)

    def _forward(self, signum: int, _frame) -> None:
        if signum != signal.SIGUSR2:
            self.signalled = True
        if signum == signal.SIGINT and _terminal_delivers():
            return  # Ctrl-C reached the child too: a second one would make it exit at once
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def run(self, argv: list[str], env: dict, shared: Path) -> int:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxlab.train", *argv], env=env,
                                     preexec_fn=_pdeathsig if sys.platform.startswith("linux")
                                     else None)
        watch = Watch(shared, self.proc.pid)
        while True:
            try:
                return self.proc.wait(timeout=STALL_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            self.stalled = watch.stalled(time.monotonic())
            if self.stalled is not None:
                return self._end()

    def _end(self) -> int:
        """SIGTERM (a child whose Python still runs checkpoints and leaves), SIGKILL after
        STALL_GRACE_S (a child stuck in native code never runs its handler)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=STALL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return self.proc.wait()


@dataclasses.dataclass
class Stall:
    """A child that made no progress: for how long, and its last step."""

    seconds: float
    step: int
    timeout: float


class Watch:
    """Whether the child moves, once it did its first step: its optimizer step (the shared
    step counter), its CPU time (an evaluation, a generation, a slow step: over STALL_CPU_SHARE
    of a core between two looks) and the bytes it reads or writes (a checkpoint to a slow disk:
    over STALL_IO_RATE). A hang uses none of them: MLX waiting on a condition variable is 0 %
    CPU, and a thread beating a heartbeat now and then stays under both rates."""

    def __init__(self, shared: Path, pid: int) -> None:
        self.shared, self.pid = shared, pid
        self.timeout: float | None = None
        self.step: int | None = None
        self.cpu = self.io = 0.0
        self.looked = self.since = 0.0  # monotonic times: the last look, the last progress

    def stalled(self, now: float) -> Stall | None:
        if self.timeout is None:
            try:
                self.timeout = json.loads((self.shared / "run.json").read_text())[
                    "stall_timeout_s"] or 0.0
            except (OSError, ValueError, KeyError):
                return None  # not planned yet (or an older child): nothing to watch
        step = _last_step(self.shared)
        if not self.timeout or not step:  # off, or before the first step (compiling, probing)
            return None
        cpu, io = _usage(self.pid)
        elapsed = max(now - self.looked, 1e-3)
        busy = (cpu - self.cpu) / elapsed >= STALL_CPU_SHARE or \
            (io - self.io) / elapsed >= STALL_IO_RATE
        self.cpu, self.io, self.looked = cpu, io, now
        if step != self.step or busy:
            self.step, self.since = step, now
            return None
        if now - self.since < self.timeout:
            return None
        return Stall(now - self.since, step, self.timeout)


def _usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, bytes read and written through system calls) of process `pid` so far, all
    its threads; the bytes are Linux's (/proc/<pid>/io), 0 elsewhere."""
    import psutil  # the stall watch's only (a small import; the parent has no MLX)

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0, 0.0
    done = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("rchar", "wchar"):
                done += float(value)
    return float(times.user + times.system), done


def _terminal_delivers() -> bool:
    """This process (and its child, in its process group) is the terminal's foreground job:
    the terminal's Ctrl-C went to both."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def out_of_memory(code: int, shared: Path, signalled: bool) -> str | None:
    """How the child ran out of memory ("out of memory", "SIGSEGV", ...), None: it did not (or
    the user stopped it: the parent's signal, a kill before the fit planned)."""
    if code == OOM_EXIT and (shared / "oom.json").is_file():
        return "out of memory"
    planned = (shared / "run.json").is_file() or (shared / "probe.json").is_file()
    if code < 0 and -code in CRASHES and not signalled and planned:
        return CRASHES[signal.Signals(-code)]
    return None


def probe_note(probe: dict, how: str, when: str) -> dict:
    """The run folder's note after trainer.micro_batch=auto crashed measuring probe's size: the
    smallest size that crashed is the search's ceiling from now on."""
    run_dir = Path(probe["run_dir"])
    note = read_note(run_dir) or {"restarts": []}
    size = int(probe["micro_batch"])
    was = note.get("probe")
    if was is None or size < int(was["micro_batch"]):
        note["probe"] = {"at": when, "how": how, "micro_batch": size}
    return note


def restart_note(run: dict, how: str, step: int | None, when: str) -> tuple[dict, str | None]:
    """The run folder's note after one more out of memory, and the line that ends the run (None:
    it restarts)."""
    run_dir = Path(run["run_dir"])
    note = read_note(run_dir) or {"restarts": []}
    micro, accum = int(run["micro_batch"]), int(run["grad_accum"])
    committed = committed_steps(run_dir)
    last = committed[-1] if committed else 0
    lost = max(0, (step - 1 if step else last) - last)  # trained since the checkpoint
    event = {"at": when, "how": how, "step": step, "checkpoint_step": last, "steps_lost": lost,
             "micro_batch": micro, "grad_accum": accum}
    done = len(note["restarts"])
    why = None
    if not run["restartable"]:
        why = ("its batches can't be split (trainer.batching.dynamic, data parallel ranks, or a "
               "loss whose rows are each other's negatives: objective=cached_mnrl keeps them "
               "in less memory)")
    elif micro <= 1:
        why = "the micro-batch is already 1"
    elif done >= int(run["oom_restarts"]):
        why = f"trainer.oom_restarts={run['oom_restarts']} restarts were made"
    if why is None:
        event.update(to_micro_batch=micro // 2, to_grad_accum=accum * 2)
        note.update(micro_batch=micro // 2, grad_accum=accum * 2)
        note["restarts"].append(event)
        note.pop("exhausted", None)
        return note, None
    checkpoint = f"step {last}" if committed else "none"
    line = (f"the run ran out of memory ({how}) at step {step} with micro-batch {micro} x "
            f"grad_accum {accum} and is not restarted: {why}. Lower the model's size or "
            f"data.max_length, or raise trainer.memory_limit; committed checkpoints are intact "
            f"(last: {checkpoint} in {run_dir}; resume with resume={run_dir})")
    note.update(micro_batch=micro, grad_accum=accum)
    if run["sweep"]:  # the job's next start fails with the line; the sweep goes on
        note["exhausted"] = line
    return note, line


def main(argv: list[str], mark_killed: MarkKilled | None = None) -> int:
    """Run `python -m mlxlab.train argv` until it ends other than out of memory; `mark_killed`
    (uri, run id, reason) ends a stalled child's tracked run."""
    child = _Child()
    extra: list[str] = []
    restarts = 0
    with tempfile.TemporaryDirectory(prefix="mlxlab-supervisor-") as tmp:
        shared = Path(tmp)
        env = {**os.environ, ENV: str(shared), PID_ENV: str(os.getpid()), ARGV0_ENV: sys.argv[0]}
        while True:
            for name in ("run.json", "oom.json", "step", "probe.json", "tracked.json"):
                (shared / name).unlink(missing_ok=True)
            code = child.run([*argv, *extra], env, shared)
            if child.stalled is not None:
                line = stalled_line(child.stalled, shared, mark_killed)
                print(f"mlxlab: error: {line}", file=sys.stderr, flush=True)
                return STALL_EXIT
            how = out_of_memory(code, shared, child.signalled)
            if how is None or restarts >= MAX_RESTARTS:
                return _exit_status(code)
            restarts += 1
            if not (shared / "run.json").is_file():  # it crashed measuring a micro-batch
                probe = json.loads((shared / "probe.json").read_text())
                run_dir = Path(probe["run_dir"])
                write_note(run_dir, probe_note(probe, how, _now()))
                print(f"mlxlab: trainer.micro_batch=auto: measuring micro-batch "
                      f"{probe['micro_batch']} ran out of memory ({how}): it does not fit; "
                      f"starting again to measure below it (see {NOTE})", file=sys.stderr,
                      flush=True)
                extra = [] if probe["sweep"] else [f"hydra.run.dir={run_dir}"]
                argv = [a for a in argv if not a.startswith("hydra.run.dir=")]
                continue
            run = json.loads((shared / "run.json").read_text())
            done = _last_step(shared)  # the step that failed is the one after it
            step = done + 1 if done is not None else None
            note, line = restart_note(run, how, step, _now())
            tracked = _read_json(shared / "tracked.json")
            if tracked and not run["sweep"]:  # the restart continues this tracked run
                note["run_id"] = tracked["run_id"]
            write_note(Path(run["run_dir"]), note)
            if line is not None and not run["sweep"]:
                print(f"mlxlab: error: {line}", file=sys.stderr, flush=True)
                return 2
            print(_restart_line(note, line), file=sys.stderr, flush=True)
            extra = [] if run["sweep"] else _resume_args(Path(run["run_dir"]))
            argv = [a for a in argv if not a.startswith(("hydra.run.dir=", "resume="))]
            time.sleep(0.1)


def stalled_line(stall: Stall, shared: Path, mark: MarkKilled | None = None) -> str:
    """The one line for a child the parent ended, after marking its tracked run KILLED."""
    run = _read_json(shared / "run.json") or {}
    run_dir = run.get("run_dir")
    committed = committed_steps(Path(run_dir)) if run_dir else []
    checkpoint = (f"last: step {committed[-1]} in {run_dir}; resume with resume={run_dir}"
                  if committed else "none was committed")
    tracked = _read_json(shared / "tracked.json")
    reason = (f"no progress for {stall.seconds:.0f} s after step {stall.step} "
              f"(trainer.stall_timeout_s={stall.timeout:g}): ended by mlxlab-train")
    marked = _mark_killed(tracked, reason, mark) if tracked else None
    return (f"the run made no progress for {stall.seconds:.0f} s after step {stall.step} (no "
            f"step, no CPU time, no reads or writes: a hang) and was ended "
            f"(trainer.stall_timeout_s={stall.timeout:g}); committed checkpoints are intact "
            f"({checkpoint})" + (f"; its MLflow run {marked} is marked KILLED" if marked else ""))


def _mark_killed(tracked: dict, reason: str, mark: MarkKilled | None) -> str | None:
    """The stalled child's tracked run KILLED by `mark` (launch/entry.py's: MLflow's stale-run
    marking); its id, None when it has no store or the store did not answer."""
    if mark is None or not tracked.get("uri"):
        return None
    try:
        mark(tracked["uri"], tracked["run_id"], reason)
        return tracked["run_id"]
    except Exception as e:  # noqa: BLE001 - the next command that opens the store marks it
        print(f"mlxlab: the stalled run's MLflow run {tracked['run_id']} could not be marked "
              f"KILLED ({type(e).__name__}: {e}); the next command that opens the store will",
              file=sys.stderr, flush=True)
        return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _restart_line(note: dict, line: str | None) -> str:
    if line is not None:  # a sweep's job: its next start fails it with the line, the rest go on
        return f"mlxlab: {line}; the sweep goes on"
    event = note["restarts"][-1]
    return (f"mlxlab: out of memory ({event['how']}) at step {event['step']} with micro-batch "
            f"{event['micro_batch']} x grad_accum {event['grad_accum']}: restarting from the "
            f"checkpoint of step {event['checkpoint_step']} with micro-batch "
            f"{event['to_micro_batch']} x grad_accum {event['to_grad_accum']} (the same "
            f"effective batch); {event['steps_lost']} step(s) since that checkpoint are trained "
            f"again (restart {len(note['restarts'])}, see {NOTE})")


def _resume_args(run_dir: Path) -> list[str]:
    """A single run restarts in its own folder, from its checkpoint when it has one."""
    args = [f"hydra.run.dir={run_dir}"]
    if committed_steps(run_dir):
        args.append(f"resume={run_dir}")
    return args


def _exit_status(code: int) -> int:
    """The child's status as this process's: a signal's death is passed on as that signal."""
    if code >= 0:
        return code
    sig = -code
    with contextlib.suppress(OSError, ValueError):
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1)
    return 128 + sig
