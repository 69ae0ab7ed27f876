#!/usr/bin/env bash
# A GPU window in the device tool's terms (benchmarks/README.md, "On a GPU machine without
# network"): the GPU image has CUDA PyTorch, transformers, PEFT, numpy, pytest but not MLX, Hydra
# or mlflow, and no network; a call carries 64 MiB and runs 10 minutes. So the wheels and the real
# model travel as one tar stream in 48 MiB parts, MLX's first; the call that completes them starts
# the window's work as one background pipeline, and later calls bring the rest and then watch.
#
#   bash benchmarks/speed/gpu_window.sh prepare [sizes]  # here: .whl/a .. .whl/d
#   bash benchmarks/speed/gpu_window.sh stash X          # there, one call a part (carry .whl/X)
#   bash benchmarks/speed/gpu_window.sh watch [S]        # there: follow the pipeline, results to $OUT
#   pipeline: PyTorch + PEFT, mlxlab and mlx_lm.lora on the real model (real_model_finetune.py);
#   sizes: bench_sizes.py's table (prepare sizes); presets: bench_gpu.py's parts
set -uo pipefail
cd "$(dirname "$0")/../.."
MLX=0.32.4
PARTS=/tmp/gpu-parts    # the carried parts, kept between calls
WHEELS=/tmp/gpu-wheels  # what the parts hold, unpacked
STATE=/tmp/gpu-bench    # the pipeline's log, JSON and runs ($OUT is emptied each call)
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# What the GPU image already has (not carried): the big ones the resolution would bring again.
# certifi is carried: the image's is older than databricks-sdk (via mlflow) asks for.
IMAGE_HAS='^(numpy|scipy|pandas|pyarrow|matplotlib|scikit_learn|torch|transformers|tokenizers|safetensors|huggingface_hub|hf_xet|sentencepiece|pillow|fonttools|kiwisolver|contourpy|aiohttp|yarl|multidict|frozenlist|propcache|grpcio|protobuf|pyyaml|regex|psutil|xxhash|tqdm|jinja2|markupsafe|requests|urllib3|charset_normalizer|idna|packaging|filelock|fsspec|joblib|threadpoolctl|nanobind|rich|pygments|typing_extensions|python_dateutil|pytz|tzdata|six|click|werkzeug|attrs|markdown_it_py|mdurl|cycler|pyparsing|anyio|h11|httpcore|httpx|sniffio|aiosignal|aiohappyeyeballs|shellingham|typer|zipp|websocket_client|networkx|sympy|mpmath|triton|nvidia_[a-z0-9_]+|cuda_[a-z_]+|hatchling|editables|trove_classifiers|pathspec|pluggy)-'

complete() {  # complete NAME...: every named member is unpacked at its full size
  local name size
  for name in "$@"; do
    size=$(awk -v n="$name" '$1 == n {print $2}' "$PARTS/manifest.txt")
    [ -n "$size" ] && [ -f "$WHEELS/$name" ] && [ "$(stat -c %s "$WHEELS/$name")" = "$size" ] || return 1
  done
}

wait_for() {  # wait_for PATTERN: until every manifest member matching PATTERN is complete
  local names
  names=$(awk -v p="$1" '$1 ~ p {print $1}' "$PARTS/manifest.txt")
  until complete $names; do sleep 2; done
}

step() { echo "== $* ($(date -u +%T))"; }

