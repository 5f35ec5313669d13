#!/usr/bin/env bash
# One call on the GPU machine (the device tool): the call's kernels under Nsight Compute
# (bench/ncu_kernels.py), the report's raw and SASS pages exported as CSV and summarised into
# $OUT/<date>-H100-ncu-<TAG>.json / .log (pipes, L2 and DRAM, occupancy, stall reasons, the SASS
# lines where the first attention kernel's warps wait). ~70 s on an H100; the .ncu-rep (~30 MB)
# is deleted, as it is too large to come back.
#   TAG=v68 CARD=H100 bash scripts/ncu_kernels.sh
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
cd "$REPO/bench"
nvidia-smi --query-gpu=name --format=csv,noheader
ncu --version | tail -1
# the clocks left alone (the device's METHOD.md); the kernels are replayed per metric pass
timeout 420 ncu --clock-control none --profile-from-start off --set full --import-source no -f -o "$OUT/rep" \
  python3 ncu_kernels.py > "$OUT/ncu.log" 2>&1 || { tail -20 "$OUT/ncu.log"; exit 1; }
ncu --import "$OUT/rep.ncu-rep" --page raw --csv > "$OUT/raw.csv"
ncu --import "$OUT/rep.ncu-rep" --page source --csv --print-source sass --kernel-name regex:sparse_attn \
  --launch-count 1 > "$OUT/sass_attn.csv"
rm -f "$OUT/rep.ncu-rep"
OUT="$OUT" python3 ncu_kernels.py --summarize "$OUT" --card "${CARD:-H100}" --tag "${TAG:-v68}"
