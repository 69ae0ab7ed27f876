#!/usr/bin/env bash
# On an Intel Xeon's CPU, pinned to 2 cores (as the 2-core AMD figures in
# benchmarks/results/cpu-vendor-2026-11-25/): bench.py --models nano beside PyTorch, then the
# default experiment's whole run beside its PyTorch twin (bench_default_run.py). No network:
# .dev's wheels and .dev/intel/extras.tar.xz (cp312 pandas, pyarrow, datasets, matplotlib and
# their own dependencies, unpacked) go into a folder of their own on PYTHONPATH (the system's
# packages stay as they are), and the fused kernels' cp312 build made on the AMD machine (the
# same program the AMD figures ran) is put into a kernels cache of its own.
#   OUT=/some/folder bash .dev/intel.sh          (from the repository root)
# Knobs (environment): LIMIT (seconds for the whole script, 420), CORES (a comma list; default:
# the first two CPUs on distinct physical cores), NANO_LIMIT (190), NANO_VARIANTS (extra bench.py
# rows, none), ROWS (bench_default_run.py's: readme,twin with mlflow, else bare,twin), SMOKE=1
# (both benchmarks' --smoke), PY (python3), WHEELS (.dev/*.whl .dev/intel/*.whl), EXTRAS
# (.dev/intel/extras.tar.xz; `none`: skip), KDIR (the prebuilt kernels' folder, .dev/intel/kernels).
# Exit status 0 only when every step and both benchmarks succeeded.
set -u
ROOT=$PWD
OUT=${OUT:-/tmp/intel_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/intel.log") 2>&1
T0=$SECONDS
LIMIT=${LIMIT:-420}
# Two logical CPUs on two different physical cores (never a core's two hyperthreads)
CORES=${CORES:-$(lscpu -p=CPU,CORE,SOCKET | grep -v '^#' | awk -F, '!seen[$2 "," $3]++ {print $1}' | head -2 | paste -sd,)}
CORES=${CORES:-0,1}
THREADS=$(( $(echo "$CORES" | tr ',' '\n' | wc -l) ))
PY=${PY:-python3}
# "site-packages" in the path: dill (datasets' fingerprints) pickles a module by value, and
# fails on pyarrow's, when its file's path has no sys prefix and no "site-packages" in it
SITE=/tmp/intel/site-packages
KCACHE=/tmp/intel/kernels
KDIR=${KDIR:-$ROOT/.dev/intel/kernels}
EXTRAS=${EXTRAS:-$ROOT/.dev/intel/core.tar.xz}
FAILED=()
left() { echo $(( LIMIT - (SECONDS - T0) )); }
say() { echo "== [$(date -u +%T) +$((SECONDS - T0)) s] $*"; }

export CUDA_VISIBLE_DEVICES="" PYTHONUNBUFFERED=1
export OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export MLXLAB_KERNEL_THREADS=$THREADS MLXLAB_KERNELS_CACHE=$KCACHE
export MLXLAB_BENCH_RESULTS=$OUT/records HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset MLFLOW_TRACKING_URI PYTHONDONTWRITEBYTECODE

say "machine"
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread\(s\) per core|^Core\(s\) per socket|^Socket\(s\)|^NUMA node\(s\)|^L2|^L3"
echo "AVX-512: $(grep -m1 -o -w 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "nproc $(nproc); load $(cut -d' ' -f1-3 /proc/loadavg); pinned to CPUs $CORES ($THREADS threads)"
lscpu -p=CPU,CORE,SOCKET,NODE | grep -v '^#' | head -4 | sed 's/^/  cpu,core,socket,node: /'
free -g | head -2
"$PY" --version
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda build", torch.version.cuda, "threads", torch.get_num_threads())' \
  || FAILED+=(torch)
"$PY" -c 'import numpy; print("numpy", numpy.__version__)
if tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 0): print("MISSING: numpy >= 2.0.2 (pandas 3.1.1 in the extras needs it)")'
command -v taskset >/dev/null || { echo "FATAL: taskset is missing (util-linux)"; exit 2; }
command -v timeout >/dev/null || { echo "FATAL: timeout is missing (coreutils)"; exit 2; }

(while sleep 15; do echo "[load] $(date -u +%T) $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.log"; done) &
WATCH=$!
trap 'kill $WATCH 2>/dev/null' EXIT

