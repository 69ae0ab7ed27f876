"""The one fixed instruction-set level mlxlab's CPU code is built and run for, on this CPU.

Why a fixed level and not "this CPU's best": a program built for the CPU it runs on (`-march=
native`, or a BLAS that picks its kernels by CPU) is a different program on every kind of CPU,
so the last bits of a run change with the machine, and a build made on one machine may not run
on another. mlxlab uses one level per architecture instead:

- x86-64: **x86-64-v3** (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE: Intel since Haswell, AMD since
  Zen 1). The fused kernels are compiled for it (kernels/build.py) on every CPU at or above it,
  AVX-512 CPUs included, and MLX's OpenBLAS runs its AVX2 kernels (OpenBLAS's "Haswell" core)
  there, except on an AVX-512 CPU where its AVX-512 sgemm measured faster at the first import
  (runtime/compute/blas_kernels.py: ~2x on a Zen 5; the product's last bits are that CPU's own: the
  speed of the step's largest part outweighs bits shared with other CPUs). A CPU below it gets
  no fused kernels (pure MLX, one log line) and OpenBLAS's own choice of kernels.
- ARM64: **armv8-a** (NEON, which every ARM64 CPU has).

Standard library only, and no import of mlxlab: hatch_build.py loads this file on its own while
pip builds the wheel.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

X86_64_V3 = "x86-64-v3"
ARMV8_A = "armv8-a"
# x86-64-v3 as Linux's /proc/cpuinfo names its features (v2's and v1's included; "abm" is LZCNT,
# "pni" SSE3). The kernel lists AVX only when the OS saves the AVX registers (XSAVE enabled).
X86_64_V3_FLAGS = frozenset({
    "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",  # v2
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",  # v3
})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature names from /proc/cpuinfo's first `flags` line (empty where there is none:
    not Linux, or an ARM kernel's `Features` line, which this module does not need)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """The CPU's maker as /proc/cpuinfo's first `vendor_id` line names it ("GenuineIntel",
    "AuthenticAMD"; empty where there is none: not Linux, or an ARM kernel)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip()
    return ""


def isa_level(machine: str | None = None, flags: frozenset[str] | None = None) -> str | None:
    """The fixed level this CPU runs mlxlab's CPU code at: "x86-64-v3", "armv8-a", or None (an
    x86-64 CPU below v3, or another architecture). `machine` and `flags` default to this one's."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return ARMV8_A
    if machine not in ("x86_64", "amd64"):
        return None
    if flags is None:
        if not sys.platform.startswith("linux"):
            return None  # no /proc/cpuinfo to check (MLX itself has no x86 macOS wheel)
        flags = cpu_flags()
    return X86_64_V3 if flags >= X86_64_V3_FLAGS else None


def below_level_reason(machine: str | None = None, flags: frozenset[str] | None = None) -> str:
    """One line on why isa_level() is None here, naming what is missing."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return f"CPU architecture {machine} (mlxlab builds for x86-64-v3 and ARM64)"
    if flags is None:
        flags = cpu_flags() if sys.platform.startswith("linux") else frozenset()
    missing = sorted(X86_64_V3_FLAGS - flags)
    return f"this CPU is below x86-64-v3 (no {', '.join(missing) or 'feature list'})"
