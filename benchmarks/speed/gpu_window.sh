#!/usr/bin/env bash
# A GPU window (issue 60) in the device tool's terms. The GPU image has Python 3.12, PyTorch with
# CUDA 13, the nvidia-* CUDA wheels, numpy, pandas, scipy, transformers, tokenizers, pytest...; it
# lacks MLX, mlx-lm, hydra-core, omegaconf, mlflow, optuna, datasets, gguf, and has no network. A
# call carries at most 64 MiB (the working tree included) and runs at most 10 minutes, and the
# machine goes back 30 s after a call. So: the wheels travel in parts over the first calls, and
# the window's work runs in one background pipeline (its own process session, which outlives the
# calls while the machine is held) that later calls only watch.
#
#   bash benchmarks/speed/gpu_window.sh prepare     # here: wheels -> .whl/a .whl/b .whl/c (<= 56 MiB each)
#   bash benchmarks/speed/gpu_window.sh stash X     # there, call 1..3 (carry .whl/X): keep part X in /tmp
#   bash benchmarks/speed/gpu_window.sh start       # there, with the last part: assemble, start the pipeline
#   bash benchmarks/speed/gpu_window.sh watch [S]   # there: follow the pipeline for S s, results to $OUT
#   bash benchmarks/speed/gpu_window.sh pipeline    # (started by `start`): install, then bench_gpu.py parts
#
# Here afterwards: python benchmarks/speed/bench_gpu.py --from-json <files_at>/bench_gpu.json
#   --cpu-json <a CPU box's bench_gpu.json from `--parts runs`> --write
set -uo pipefail
cd "$(dirname "$0")/.."
MLX=0.32.4
PARTS=/tmp/gpu-parts    # the carried parts, kept between calls
WHEELS=/tmp/gpu-wheels  # the joined wheels
STATE=/tmp/gpu-bench    # the pipeline's log, JSON and runs ($OUT is emptied each call)
# What the GPU image already has (not carried): the big ones the resolution would bring again.
# certifi is carried: the image's (2026.7) is older than databricks-sdk (via mlflow) asks for, and
# pip's resolver then refused the install (2026-11-25's window fell back to --no-deps).
IMAGE_HAS='^(numpy|scipy|pandas|pyarrow|matplotlib|scikit_learn|torch|transformers|tokenizers|safetensors|huggingface_hub|hf_xet|sentencepiece|pillow|fonttools|kiwisolver|contourpy|aiohttp|yarl|multidict|frozenlist|propcache|grpcio|protobuf|pyyaml|regex|psutil|xxhash|tqdm|jinja2|markupsafe|requests|urllib3|charset_normalizer|idna|packaging|filelock|fsspec|joblib|threadpoolctl|nanobind|rich|pygments|typing_extensions|python_dateutil|pytz|tzdata|six|click|werkzeug|attrs|markdown_it_py|mdurl|cycler|pyparsing|anyio|h11|httpcore|httpx|sniffio|aiosignal|aiohappyeyeballs|shellingham|typer|zipp|websocket_client|networkx|sympy|mpmath|triton|nvidia_[a-z0-9_]+|cuda_[a-z_]+)-'

case "${1:-}" in
prepare)
  rm -rf .whl && mkdir -p .whl/all .whl/a .whl/b .whl/c  # .gitignore ignores .whl/: only `carry` sends it
  P="--python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  # omegaconf pins antlr4 4.9, published as source only: built into a pure wheel here
  python3 -m pip wheel -q --no-deps -w .whl/all antlr4-python3-runtime==4.9.3
  # MLX's CUDA wheel asks for the nvidia-* wheels the image has: fetched alone
  python3 -m pip download -q --no-deps --only-binary=:all: $P -d .whl/all "mlx-cuda-13==$MLX"
  # mlxlab's runtime dependencies (pyproject.toml) and the build backend for --no-build-isolation
  python3 -m pip download -q --only-binary=:all: --find-links .whl/all $P -d .whl/all \
    "mlx==$MLX" "mlx-lm==0.32.*" "hydra-core>=1.3,<1.4" "omegaconf>=2.3" "mlflow>=3.0" \
    "optuna>=5.0,<6" "datasets>=2.18" "gguf>=0.17" "hydra-joblib-launcher>=1.2" hatchling editables
  ls .whl/all | grep -Ev "$IMAGE_HAS" > .whl/carried.txt
  (cd .whl/all && tar cf - $(cat ../carried.txt)) | split -b 56M - .whl/part.
  for x in a b c; do [ -f ".whl/part.a$x" ] && mv ".whl/part.a$x" ".whl/$x/"; done
  rm -rf .whl/all
  [ -f .whl/part.ad ] && { echo "gpu_window: more than 3 parts; carry fewer wheels" >&2; exit 2; }
  wc -l < .whl/carried.txt; du -sh .whl/a .whl/b .whl/c
  ;;