case "${1:-}" in
prepare)
  rm -rf .whl && mkdir -p .whl/all .whl/stream  # .gitignore ignores .whl/: only `carry` sends it
  P="--python-version 3.12 --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  # omegaconf pins antlr4 4.9, published as source only: built into a pure wheel here
  python3 -m pip wheel -q --no-deps -w .whl/all antlr4-python3-runtime==4.9.3
  # MLX's CUDA wheel asks for the nvidia-* wheels the image has: fetched alone
  python3 -m pip download -q --no-deps --only-binary=:all: $P -d .whl/all "mlx-cuda-13==$MLX"
  if [ "${2:-}" = sizes ]; then
    # mlxlab's train path with tracking=csv imports none of mlflow, optuna, datasets or gguf:
    # MLX, mlx-lm, Hydra and the tokenizer files are the whole stream
    python3 -m pip download -q --no-deps --only-binary=:all: $P -d .whl/all "mlx==$MLX" \
      "mlx-lm==0.32.*" "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4"
    model=$(PYTHONPATH=src "${PYTHON:-python3}" -c "import sys; sys.path.insert(0, 'tests')
from real_models import packaged_model; from mlxlab.models.sources import model_folder
print(model_folder(str(packaged_model())))") || exit 2
    cp "$model"/tokenizer.json "$model"/tokenizer_config.json "$model"/chat_template.jinja .whl/stream/
    (cd .whl/all && mv *.whl ../stream/)
    order="$(cd .whl/stream && ls mlx_cuda_13-*.whl; ls | grep -v '^mlx_cuda_13-')"
    echo sizes > .whl/pipeline
  else
    # mlxlab's runtime dependencies (pyproject.toml); mlxlab itself runs from src/ (PYTHONPATH)
    python3 -m pip download -q --only-binary=:all: --find-links .whl/all $P -d .whl/all \
      "mlx==$MLX" "mlx-lm==0.32.*" "hydra-core>=1.3,<1.4" "omegaconf>=2.3" "mlflow>=3.0" \
      "optuna>=5.0,<6" "datasets>=2.18" "gguf>=0.17" "hydra-joblib-launcher>=1.2"
    # the packaged GGUF, checked by its sha256 (PYTHON: one with mlxlab's dependencies, e.g. .venv/bin/python)
    model=$(PYTHONPATH=src "${PYTHON:-python3}" tests/real_models.py) || exit 2
    cp "$model" .whl/stream/$GGUF
    # the stream's order: MLX's wheels (the pipeline starts on them), the model, the rest
    (cd .whl/all && mv mlx_cuda_13-*.whl mlx-$MLX-*.whl mlx_lm-*.whl ../stream/)
    ls .whl/all | grep -Ev "$IMAGE_HAS" | while read -r w; do mv ".whl/all/$w" .whl/stream/; done
    order="$(cd .whl/stream && ls mlx_cuda_13-*.whl mlx-$MLX-*.whl mlx_lm-*.whl; echo $GGUF;
             ls *.whl | grep -Ev '^mlx(_cuda_13|_lm)?-')"
    echo pipeline > .whl/pipeline
  fi
  (cd .whl/stream && for f in $order; do echo "$f $(stat -c %s "$f")"; done) > .whl/manifest.txt
  (cd .whl/stream && tar cf - $order) | split -b 48M - .whl/part.
  for x in a b c d e; do
    [ -f ".whl/part.a$x" ] || continue
    mkdir -p ".whl/$x" && mv ".whl/part.a$x" ".whl/$x/" && cp .whl/manifest.txt .whl/pipeline ".whl/$x/"
  done
  rm -rf .whl/all .whl/stream
  wc -l < .whl/manifest.txt; du -sh .whl/?
  ;;
stash)
  # keep part X, unpack what the parts so far hold, start the pipeline once MLX's wheels are whole
  mkdir -p "$PARTS" "$WHEELS" "$STATE"
  cp .whl/"${2:?which part: a | b | c | d}"/part.* .whl/"$2"/manifest.txt .whl/"$2"/pipeline "$PARTS"/
  # unpacked beside, and only whole members moved in: the pipeline may be reading earlier ones
  rm -rf "$WHEELS.part" && mkdir -p "$WHEELS.part"
  cat "$PARTS"/part.* | tar xf - -C "$WHEELS.part" 2>/dev/null  # the last member may be cut short
  while read -r name size; do
    [ -f "$WHEELS/$name" ] || [ "$(stat -c %s "$WHEELS.part/$name" 2>/dev/null)" != "$size" ] \
      || mv "$WHEELS.part/$name" "$WHEELS/$name"
  done < "$PARTS/manifest.txt"
  rm -rf "$WHEELS.part"
  ls -l "$PARTS"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if complete $(awk '$1 ~ /^mlx/ {print $1}' "$PARTS/manifest.txt") && [ ! -f "$STATE/started" ]; then
    date -u +%T > "$STATE/started"
    setsid nohup bash benchmarks/speed/gpu_window.sh "$(cat "$PARTS/pipeline")" > "$STATE/pipeline.log" 2>&1 < /dev/null &
    echo "pipeline started: $STATE/pipeline.log"
  fi
  [ -f "$STATE/pipeline.log" ] && tail -5 "$STATE/pipeline.log"
  ;;
