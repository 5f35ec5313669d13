#!/usr/bin/env bash
# The test command: sets up what is missing (scripts/setup.sh), then runs every CPU test:
# the reference and the Triton kernels (TRITON_INTERPRET), the node pack on a real ComfyUI
# server, and the graph editor in a real headless Chromium.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider --timeout=900 "$@"
