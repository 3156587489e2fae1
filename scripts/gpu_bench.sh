#!/usr/bin/env bash
# The GPU proof in one command, for a session lent one GPU (H100/H200, bf16): CLEAR versus full
# attention on random FLUX.1-dev-sized weights, one step and whole 8K images (generate's own code
# path: first pass, SDEdit stage, tiled VAE decode, PNG), in parts ordered by value, within BUDGET
# seconds (default 300: a session has 15 minutes of device time, machine start and a rerun included).
#
#   bash scripts/gpu_bench.sh                     # on the GPU machine; writes into $OUT
#   BUDGET=560 PARTS=image-8k,image-8k-r8 bash scripts/gpu_bench.sh   # a rerun: other parts, more time
#   SMOKE=1 bash scripts/gpu_bench.sh             # tiny CPU settings: checks the plumbing only
#
# Three files come back in $OUT (the device tool returns at most 8): rows.jsonl (every row as it lands,
# and each part's status), bench.md (the report, rewritten after every row and every part: a part cut
# by its timeout or the budget is listed as killed or skipped) and bench.log (everything printed).
# Outside the device tool OUT defaults to bench_out/.
#
# The GPU machine has torch, transformers, typer, rich, safetensors and huggingface_hub but not
# diffusers nor torchao (for --quantize fp8dq), and no network: carry their wheels in .whl/ (git-ignored;
# name .whl in the tool's carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0
# (its other needs, requests, Pillow, regex, filelock, numpy, are on that machine).
# Test knobs: PARTS (comma-separated part names to run; default all), PART_LIMITS ("name=seconds,...":
# per-part timeouts, e.g. to check that a killed part is reported).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-bench_out}"
BUDGET="${BUDGET:-300}"
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl" MD="$OUT/bench.md" LOG="$OUT/bench.log"
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
report() { $PY clear_gen/bench/report.py "$ROWS" "$MD" "clear-gen GPU bench (scripts/gpu_bench.sh)" || true; }
status() { printf '{"part": "%s", "status": "%s"}\n' "$1" "$2" >>"$ROWS"; report; }

# 0. diffusers from .whl/ when the machine lacks it (the device tool's recipe: a --target folder).
if ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "no diffusers and no usable wheel in .whl/: see the top of this script"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ "${SMOKE:-0}" = 1 ]; then  # plumbing check on a CPU: small everything
  MODEL=(--device cpu --heads 2 --head-dim 32 --layers 2) BIG=512 MID=256,384 SIZES=256,384,512
  IMAGE=(--res 512 --stages 256,512 --steps 2 --vae-channels 8) FP8=int8  # fp8dq needs CUDA
  CN_LAYERS=3
else
  MODEL=(--layers 57) BIG=8192 MID=2048,4096 SIZES=2048,4096,8192  # FLUX.1-dev: 24 heads x 128, bf16
  IMAGE=(--res 8192)  # the default recipe: a 1024 px first pass (20 steps), then 8K (14 of 20 steps)
  FP8=fp8dq  # dynamic fp8 activations and weights: fp8 matmuls (compute capability 8.9+)
  CN_LAYERS=15  # a union ControlNet's 5 double + 10 single blocks (the bench's 1:2 split)
fi

# part NAME MIN_S MAX_S ARGS...: one `clear-gen bench`, rows appended to rows.jsonl as they land.
# Skipped when PARTS leaves it out or less than MIN_S of the budget is left; killed after MAX_S.
part() {
  local name=$1 min=$2 max=$3 limit rc; shift 3
  if [ -n "${PARTS:-}" ] && [[ ",$PARTS," != *",$name,"* ]]; then status "$name" "not selected (PARTS)"; return; fi
  if [ "$(left)" -lt "$min" ]; then status "$name" "skipped: $(left) s of the budget left, needs ${min} s"; return; fi
  limit=$(( $(left) < max ? $(left) : max ))
  [[ ",${PART_LIMITS:-}," =~ ,$name=([0-9]+), ]] && limit=${BASH_REMATCH[1]}
  echo "== $name (timeout ${limit}s, $(left)s of the budget left)"
  status "$name" "running (timeout ${limit} s)"
  timeout --kill-after=10 "$limit" $PY -m clear_gen bench "$@" --jsonl "$ROWS" --label "$name" --markdown "$MD"
  rc=$?
  case $rc in
    0) status "$name" "done" ;;
    124|137) status "$name" "killed: timeout after ${limit} s (rows measured before it are kept)" ;;
    *) status "$name" "failed: exit $rc (see bench.log)" ;;
  esac
}

# 1. The headline: one 8K step of the full transformer, CLEAR (default variant r8-down4), then the
#    stock step at 8K alone (~100 s on an H100: one call; the image parts' full attention comes from it).
part step-8k 60 150 --what step --res "$BIG" --measure clear --repeats 1 "${MODEL[@]}"
part full-8k 100 220 --what step --res "$BIG" --measure full --repeats 0 "${MODEL[@]}"
# 2. Whole 8K images by generate's code path: the default variant, then r = 8 (the paper's setting),
#    plain and with compiled blocks. Each needs minutes: a rerun with more BUDGET brings the rest.
part image-8k 150 330 --what image "${IMAGE[@]}" "${MODEL[@]}"
part image-8k-r8 120 300 --what image "${IMAGE[@]}" --variant r8 "${MODEL[@]}"
part image-8k-compile 150 330 --what image "${IMAGE[@]}" --variant r8 --compile "${MODEL[@]}"
part image-8k-fp8dq 150 330 --what image "${IMAGE[@]}" --variant r8 --compile --quantize "$FP8" "${MODEL[@]}"
# 3. The attention op alone, r = 8, 2K-8K, against full SDPA; its image and text query rows timed apart.
part attention 50 120 --what attention --res "$SIZES" --variant r8 --repeats 3 "${MODEL[@]}"
# 3b. A union ControlNet's blocks at 8K (its embedders and residual Linears left out), training-free CLEAR
#    r = 8 as the pipeline gives it above 1024 px, against full attention: what that choice saves a step.
part controlnet-8k 60 150 --what step --res "$BIG" --window 8 --down-factor 1 --repeats 1 "${MODEL[@]}" \
  --layers "$CN_LAYERS"
# 4. Whole steps at 2K and 4K, CLEAR and full.
part steps-2k-4k 60 150 --what step --res "$MID" --repeats 3 "${MODEL[@]}"
# 5. The plan (CPU, seconds): densities, mask build, FLOPs.
part plan 10 60 --what plan --res "$SIZES"
echo "done in $(( $(date +%s) - START ))s; report in $MD"