stash)
  mkdir -p "$PARTS" && cp .whl/"${2:?which part: a | b | c}"/part.* "$PARTS"/
  ls -l "$PARTS"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  ;;
start)
  ls "$PARTS"/part.* >/dev/null || { echo "gpu_window: no parts in $PARTS (a fresh machine): stash a, b, c first" >&2; exit 2; }
  rm -rf "$WHEELS" && mkdir -p "$WHEELS" "$STATE" && cat "$PARTS"/part.* | tar xf - -C "$WHEELS"
  ls "$WHEELS" | wc -l
  setsid nohup bash benchmarks/speed/gpu_window.sh pipeline > "$STATE/pipeline.log" 2>&1 < /dev/null &
  echo "pipeline started: $STATE/pipeline.log"
  ;;
watch)
  # follow the pipeline for up to S seconds (or until it ends); what it has so far goes to $OUT
  end=$(( $(date +%s) + ${2:-540} ))
  seen=0
  while [ "$(date +%s)" -lt "$end" ]; do
    lines=$(wc -l < "$STATE/pipeline.log" 2>/dev/null || echo 0)
    [ "$lines" -gt "$seen" ] && sed -n "$((seen + 1)),${lines}p" "$STATE/pipeline.log" && seen=$lines
    [ -f "$STATE/done" ] && break
    sleep 5
  done
  [ -n "${OUT:-}" ] && cp "$STATE"/pipeline.log "$STATE"/bench_gpu.json "$STATE"/install.json "$OUT"/ 2>/dev/null
  [ -f "$STATE/done" ] && echo "pipeline ended: $(cat "$STATE/done")" || echo "pipeline still running"
  ;;
pipeline)
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  started=$(date +%s.%N)
  # pip install -e ".[cuda13]" as a user would, from the carried wheels (no network). Without
  # build isolation: the build-system's mlx[cpu] (for the CPU kernels' prebuild) is not carried.
  how="pip install --no-index --find-links --no-build-isolation -e .[cuda13]"
  python3 -m pip install -q --no-index --find-links "$WHEELS" hatchling editables \
    && python3 -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e ".[cuda13]" \
    || { how="resolution failed above: every carried wheel --no-deps, then -e . --no-deps"
         python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl \
         && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; }
  seconds=$(python3 -c "import time; print(time.time() - $started)")
  printf '{"seconds": %s, "how": "%s"}\n' "$seconds" "$how" > "$STATE/install.json"
  cat "$STATE/install.json"
  python3 -c "import mlx.core as mx, mlx_lm; print('MLX', mx.__version__, mx.default_device(), 'mlx-lm', mlx_lm.__version__)"
  which mlxlab-train
  status=0
  # the parts in order of what the window must show; each adds to bench_gpu.json
  for parts in first mlx torch runs pytest; do
    echo "== bench_gpu.py --parts $parts ($(date -u +%T))"
    python3 benchmarks/speed/bench_gpu.py --parts "$parts" --budget-min 16 --out "$STATE" || status=$?
  done
  echo "exit $status at $(date -u +%T)" > "$STATE/done"
  ;;
*)
  echo "usage: gpu_window.sh prepare | stash a|b|c | start | watch [S] | pipeline" >&2
  exit 2
  ;;
esac
