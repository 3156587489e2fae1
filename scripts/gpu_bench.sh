#!/usr/bin/env bash
# One command for a session lent one GPU (sized for an H100, bf16): CLEAR versus full attention,
# attention op at 2K/4K/8K, denoising step at 2K/4K/8K, within 8 minutes. Writes JSON and Markdown tables
# to $OUT (default bench_out/); paste the .md files into BENCHMARKS.md's GPU section.
#
#   bash scripts/gpu_bench.sh                 # on the GPU machine, from anywhere
#   SMOKE=1 bash scripts/gpu_bench.sh         # tiny CPU settings: checks the script's plumbing only
#
# The GPU machine has torch, transformers, typer, rich, safetensors and huggingface_hub, but not
# diffusers and no internet. Fetch the wheels beforehand into .whl/ (git-ignored; carry it along):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#     diffusers==0.42.1 requests urllib3 idna charset-normalizer certifi pillow
# diffusers imports requests, filelock, regex and PIL (Pillow) at import time; torch brings filelock,
# transformers brings regex, huggingface_hub 1.x no longer brings requests (so its four small deps
# too), and nothing brings Pillow (the wheel above is for CPython 3.12). importlib_metadata is
# declared but not imported on Python >= 3.8. Only what fails to import is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-bench_out}"
BUDGET="${BUDGET:-470}"  # seconds for everything; the H100 slot is 8 minutes
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }

# 0. Offline installs of what is missing, one module at a time (the Pillow wheel is CPython 3.12 only).
offline() {  # offline MODULE PACKAGES...: install PACKAGES from .whl/ unless MODULE imports
  local module=$1; shift
  $PY -c "import $module" 2>/dev/null && return
  echo "installing from .whl/: $*"
  $PY -m pip install -q --no-index --no-deps --find-links .whl "$@" ||
    echo "could not install $* offline: fetch the wheels into .whl/ (see the top of this script)"
}
offline diffusers diffusers
offline requests requests urllib3 idna charset_normalizer certifi
offline PIL pillow
$PY -c "from diffusers import FluxTransformer2DModel" || { echo "diffusers does not import"; exit 1; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ "${SMOKE:-0}" = 1 ]; then  # plumbing check on a CPU: small everything
  COMMON=(--device cpu --heads 2 --head-dim 32 --repeats 1)
  RES=256,512; BIG=512; LAYERS=(--layers 2)
else
  COMMON=(--repeats 3)  # FLUX.1-dev: 24 heads x 128, bf16 on CUDA
  RES=2048,4096,8192; BIG=8192; LAYERS=(--layers 57)  # each size compiles FlexAttention once
fi
bench() {  # bench NAME TIMEOUT ARGS...: one `clear-gen bench`, rows saved as they land
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s, $(left)s left)"
  PYTHONPATH=. timeout "$limit" $PY -c "from clear_gen.cli import main; main()" bench "$@" \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" 2>&1 | tee "$OUT/$name.log"
}

# 1. The attention op alone, CLEAR r = 8 vs full SDPA, then the dense check at 1K. (~2 min)
bench attention 180 --what attention --res "$RES" --window 8 "${COMMON[@]}"
# 2. Plan: FLOPs, densities and mask build times (CPU only, seconds).
bench plan 60 --what plan --res "$RES" --window 8
# 3. One denoising step of the full FLUX.1-dev transformer (57 blocks), CLEAR r = 8 vs stock, full
#    attention included while the budget allows: the 8K stock step (~90 s on an H100) is last, run
#    once, and skipped (reported as an estimate, marked est.) when it would overrun the budget.
#    (No whole-step dense check at these sizes: the dense reference does not fit; tests cover it.)
T=$(left); bench step $((T > 30 ? T - 10 : 20)) --what step --res "$RES" --window 8 "${COMMON[@]}" \
  "${LAYERS[@]}" --time-budget $((T > 60 ? T - 40 : 20))
# 4. If time is left: the same step at the largest size with r = 16 (CLEAR only).
T=$(left); [ "$T" -gt 90 ] && bench step_r16 $((T - 10)) --what step --res "$BIG" --window 16 \
  "${COMMON[@]}" "${LAYERS[@]}" --no-compare-full
echo "done in $(($(date +%s) - START))s; tables in $OUT/*.md"
