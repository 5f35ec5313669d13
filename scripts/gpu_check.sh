#!/usr/bin/env bash
# One call on the GPU machine (the device tool): every GPU test, then the prediction's kernels
# and the whole call timed against SDPA-cuDNN. Writes log.txt and the benches' JSON under $OUT
# (a temp folder without it). Takes ~8 min on an H200.
#   bash scripts/gpu_check.sh [BEFORE_TREE]
# BEFORE_TREE: a checkout of another commit (`git archive <rev> | tar -x -C <dir>`) whose
# prediction is timed in the same run (bench/fill_cost.py in each tree), for a same-run ratio.
# The node tests need a ComfyUI tree in .comfyui/ComfyUI (carry it to the device).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d)}"
L="$OUT/log.txt"
cd "$REPO"
step() { echo "== $*" | tee -a "$L"; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$L"
git log --oneline -1 2>/dev/null | tee -a "$L"
for t in tests/test_quant_gpu.py tests/test_launch_gpu.py; do
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
mkdir -p "$OUT/predict_tune" "$OUT/fill_cost" "$OUT/fill_cost_before" "$OUT/fill_check" "$OUT/realistic"
step "predict_tune (the helpers, and v31's comparison rows)"
(cd bench && OUT="$OUT/predict_tune" timeout 300 python3 predict_tune.py \
  --kernels kv_stats,kv_stats_fullv,quant_v,quant_v_unchecked,block_lse,block_lse_stride2 2>&1 \
  | tail -20) | tee -a "$L"
if [ -n "${1:-}" ]; then
  step "fill_cost in $1"
  (cd "$1/bench" && OUT="$OUT/fill_cost_before" timeout 150 python3 fill_cost.py 2>&1 | tail -12) | tee -a "$L"
fi
step "fill_cost"
(cd bench && OUT="$OUT/fill_cost" timeout 150 python3 fill_cost.py 2>&1 | tail -12) | tee -a "$L"
step "fill_check"
(cd bench && OUT="$OUT/fill_check" timeout 120 python3 fill_check.py 2>&1 | tail -8) | tee -a "$L"
step "realistic_bench (presets, rel-L1 0.05)"
(cd bench && OUT="$OUT/realistic" timeout 330 python3 realistic_bench.py --no-oracle --only "lse fill,preset" 2>&1 \
  | tail -40) | tee -a "$L"
echo "log and JSON in $OUT"
