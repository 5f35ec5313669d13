#!/usr/bin/env bash
# One call on the GPU machine (the device tool): every GPU test, then the prediction's kernels
# and the whole call timed against SDPA-cuDNN. Writes log.txt and the benches' JSON under $OUT
# (a temp folder without it). Takes ~8 min on an H200.
#   bash scripts/gpu_check.sh [BEFORE_TREE [VARIANT_TREE]]
# BEFORE_TREE: a checkout of another commit (`git archive <rev> | tar -x -C <dir>`) whose
# prediction is timed in the same run (bench/fill_cost.py in each tree), for a same-run ratio.
# VARIANT_TREE: a copy of this tree with one setting changed (e.g. reference_predict.LSE_KEY_STRIDE
# = 2, the guarded lse scores from half the keys) or a commit not in production (v42b: 9452af8):
# fill_cost, fill_check and realistic_bench run there too.
# PARTS (default "tests,predict,kernel,quality,variant") picks the parts (kernel: the attention
# kernel's variants at given masks, bench/kernel_variants.py): all of them take more than one
# device call (10 min), so split them, e.g. PARTS=tests,predict then PARTS=quality,variant.
# Two more, run first when named: "lse" (the scoring kernel's GPU test, then its default launch,
# its pointer-load twin and the guarded stride 2 timed in this tree, BEFORE_TREE and VARIANT_TREE;
# an empty BEFORE_TREE is skipped) and "cost" (fill_cost in BEFORE_TREE and this tree; "predict" is
# predict_tune plus this part), e.g. PARTS=lse,cost,quality,tests (~6 min on an H100: lse,cost 2,
# quality,tests 4).
# ("bench" is predict + quality.) Each step's log line says when it started (seconds).
# The node tests need a ComfyUI tree in .comfyui/ComfyUI (carry it to the device).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
L="$OUT/log.txt"
cd "$REPO"
PARTS="${PARTS:-tests,predict,kernel,quality,variant}"
PARTS="${PARTS//bench/predict,quality}"
PARTS="${PARTS//predict/predict,cost}"  # predict_tune, then fill_cost (the cost part)
part() { [[ ",$PARTS," == *",$1,"* ]]; }
step() { echo "== $* (at ${SECONDS}s)" | tee -a "$L"; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$L"
git log --oneline -1 2>/dev/null | tee -a "$L"
if part lse; then  # the scoring kernel alone, in this tree and the others given (predict_tune --quick)
  step tests/test_lse_gpu.py
  timeout 100 python3 tests/test_lse_gpu.py 2>&1 | grep -E "PASS|FAIL|Error" | tee -a "$L"
  i=0
  for tree in . "${1:-}" "${2:-}"; do
    [ -n "$tree" ] || continue
    i=$((i + 1)); mkdir -p "$OUT/lse_$i"
    step "predict_tune --quick block_lse in $tree"
    (cd "$tree/bench" && OUT="$OUT/lse_$i" timeout 100 python3 predict_tune.py --quick \
      --kernels block_lse,block_lse_nomean,block_lse_stride2_guard 2>&1 | tail -14) | tee -a "$L"
  done
fi
if part cost; then  # prediction + quantization and the kernel at the Balanced mask, BEFORE_TREE then this tree
  mkdir -p "$OUT/fill_cost" "$OUT/fill_cost_before"
  if [ -n "${1:-}" ]; then
    step "fill_cost in $1"
    (cd "$1/bench" && OUT="$OUT/fill_cost_before" timeout 150 python3 fill_cost.py 2>&1 | tail -12) | tee -a "$L"
  fi
  step "fill_cost"
  (cd bench && OUT="$OUT/fill_cost" timeout 150 python3 fill_cost.py 2>&1 | tail -16) | tee -a "$L"
fi
if part tests; then
for t in tests/test_quant_gpu.py tests/test_lse_gpu.py tests/test_launch_gpu.py; do
  step "$t"
  timeout 200 python3 "$t" 2>&1 | grep -E "PASS|FAIL|Error" | tee -a "$L"
done
for alloc in native async; do
  if [ $alloc = async ]; then export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync; else unset PYTORCH_CUDA_ALLOC_CONF; fi
  step "tests/test_call_graphs_gpu.py ($alloc)"
  timeout 200 python3 tests/test_call_graphs_gpu.py 2>&1 | grep -E "PASS|FAIL|Error|MiB" | tee -a "$L"
done
step "tests/comfy/test_nodes_gpu.py (async)"
timeout 250 python3 tests/comfy/test_nodes_gpu.py 2>&1 | grep -E "PASS|FAIL|Error|measured error" | tee -a "$L"
unset PYTORCH_CUDA_ALLOC_CONF
fi
if part predict; then
mkdir -p "$OUT/predict_tune"
step "predict_tune (the helpers with v34's row steps, and v31's comparison rows)"
(cd bench && OUT="$OUT/predict_tune" timeout 300 python3 predict_tune.py \
  --kernels quant_pool64,quant_pool128,quant_v,quant_v_unchecked,kv_stats,quant_pool128_sim,block_lse,block_lse_stride2,block_lse_stride2_guard 2>&1 \
  | tail -30) | tee -a "$L"
fi
if part kernel; then
  mkdir -p "$OUT/kernel_variants" "$OUT/kernel_variants_before"
  step "kernel_variants (v34: fp8 V in the MMA operand's order)"
  (cd bench && OUT="$OUT/kernel_variants" timeout 200 python3 kernel_variants.py --variants hopper 2>&1 \
    | tail -30) | tee -a "$L"
  if [ -n "${1:-}" ]; then
    step "kernel_variants in $1 (the kernel before v34)"
    (cd "$1/bench" && OUT="$OUT/kernel_variants_before" timeout 200 python3 kernel_variants.py --variants hopper 2>&1 \
      | tail -16) | tee -a "$L"
  fi
fi
if part quality; then
mkdir -p "$OUT/fill_check" "$OUT/realistic"
step "fill_check"
(cd bench && OUT="$OUT/fill_check" timeout 120 python3 fill_check.py 2>&1 | tail -8) | tee -a "$L"
step "realistic_bench (presets, rel-L1 0.05)"
(cd bench && OUT="$OUT/realistic" timeout 330 python3 realistic_bench.py --no-oracle --only "lse fill,preset" 2>&1 \
  | tail -40) | tee -a "$L"
fi
if part variant && [ -n "${2:-}" ]; then
  mkdir -p "$OUT/fill_cost_base" "$OUT/fill_cost_variant" "$OUT/realistic_variant"
  step "fill_cost (this tree, the variant's same-run base)"
  (cd bench && OUT="$OUT/fill_cost_base" timeout 150 python3 fill_cost.py 2>&1 | tail -12) | tee -a "$L"
  step "fill_cost in $2"
  (cd "$2/bench" && OUT="$OUT/fill_cost_variant" timeout 150 python3 fill_cost.py 2>&1 | tail -12) | tee -a "$L"
  mkdir -p "$OUT/fill_check_variant"
  step "fill_check in $2"
  (cd "$2/bench" && OUT="$OUT/fill_check_variant" timeout 120 python3 fill_check.py 2>&1 | tail -8) | tee -a "$L"
  step "realistic_bench in $2"
  (cd "$2/bench" && OUT="$OUT/realistic_variant" timeout 330 python3 realistic_bench.py --no-oracle \
    --only "lse fill,preset" 2>&1 | tail -40) | tee -a "$L"
fi
step "done"
echo "log and JSON in $OUT"
