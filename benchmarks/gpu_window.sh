#!/usr/bin/env bash
# A GPU window for issue 40, in the device tool's terms (docs/benchmarks-history.md, "The
# window's procedure": the calls in order). The GPU machine has Python 3.12, CUDA 13 libraries
# (the nvidia-* wheels MLX's CUDA build asks for), PyTorch with CUDA, numpy, pandas, tokenizers,
# pytest; it lacks MLX, hydra-core, omegaconf and antlr4, and has no network. A call carries at
# most 64 MiB and runs at most 10 minutes, and the machine is given back 30 s after a call: the
# calls follow each other.
#
#   bash benchmarks/gpu_window.sh prepare        # here: wheels into .whl/a (<= 55 MiB) and .whl/b
#   bash benchmarks/gpu_window.sh install        # there: join the MLX CUDA wheel, install to /tmp/site
#   bash benchmarks/gpu_window.sh bench PARTS    # there: bench_gpu.py --parts PARTS, JSON to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
MLX=0.32.4
WHEEL=mlx_cuda_13-$MLX-py3-none-manylinux_2_35_x86_64.whl
SITE=/tmp/site
STATE=/tmp/gpu-bench  # outlives the calls while the machine stays warm ($OUT is emptied each call)

case "${1:-}" in
prepare)
  rm -rf .whl && mkdir -p .whl/a .whl/b  # .gitignore ignores .whl/: only `carry` sends it
  # MLX publishes manylinux_2_35 wheels only (glibc >= 2.35); the others are pure Python
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 -d .whl/b "mlx==$MLX" "mlx-cuda-13==$MLX"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl/b \
    hydra-core==1.3.8 omegaconf==2.3.1
  # omegaconf pins antlr4 4.9.*, published as source only: built into a pure wheel here
  python3 -m pip wheel -q --no-deps -w .whl/b antlr4-python3-runtime==4.9.3
  # 86 MiB: more than one call carries; its first 55 MiB go in the first call
  split -b 55M ".whl/b/$WHEEL" .whl/part.
  mv .whl/part.aa .whl/a/ && mv .whl/part.ab .whl/b/ && rm ".whl/b/$WHEEL"
  du -sh .whl/a .whl/b
  ;;
install)
  cat .whl/a/part.aa .whl/b/part.ab > "/tmp/$WHEEL"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "/tmp/$WHEEL" .whl/b/*.whl
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  PYTHONPATH="$SITE:src" python3 -c "import mlx.core as mx; print(mx.__version__, mx.default_device())"
  ;;
bench)
  [ -d "$SITE/mlx" ] || { echo "gpu_window: MLX is not installed here (a fresh machine): run install first" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PWD/src" PYTHONUNBUFFERED=1
  mkdir -p "$STATE"
  status=0
  python3 benchmarks/bench_gpu.py --parts "${2:?which parts: mlx | torch | runs,pytest}" \
    --budget-min 20 --out "$STATE" || status=$?
  [ -n "${OUT:-}" ] && cp "$STATE/bench_gpu.json" "$OUT/" 2>/dev/null || true
  exit $status
  ;;
*)
  echo "usage: gpu_window.sh prepare | install | bench PARTS" >&2
  exit 2
  ;;
esac
