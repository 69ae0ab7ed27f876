"""What MLX computes on: which backend this environment has and which is live (backend.py), the
device, its memory counters and compute dtype (device.py), the one instruction-set level the
CPU code is built and run for (cpu.py), an optimized BLAS for MLX on a Linux CPU (blas.py),
which of its kernels this CPU runs (blas_kernels.py), Intel MKL where it measured faster on an
Intel CPU (mkl.py), MKL's bf16 GEMM where the CPU has bf16 units (bf16.py), one thread for
MLX's small products (small_gemm.py), the small libraries those link at first use (linker.py),
and the header MLX's compiled CPU kernels read, precompiled once (jit_header.py).

Imports nothing here: mlxlab/__init__.py runs blas.py first (it imports mlx.core itself).
"""
