#!/usr/bin/env bash
# The GPU proof in one call of at most BUDGET seconds (default 300) on one H100 or H200, under the lent
# machine's torch (2.11), on random FLUX.1-dev-sized weights (bf16, 24 heads x 128, 57 blocks). Parts run
# in this order, each with its own cap; rows land in rows.jsonl as they are measured, so a killed part
# keeps what it measured:
#   env           versions, card, free memory                                                     ~5 s
#   check         CLEAR's kernel vs the dense reference in float32, bf16, one block's attention,
#                 at 1K (every query row) and 4K (1,024 sampled rows); a failure stops nothing but
#                 is the report's first line                                                      ~30 s
#   step-8k       one 8K step, CLEAR r8-down4 (the default); full attention composed from the
#                 measured 8K attention op and the measured rest of the step (--measure composed) ~55 s
#   step-8k-r8    the same with r = 8 (the paper's setting)                                        ~40 s
#   image-8k      a whole 8K image by generate's code path (bench --what image): the default recipe
#                 with 5 steps a stage (1K first pass, 4 steps at 8K), tiled VAE decode, PNG write;
#                 the 20-step image extrapolated from it (labelled)                               ~120 s
#   then while the budget lasts, or in a rerun (PARTS=...):
#   attention-8k  the 8K attention op, r = 8: one kernel, image and text query rows apart, and the
#                 flex-split backend (text rows apart, exact) timed whole
#   compile-8k    an 8K step of 6 blocks, r = 8, eager then with --compile (regional), same process
#   fp8dq-8k      the same with --quantize fp8dq --compile (fp8 matmuls)
#   fa4-8k        the 8K attention op (the default r8-down4) by flex (Triton), flex-fa4 (FlashAttention-4
#                 through flex) and gather side by side, each checked against the dense reference at 1K;
#                 without the flash-attn-4 package flex-fa4 is a refused row, said why         ~150 s
#   image-8k-r8, controlnet-8k, steps-2k-4k, plan: reruns only in practice
#   vae-8k        exact VAE tiling, the full-width random FLUX.1 VAE in bf16 (scripts/vae_tiling.py
#                 --bench): exact against untiled decode and encode at 4K (error, times, peaks), then an
#                 8K decode in 1024 px tiles (time, peak memory vs the plan's model)          ~200 s
#
#   bash scripts/gpu_bench.sh                                              # on the GPU machine: into $OUT
#   PARTS=attention-8k,compile-8k,fp8dq-8k bash scripts/gpu_bench.sh       # a rerun: what was skipped
#   PARTS=fa4-8k bash scripts/gpu_bench.sh                                 # FlashAttention-4 vs Triton
#   SMOKE=1 bash scripts/gpu_bench.sh                                      # tiny CPU settings: plumbing only
#
# Three files come back in $OUT (outside the device tool: bench_out/): rows.jsonl (every row as it lands and
# each part's status), bench.md (the report, rewritten after every row and every part: a 10-line summary,
# then each part's status and tables; a part cut by its cap or the budget is listed as killed or skipped)
# and bench.log (everything printed).
#
# The GPU machine has torch 2.11, transformers, typer, rich, safetensors and huggingface_hub but neither
# diffusers nor torchao (--quantize fp8dq), and no network: carry their wheels in .whl/ (git-ignored; name
# .whl in the device tool's carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0
# flash-attn-4 (fa4-8k) does not fit that carry: its nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB
# (BENCHMARKS.md, *FlashAttention-4*); wheels put in .whl/ by other means are installed with the others.
# Knobs: PYTHON (the interpreter), BUDGET (seconds), PARTS (comma-separated part names; default all),
# PART_LIMITS ("name=seconds,...": a part's cap, e.g. to check that a killed part is reported).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-bench_out}"
BUDGET="${BUDGET:-$([ "${SMOKE:-0}" = 1 ] && echo 160 || echo 300)}"  # SMOKE: under 3 minutes on 2 CPU cores
mkdir -p "$OUT"
ROWS="$OUT/rows.jsonl" MD="$OUT/bench.md" LOG="$OUT/bench.log"
trap 'rm -f "$MD.tmp"' EXIT  # a report cut mid-write: never a fourth file
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
report() { $PY clear_gen/bench/report.py "$ROWS" "$MD" "clear-gen GPU bench (scripts/gpu_bench.sh)" || true; }
status() { printf '{"part": "%s", "status": "%s"}\n' "$1" "$2" >>"$ROWS"; report; }

# 0. diffusers and torchao from .whl/ when the machine lacks them (the device tool's recipe: a --target folder,
#    kept in /tmp for a rerun on the same machine).
if ! $PY -c "import diffusers" 2>/dev/null; then
  if [ ! -d /tmp/site/diffusers ]; then
    timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { status wheels "failed: no diffusers and no usable wheel in .whl/ (see the script's top)"; exit 1; }
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null || true

if [ "${SMOKE:-0}" = 1 ]; then  # plumbing check on a CPU: small everything
  MODEL=(--device cpu --heads 2 --head-dim 32 --layers 2) BIG=512 CHECK=256,512 MID=256,384 SIZES=256,384,512
  IMAGE=(--res 512 --stages 256,512 --steps 5 --vae-channels 8) FP8=int8  # fp8dq needs CUDA
  FEW=2 CN_LAYERS=1  # fewer blocks than MODEL's: the summary reports the whole model's step
  VAE=(--device cpu --channels 8 --big 256 --small 128 --tile 64) VAE_S=(20 120)  # its part's MIN_S, MAX_S
