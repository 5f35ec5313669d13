#!/usr/bin/env bash
# Sparge Attention demo: set up what is missing (scripts/setup.sh), then run a tiny Wan 2.1 graph
# through the Sparge Attention node on a real ComfyUI 0.3.75 (CPU, no GPU, no model downloads) and
# print the node's readout. Extra arguments go to scripts/demo.py (--help).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