say "wheels into $SITE"
rm -rf "$SITE"
WHEELS=${WHEELS:-$ROOT/.dev/*.whl $ROOT/.dev/intel/*.whl}
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
  $WHEELS 2>&1 | grep -v -i -E "warning|already exists" | tail -5
if [ "${PIPESTATUS[0]}" != 0 ]; then  # no pip here: these wheels carry no .data that matters
  echo "pip failed: unzipping the wheels instead"
  # shellcheck disable=SC2086
  "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" $WHEELS \
    || FAILED+=(wheels)
fi
# the carried extras (pandas, matplotlib and theirs) only where the system's python lacks them:
# the system's own builds match its numpy
if [ "$EXTRAS" != none ] && ! "$PY" -c 'import pandas, matplotlib' 2>/dev/null; then
  tar xJf "$EXTRAS" -C "$SITE" || { echo "FAILED: unpacking $EXTRAS"; FAILED+=(extras); }
else
  echo "extras: the system's pandas and matplotlib"
fi
if ! "$PY" -c 'import datasets, pyarrow' 2>/dev/null && [ -f "$ROOT/.dev/intel/arrow.tar.xz" ]; then
  tar xJf "$ROOT/.dev/intel/arrow.tar.xz" -C "$SITE" && echo "datasets and pyarrow: the carried ones"
fi
ls "$SITE" | grep -i dist-info | sed 's/.dist-info//' | tr '\n' ' '; echo
# bytecode now, on every core: the timed processes then load it as they did on the AMD machine
"$PY" -m compileall -q -j 0 "$SITE" "$ROOT/src" "$ROOT/benchmarks" > /dev/null 2>&1

# The interpreter the runs use: bench_default_run.py starts `mlxlab-train` from beside
# sys.executable, so that folder gets a launcher (mlxlab itself is src/ on PYTHONPATH). A
# system python's folder is not ours to write: a venv over its packages is made instead.
PYX=$("$PY" -c 'import sys; print(sys.executable)')
if [ "$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" = 0 ] || [ ! -w "$(dirname "$PYX")" ]; then
  "$PY" -m venv --system-site-packages --without-pip /tmp/intel/env && PYX=/tmp/intel/env/bin/python3
fi
export PYTHONPATH=$ROOT/src:$SITE
LAUNCHER=$(dirname "$PYX")/mlxlab-train
[ -e "$LAUNCHER" ] || printf '#!%s\nimport sys\nfrom mlxlab.train import main\nsys.exit(main())\n' "$PYX" > "$LAUNCHER"
chmod +x "$LAUNCHER" 2>/dev/null
echo "interpreter $PYX; launcher $LAUNCHER"

say "modules (MISSING lines name what to add to .dev)"
# one process tries them all (a process each costs seconds of the budget)
MODULES="torch numpy scipy yaml jinja2 tqdm tokenizers safetensors threadpoolctl huggingface_hub fsspec
  filelock packaging joblib cloudpickle psutil pandas dateutil pyarrow datasets dill multiprocess xxhash
  matplotlib PIL fontTools mlx.core hydra omegaconf antlr4 scipy_openblas32 mlflow sqlalchemy alembic"
MISSING=$("$PYX" -c '
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        print(name, f"({type(e).__name__}: {str(e)[:120]})")' $MODULES)
if [ -n "$MISSING" ]; then echo "$MISSING" | sed 's/^/MISSING: /'; else echo "none missing"; fi
MLFLOW=1
while read -r mod _; do
  [ -z "$mod" ] && continue
  if [[ "$mod" =~ ^(mlflow|sqlalchemy|alembic)$ ]]; then
    MLFLOW=0; echo "  ($mod: optional; without mlflow's store the default run's row is bare, nano's mlxlab row tracks to CSV)"
  else FAILED+=("module:$mod"); fi
done <<< "$MISSING"

say "fused kernels: the prebuilt build into $KCACHE"
rm -rf "$KCACHE"
SO=$KDIR/_mlxlab_kernels$("$PYX" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
KEY=$(cd "$ROOT" && "$PYX" - "$KDIR/csrc.sha256" <<'PY'
import hashlib, importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("kbuild", "src/mlxlab/kernels/build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
digest = hashlib.sha256()
for path in sorted(build.SRC.iterdir()):
    if path.is_file():
        digest.update(path.name.encode() + path.read_bytes())
if digest.hexdigest() != Path(sys.argv[1]).read_text().split()[0]:
    sys.exit("kernels: src/mlxlab/kernels/csrc changed since the prebuilt build; not using it")
print(build.build_key("x86-64-v3"))
PY
)
if [ -n "$KEY" ] && [ -f "$SO" ]; then
  mkdir -p "$KCACHE/$KEY" && cp "$SO" "$KCACHE/$KEY/" && echo "prebuilt $(basename "$SO") -> $KCACHE/$KEY"
else
  echo "WARNING: no prebuilt kernels for this python ($SO); a local build is tried (needs cmake, ninja, c++, nanobind)"
fi
# build.py asks for cmake and ninja on PATH before it looks in the cache; with the build in
# place neither runs, so stand-ins that fail are enough where they are missing.
mkdir -p /tmp/intel/bin
for tool in cmake ninja; do
  command -v "$tool" >/dev/null || printf '#!/bin/sh\necho "%s: not on this machine" >&2; exit 1\n' "$tool" > "/tmp/intel/bin/$tool"
  chmod +x "/tmp/intel/bin/$tool" 2>/dev/null
done
export PATH=/tmp/intel/bin:$PATH
# First import on the machine, on the cores the runs get: OpenBLAS's AVX-512-or-AVX2 choice is
# measured and cached here (runtime/compute/blas_kernels.py), not inside a timed run.
taskset -c "$CORES" timeout 120 "$PYX" -c '
import mlxlab, mlx.core as mx
from mlxlab import kernels
print("mlx", mx.__version__, mx.default_device())
print("blas:", mlxlab.blas.status, mlxlab.blas.library, mlxlab.blas.detail)
print("fused kernels:", kernels.status(), "threads", kernels.threads())
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot  # its font cache, built once' || FAILED+=(setup)
cat "$KCACHE/blas-kernels.json" 2>/dev/null | head -c 600; echo

SMOKE_FLAG=${SMOKE:+--smoke}
say "bench.py --models nano ($(left) s left)"
NANO_ARGS=(--models nano --repeats 2 --threads "$THREADS" --gemm 1024 --variants "${NANO_VARIANTS:-}")
[ "$MLFLOW" = 1 ] || NANO_ARGS+=(--override tracking=csv)   # the full row's tracking without mlflow
NANO_T=${NANO_T:-$(( $(left) - 200 < ${NANO_LIMIT:-190} ? $(left) - 200 : ${NANO_LIMIT:-190} ))}
echo "command: taskset -c $CORES timeout $NANO_T $PYX benchmarks/speed/bench.py ${NANO_ARGS[*]} $SMOKE_FLAG"
if [ "$NANO_T" -gt 30 ]; then
  taskset -c "$CORES" timeout "$NANO_T" "$PYX" benchmarks/speed/bench.py "${NANO_ARGS[@]}" $SMOKE_FLAG \
    > "$OUT/nano.log" 2>&1
  rc=$?; tail -n 60 "$OUT/nano.log"; echo "bench.py rc $rc"
  [ "$rc" = 0 ] || FAILED+=("nano:rc$rc")
else
  echo "skipped: $NANO_T s left for it"; FAILED+=(nano:time)
fi

ROWS=${ROWS:-$([ "$MLFLOW" = 1 ] && echo readme,twin || echo bare,twin)}
DEFAULT_T=$(( $(left) - 10 )); [ -n "${NO_DEFAULT:-}" ] && DEFAULT_T=0
say "bench_default_run.py --rows $ROWS ($DEFAULT_T s)"
echo "command: taskset -c $CORES timeout $DEFAULT_T $PYX benchmarks/speed/bench_default_run.py --rows $ROWS --repeats 2 --threads $THREADS $SMOKE_FLAG"
if [ "$DEFAULT_T" -gt 60 ]; then
  taskset -c "$CORES" timeout "$DEFAULT_T" "$PYX" benchmarks/speed/bench_default_run.py --rows "$ROWS" \
    --repeats 2 --threads "$THREADS" $SMOKE_FLAG 2>&1 | tee "$OUT/default_run.log"
  rc=${PIPESTATUS[0]}; echo "bench_default_run.py rc $rc"
  [ "$rc" = 0 ] || FAILED+=("default_run:rc$rc")
else
  echo "skipped: $DEFAULT_T s left for it"; FAILED+=(default_run:time)
fi

cp "$KCACHE/blas-kernels.json" "$OUT/" 2>/dev/null
ls -la "$OUT" "$OUT/records" 2>/dev/null
say "done in $((SECONDS - T0)) s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} = 0 ]