watch)
  # follow the pipeline for up to S seconds (or until it ends); what it has so far goes to $OUT
  end=$(( $(date +%s) + ${2:-540} ))
  seen=0
  while [ "$(date +%s)" -lt "$end" ]; do
    lines=$(wc -l < "$STATE/pipeline.log" 2>/dev/null || echo 0)
    [ "$lines" -gt "$seen" ] && sed -n "$((seen + 1)),${lines}p" "$STATE/pipeline.log" && seen=$lines
    [ -f "$STATE/done" ] && break
    sleep 3
  done
  if [ -n "${OUT:-}" ]; then
    cp "$STATE"/pipeline.log "$OUT"/ 2>/dev/null
    (cd "$STATE" && tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.gguf' \
      --exclude='ptx' --exclude='mlruns*' --exclude='*.npz' --exclude='checkpoints' . 2>/dev/null)
  fi
  [ -f "$STATE/done" ] && echo "pipeline ended: $(cat "$STATE/done")" || echo "pipeline still running"
  ;;
pipeline)
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD/src" MLX_PTX_CACHE_DIR="$STATE/ptx"
  export MLXLAB_TEST_MODELS="$WHEELS" MLXLAB_CACHE_DIR="$STATE/cache" HF_HUB_OFFLINE=1
  status=0
  step "install MLX"
  python3 -c "import mlx.core" 2>/dev/null || python3 -m pip install -q --no-index --no-deps "$WHEELS"/mlx_cuda_13-*.whl "$WHEELS"/mlx-$MLX-*.whl \
    "$WHEELS"/mlx_lm-*.whl || status=$?
  python3 -c "import mlx.core as mx, mlx_lm; print('MLX', mx.__version__, mx.default_device(), 'mlx-lm', mlx_lm.__version__)"
  step "waiting for the other parts"
  wait_for '.'
  step "install the rest"
  python3 -m pip install -q --no-index --no-deps $(ls "$WHEELS"/*.whl | grep -Ev '/mlx(_cuda_13|_lm)?-') || status=$?
  W="$STATE/rm"                 # QLoRA: the GGUF's 4-bit layers
  WF="$STATE/rm-bf16"           # LoRA on the same weights in bf16
  rmf() { python3 benchmarks/quality/real_model_finetune.py --mlx-lm-as-shipped "$@"; }
  step "data and the GGUF converted once (mlxlab's model_folder)"
  rmf --work "$W" --stages none || status=$?
  rmf --work "$WF" --stages none --float-base bfloat16 || status=$?
  step "PyTorch + PEFT, bf16"
  python3 benchmarks/quality/real_model_torch_peft.py --work "$WF" --gguf "$WHEELS/$GGUF" || status=$?
  step "mlxlab and mlx_lm.lora, LoRA on the bf16 weights"
  rmf --work "$WF" --float-base bfloat16 --stages train_mlxlab_0,mlxlab,train_mlx_lm_0,mlx-lm || status=$?
  step "mlxlab and mlx_lm.lora, QLoRA on the GGUF's 4-bit layers"
  rmf --work "$W" --stages train_mlxlab_0,mlxlab,train_mlx_lm_0,mlx-lm || status=$?
  step "second timed round, alternating (bf16, then 4-bit)"
  python3 benchmarks/quality/real_model_torch_peft.py --work "$WF" --gguf "$WHEELS/$GGUF" --round 1 || status=$?
  rmf --work "$WF" --float-base bfloat16 --rounds 2 --stages train_mlx_lm_1,train_mlxlab_1 || status=$?
  rmf --work "$W" --rounds 2 --stages train_mlx_lm_1,train_mlxlab_1 || status=$?
  echo "exit $status at $(date -u +%T)" > "$STATE/done"
  ;;
sizes)
  # the size table (bench_sizes.py) on the GPU, the most wanted rows first; results.json under
  # $STATE/sizes keeps each stage, so whatever the window's time allows comes back
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD/src" MLX_PTX_CACHE_DIR="$STATE/ptx"
  export MLXLAB_CACHE_DIR="$STATE/cache" HF_HUB_OFFLINE=1
  status=0
  step "waiting for the parts"
  wait_for '.'
  step "install MLX, mlx-lm, Hydra"
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || status=$?
  python3 -c "import mlx.core as mx, mlx_lm; print('MLX', mx.__version__, mx.default_device(), mx.device_info().get('device_name'), 'mlx-lm', mlx_lm.__version__)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  mkdir -p "$STATE/tok" && cp "$WHEELS"/tokenizer.json "$WHEELS"/tokenizer_config.json "$WHEELS"/chat_template.jinja "$STATE/tok/"
  bench() { python3 benchmarks/speed/bench_sizes.py --work "$STATE/sizes" --tokenizer "$STATE/tok" \
              --steps 12 --skip 4 "$@" || status=$?; }
  all=mlx-lm,mlxlab,mlxlab-packed,torch-peft
  mlx=mlx-lm,mlxlab,mlxlab-packed
  # the rows not measured yet first (mlxlab's unpacked rows: padded to 128 on a GPU by default)
  step "Llama-3.1-8B bf16 LoRA"; bench --sizes llama-8b --modes lora --tools $all
  step "Llama-3.1-8B QLoRA"; bench --sizes llama-8b --modes qlora --tools $mlx
  step "Llama-3.2-1B and 3B bf16 LoRA"; bench --sizes llama-1b,llama-3b --modes lora --tools $all
  step "Llama-3.2-1B and 3B, a second round in the other order"
  bench --sizes llama-1b,llama-3b --modes lora,qlora --tools $all --rounds 2
  step "the table"
  bench --sizes llama-1b,llama-3b,llama-8b --modes lora,qlora --tools $all,mlxlab-b128 --rounds 2 \
    --table-only
  echo "exit $status at $(date -u +%T)" > "$STATE/done"
  ;;
presets)
  # the first window's LM presets and runs (bench_gpu.py); MLX and the rest installed by `pipeline`
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD/src" MLX_PTX_CACHE_DIR="$STATE/ptx"
  status=0
  for parts in first mlx torch runs pytest; do
    step "bench_gpu.py --parts $parts"
    python3 benchmarks/speed/bench_gpu.py --parts "$parts" --budget-min 16 --out "$STATE" || status=$?
  done
  exit $status
  ;;
*)
  echo "usage: gpu_window.sh prepare [sizes] | stash a|b|c|d | watch [S] | pipeline | sizes | presets" >&2
  exit 2
  ;;
esac
