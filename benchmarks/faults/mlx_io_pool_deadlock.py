"""MLX's file-reading threads under an address-space limit: EAGAIN, std::terminate, or a hang
for ever (the reproduction for an upstream report; mlxlab's side is runtime/io_threads.py).

MLX 0.32.4 reads files on threads: `io::thread_pool()` (4 threads, made on the first `mx.load`
of a process and kept) and, for a file read by path (or a real file object) holding a tensor of
32 MiB or more, 4 more started for that read and ended after it (ParallelFileReader). Under
RLIMIT_AS (`ulimit -v`) with little address space left, starting threads fails; what follows
depends on how many started: none: "Resource temporarily unavailable"; some: std::thread's
destructor on a joinable thread (std::terminate) or the load waits for ever on a task no worker
runs (0 % CPU, no exception). Loading a small file first makes the kept pool only; the read's own
threads still start under the limit, and whether they find room depends on the stacks glibc kept
from earlier threads, so on a busy machine that case fails now and then. A plain Python stream
(readinto, seek, tell, closed; no name, no descriptor) is read on the kept pool and starts
nothing.

    .venv/bin/python benchmarks/faults/mlx_io_pool_deadlock.py             # margins 0, 8, 24, 40 MB
    .venv/bin/python benchmarks/faults/mlx_io_pool_deadlock.py --margins 24 --repeats 20

Each case runs in its own process (the REPRO text below, nothing of mlxlab), killed after
--timeout seconds (a hang), --repeats times. Results: docs/benchmarks.md "MLX's file-reading
threads under a memory limit".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.harness import add_smoke, write_record  # noqa: E402

# The minimal reproduction, as filed upstream: argv = file, margin in MB, case
#   cold: the first load of the process is the one under the limit
#   warm: a small file loaded first (the kept pool made), then the load by path under the limit
#   stream: as warm, the load under the limit through a plain Python stream
REPRO = """
import resource, sys, threading, weakref
import mlx.core as mx

path, margin_mb, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mx.save_safetensors(path, {"w": mx.zeros((1 << 24,))})  # 64 MB, one tensor
if how != "cold":  # the kept pool made now, while there is room
    mx.save_safetensors(path + ".small.safetensors", {"x": mx.zeros((1,))})
    mx.eval(mx.load(path + ".small.safetensors")["x"])

class Stream:  # no name, no fileno: MLX reads it as a stream
    def __init__(self, f): self.f = f
    closed = property(lambda self: self.f.closed)
    def readinto(self, b): return self.f.readinto(b)
    def seek(self, o, w=0): return self.f.seek(o, w)
    def tell(self): return self.f.tell()

def vm_size_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])

# room for the loaded array (64 MB) plus margin_mb, nothing more
limit = (vm_size_kb() + (70 + margin_mb) * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if how == "stream":
    with open(path, "rb") as f:
        stream, released = Stream(f), threading.Event()
        weakref.finalize(stream, released.set)
        w = mx.load(stream, format="safetensors")["w"]
        del stream
        released.wait(10)  # MLX's worker drops the stream under the GIL: not during exit
else:
    w = mx.load(path)["w"]
print(w.sum().item(), flush=True)  # cold, and warm at times: EAGAIN, std::terminate, or a hang
"""
CASES = ("cold", "warm", "stream")
HEADINGS = {"cold": "first load under the limit", "warm": "small file loaded first",
            "stream": "then a plain stream"}
BUSY = """
import mlx.core as mx
a = mx.random.normal((1024, 1024))
while True:
    mx.eval(a @ a)
"""


def case(path: Path, margin_mb: int, how: str, timeout: float) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", REPRO, str(path), str(margin_mb), how],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang"
    if done.returncode == 0:
        return "loaded"
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if "Resource temporarily unavailable" in last:
        return "EAGAIN"
    return "SIGABRT" if done.returncode == -6 else f"exit {done.returncode}"


def tally(results: list[str]) -> str:
    counts = Counter(results)
    return ", ".join(f"{what} {n}/{len(results)}" for what, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margins", default="0,8,24,40", help="MB of address space left")
    parser.add_argument("--repeats", type=int, default=3, help="processes a case")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a hang")
    parser.add_argument("--cases", default=",".join(CASES), help="of " + ", ".join(CASES))
    parser.add_argument("--busy", type=int, default=0,
                        help="MLX processes multiplying matrices meanwhile (a busy machine)")
    add_smoke(parser)
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux's /proc (VmSize) and RLIMIT_AS")
    margins = [0] if args.smoke else [int(m) for m in args.margins.split(",")]
    repeats = 1 if args.smoke else args.repeats
    import mlx.core as mx

    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        sys.exit(f"--cases: {sorted(unknown)} unknown; choose from {', '.join(CASES)}")
    print(f"MLX {mx.__version__}, {sys.platform}, {repeats} processes a case, "
          f"{args.busy} busy MLX processes beside")
    print("| margin MB | " + " | ".join(HEADINGS[how] for how in cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    rows = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.safetensors"
            for margin in margins:
                row = [tally([case(path, margin, how, args.timeout) for _ in range(repeats)])
                       for how in cases]
                rows[margin] = dict(zip(cases, row))
                print(f"| {margin} | " + " | ".join(row) + " |", flush=True)
    finally:
        for process in busy:
            process.kill()
    write_record("mlx-io-pool", {"mlx": mx.__version__, "repeats": repeats, "busy": args.busy,
                                 "rows_by_margin_mb": rows}, question="memory", smoke=args.smoke)


if __name__ == "__main__":
    main()