else
  MODEL=(--layers 57) BIG=8192 CHECK=1024,4096 MID=2048,4096 SIZES=2048,4096,8192  # 24 heads x 128, bf16
  IMAGE=(--res 8192 --steps 5)  # the default recipe, 5 steps a stage: 1K first pass, then 4 steps at 8K
  FP8=fp8dq  # dynamic fp8 activations and weights: fp8 matmuls (compute capability 8.9+)
  FEW=6 CN_LAYERS=15  # FEW: blocks of the compile/fp8 steps (2 double + 4 single); a union ControlNet's 15
  VAE=(--device cuda --channels 128 --big 8192 --small 4096 --tile 1024) VAE_S=(200 280)  # FLUX.1's VAE
fi

# part NAME MIN_S MAX_S ARGS...: one `clear-gen bench`, rows appended to rows.jsonl as they land.
# run_part NAME MIN_S MAX_S COMMAND...: any command that appends its rows to rows.jsonl itself.
# Skipped when PARTS leaves it out or less than MIN_S of the budget is left; killed after MAX_S.
part() {
  local name=$1 min=$2 max=$3; shift 3
  run_part "$name" "$min" "$max" $PY -m clear_gen bench "$@" --jsonl "$ROWS" --label "$name" --markdown "$MD"
}
run_part() {
  local name=$1 min=$2 max=$3 limit rc; shift 3
  if [ -n "${PARTS:-}" ] && [[ ",$PARTS," != *",$name,"* ]]; then status "$name" "not selected (PARTS)"; return; fi
  if [ "$(left)" -lt "$min" ]; then status "$name" "skipped: $(left) s of the budget left, needs ${min} s"; return; fi
  limit=$(( $(left) < max ? $(left) : max ))
  [[ ",${PART_LIMITS:-}," =~ ,$name=([0-9]+), ]] && limit=${BASH_REMATCH[1]}
  echo "== $name (cap ${limit}s, $(left)s of the budget left)"
  status "$name" "running (cap ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status "$name" "done" ;;
    124|137) status "$name" "killed: cap of ${limit} s reached (rows measured before it are kept)" ;;
    *) status "$name" "failed: exit $rc (see bench.log)" ;;
  esac
}

# a-b. What runs, and whether CLEAR computes the right thing on this GPU.
part env 3 30 --what env "${MODEL[@]}"
part check 20 45 --what check --res "$CHECK" --dtype bf16 "${MODEL[@]}"
# c. The 8K step of the whole model: CLEAR measured, full attention composed (57 x the stock 8K attention op +
#    the CLEAR step less its own attention ops), not run: a stock 8K step is ~48 PFLOP, ~95 s on an H200.
part step-8k 40 75 --what step --res "$BIG" --measure composed --repeats 1 "${MODEL[@]}"
part step-8k-r8 30 60 --what step --res "$BIG" --variant r8 --measure composed --repeats 1 "${MODEL[@]}"
# d. A whole 8K image by generate's code path.
part image-8k 90 150 --what image "${IMAGE[@]}" "${MODEL[@]}"
# e. Whatever fits after (or a rerun): the text rows' tail, --compile, fp8dq.
part attention-8k 30 60 --what attention --res "$BIG" --variant r8 --repeats 3 "${MODEL[@]}"
part compile-8k 45 90 --what step --res "$BIG" --variant r8 --measure clear --compile --repeats 1 \
  "${MODEL[@]}" --layers "$FEW"
part fp8dq-8k 45 90 --what step --res "$BIG" --variant r8 --measure clear --compile --quantize "$FP8" \
  --repeats 1 "${MODEL[@]}" --layers "$FEW"
# f. FlashAttention-4 through flex (flex-fa4, opt-in) against flex's Triton kernel and gather, each checked.
part fa4-8k 60 180 --what attention --res "$BIG" --backend flex,flex-fa4,gather --repeats 3 "${MODEL[@]}"
# Reruns: the r = 8 image, a union ControlNet's 15 blocks at 8K (training-free CLEAR r = 8 against full
# attention, measured once), whole steps at 2K and 4K, the plan (CPU, seconds).
part image-8k-r8 90 150 --what image "${IMAGE[@]}" --variant r8 "${MODEL[@]}"
part controlnet-8k 60 150 --what step --res "$BIG" --window 8 --down-factor 1 --repeats 1 "${MODEL[@]}" \
  --layers "$CN_LAYERS"
part steps-2k-4k 60 150 --what step --res "$MID" --repeats 3 "${MODEL[@]}"
part plan 10 60 --what plan --res "$SIZES"
# f. Exact VAE tiling on the GPU: the 8K decode against the plan's memory model, exact against untiled at 4K.
run_part vae-8k "${VAE_S[@]}" $PY scripts/vae_tiling.py --bench "${VAE[@]}" --dtype bf16 --jsonl "$ROWS" --label vae-8k
echo "done in $(( $(date +%s) - START ))s; report in $MD"
