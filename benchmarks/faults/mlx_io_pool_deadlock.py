"""MLX's file-reading thread pool under an address-space limit: EAGAIN, std::terminate, or a
hang for ever (the reproduction for an upstream report; mlxlab's side is runtime/io_threads.py).

MLX 0.32 makes `io::thread_pool()` (4 threads) on the first `mx.load` of a process. Under
RLIMIT_AS (`ulimit -v`) with little address space left, starting its threads fails; what
follows depends on how many started, i.e. on the room left: none: "Resource temporarily
unavailable"; some: std::thread's destructor on a joinable thread (std::terminate) or the load
waits for ever on a task no worker runs (0 % CPU, no exception). Loading a small file first,
while there is room, makes the pool once and every later load works at any margin.

    .venv/bin/python benchmarks/faults/mlx_io_pool_deadlock.py             # margins 0, 8, 24, 40 MB
    .venv/bin/python benchmarks/faults/mlx_io_pool_deadlock.py --margins 24

Each case runs in its own process (the REPRO text below, nothing of mlxlab), killed after
--timeout seconds (a hang). Measured with MLX 0.32.4 on Linux x86-64 (glibc, 8 MiB stacks):
margin 0: EAGAIN; 8: std::terminate (SIGABRT); 24 and 40: a hang (40 once a terminate: the
threads race); with the pool made first, every margin loads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: benchmarks.*
from benchmarks.common import add_smoke  # noqa: E402

# The minimal reproduction, as filed upstream: argv = file, margin in MB, "warm" or "cold"
REPRO = """
import resource, sys
import mlx.core as mx

path, margin_mb, warm = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "warm"
mx.save_safetensors(path, {"w": mx.zeros((1 << 24,))})  # 64 MB, one tensor
if warm:  # the pool made now, while there is room
    mx.eval(mx.load(path)["w"])

def vm_size_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])

# room for the loaded array (64 MB) plus margin_mb, nothing more
limit = (vm_size_kb() + (70 + margin_mb) * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
print(mx.load(path)["w"].sum().item(), flush=True)  # cold: EAGAIN, std::terminate, or a hang
"""


def case(path: Path, margin_mb: int, warm: bool, timeout: float) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", REPRO, str(path), str(margin_mb),
                               "warm" if warm else "cold"], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hang (killed after {timeout:g} s)"
    if done.returncode == 0:
        return "loaded"
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return f"exit {done.returncode}: {last[:80]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margins", default="0,8,24,40", help="MB of address space left")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a hang")
    add_smoke(parser)
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux's /proc (VmSize) and RLIMIT_AS")
    margins = [0] if args.smoke else [int(m) for m in args.margins.split(",")]
    import mlx.core as mx

    print(f"MLX {mx.__version__}, {sys.platform}")
    print("| margin MB | pool made on the load under the limit | pool made before |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        for margin in margins:
            cold = case(path, margin, False, args.timeout)
            warm = case(path, margin, True, args.timeout)
            print(f"| {margin} | {cold} | {warm} |", flush=True)


if __name__ == "__main__":
    main()
