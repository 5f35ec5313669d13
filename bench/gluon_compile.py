"""Compile the Gluon attention prototypes (bench/gluon_attn.py) for sm_90 without a GPU and print
the facts that say whether the overlap is there: registers, spills, shared memory, and in the SASS
the wgmma (HGMMA/IGMMA/QGMMA) instructions and their waits (WARPGROUP.DEPBAR, WARPGROUP.ARRIVE)
in order with the MUFU.EX2 of the softmax. In the main loop the int8 IGMMAs of S_{j+1} should be
issued before the block's MUFU.EX2 run and their wait (WARPGROUP.DEPBAR) come after them.

Needs Triton 3.6 (the device's; Gluon's API moves between versions), TRITON_INTERPRET unset. On
the dev box (Triton 3.8 in .venv) put a PyPI Triton 3.6 ahead of it:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install --no-deps triton==3.6.0
    cd bench && PYTHONPATH=/tmp/t36/lib/python3.11/site-packages ../.venv/bin/python gluon_compile.py [--sass]
    # --sass: also dump the SASS files
"""
import argparse
import os
import re
import sys
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # devkit
sys.path.insert(0, str(HERE))  # gluon_attn

import torch  # noqa: E402

from devkit.cross_compile import compile_through, cubin_resources, use_target  # noqa: E402

# shapes of one compile: Wan 480p's key count (a partial last block), 2 heads
B, H, N, D = 1, 2, 32760, 128


def launch(ga, variant):
    nq, nk = -(-N // 64), -(-N // 128)

    def x(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype)

    return lambda: ga.gluon_sparse_attn_fwd(
        x(B, H, nq * 64, D, dtype=torch.int8), x(B, H, nk * 128, D, dtype=torch.int8),
        x(B, H, D, nk * 128, dtype=torch.float8_e4m3fn), x(B, H, nq), x(B, H, nk), x(B, H, D),
        x(B, H, nq, dtype=torch.int32), x(B, H, nq, nk, dtype=torch.int32), N, N, D, torch.bfloat16,
        **ga.VARIANTS[variant])


KEY = re.compile(r"(HGMMA|IGMMA|QGMMA|WARPGROUP\.DEPBAR|WARPGROUP\.ARRIVE|MUFU\.EX2|SYNCS\.[A-Z.]+|UTMALDG|BAR\.\w+|BRA)")


def sass_events(sass: str):
    """(line number, event, count) for the instructions that show the overlap, in code order; a
    run of equal events is folded into one entry with a count."""
    out = []
    for n, line in enumerate(sass.splitlines()):
        m = KEY.search(line)
        if not m:
            continue
        ev = m.group(1)
        if ev.endswith("GMMA"):  # with its shape: IGMMA.64x128x32
            ev += "." + line[m.end():].lstrip(".").split(".")[0].split()[0]
        if out and out[-1][1] == ev:
            out[-1][2] += 1
        else:
            out.append([n, ev, 1])
    return out


def report_compile(name, kw, jit_fn, launch_fn, patterns, sass_path=None):
    """Compile jit_fn through launch_fn for the target in use and print its resources, the counts
    of the (label, regex) patterns in its SASS and the SASS's overlap events in code order; write
    the SASS to sass_path if given. Returns the SASS, or None where it does not compile (printed:
    a variant that does not compile is a result too)."""
    try:
        k = compile_through(jit_fn, launch_fn)
    except Exception:
        print(f"\n== {name}: COMPILE FAILED")
        traceback.print_exc(limit=-4)
        return None
    sass = k.asm["sass"]
    if sass_path:
        Path(sass_path).write_text(sass)
    counts = {key: len(re.findall(pat, sass)) for key, pat in patterns}
    print(f"\n== {name} ({kw}): {cubin_resources(k.asm['cubin'])}, {k.metadata.shared} B shared memory (dynamic), "
          f"{k.metadata.num_warps} warps")
    print("   " + ", ".join(f"{a}: {b}" for a, b in counts.items()))
    print("   code order (line: event x count):")
    print("   " + "  ".join(f"{n}:{ev}x{c}" for n, ev, c in sass_events(sass)))
    return sass

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", action="store_true", help="write each variant's SASS to /tmp/gluon_<variant>.sass")
    ap.add_argument("--variants", default=None, help="comma-separated VARIANTS names (default: all)")
    args = ap.parse_args()
    use_target(90)
    import triton

    import gluon_attn as ga

    print(f"triton {triton.__version__}, target sm_90")
    patterns = [("wgmma int8 (IGMMA)", r"\bIGMMA\b"), ("wgmma fp8 (QGMMA)", r"\bQGMMA\b"),
                ("WARPGROUP.ARRIVE", r"WARPGROUP\.ARRIVE"), ("WARPGROUP.DEPBAR", r"WARPGROUP\.DEPBAR"),
                ("MUFU.EX2", r"MUFU\.EX2"), ("local ld/st (spill)", r"\b(?:LDL|STL)\b")]
    for variant, kw in ga.VARIANTS.items():
        if args.variants and variant not in args.variants.split(","):
            continue
        report_compile(variant, kw, ga.KERNELS[kw["variant"]], launch(ga, variant), patterns,
                       f"/tmp/gluon_{variant}.sass" if args.sass else None)

if __name__ == "__main__":
    main()
