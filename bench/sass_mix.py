"""Which execution units a kernel's machine code leans on, before and after a change, without a GPU.

Compiles every Triton kernel of the pack for a target (devkit/cross_compile.py, Triton's own
ptxas on the CPU) from this checkout and from another revision, disassembles the cubin and counts
the SASS instructions by the unit they issue to. The count is static (instructions in the code,
not executed), so it predicts the direction of a change in a loop body, not its time. The classes
that matter on Hopper (CUDA Programming Guide, arithmetic instruction throughput, cc 9.0, per SM
per clock): conversions (I2F, F2I, FRND, F2F: 16) and MUFU (ex2, lg2, rcp: 16) against FP32
(FADD, FMUL, FFMA, FMNMX: 128) and integer ALU (64).

    python bench/sass_mix.py [--before HEAD] [--cc 90]
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLASSES = {  # opcode (before the first '.') -> class
    "conversion": ("I2F", "F2I", "FRND", "F2F", "I2I", "I2FP", "F2IP"),
    "mufu": ("MUFU",),
    "tensor": ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "GMMA"),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK"),
}
# Triton's disassembly: "<control bits>\t[@predicate] OPCODE.modifiers operands;"
OPCODE = re.compile(r"^[^\t]*\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def mix(sass: str) -> dict:
    ops = Counter()
    for line in sass.splitlines():
        m = OPCODE.match(line)
        if m:
            ops[m.group(1)] += 1
    out = {c: sum(ops[o] for o in names) for c, names in CLASSES.items()}
    out["total"] = sum(ops.values())
    out["detail"] = {o: ops[o] for names in CLASSES.values() for o in names if ops[o]}
    return out


def child(src_root: str, cc: int) -> None:
    """One JSON line per kernel variant of the pack in src_root."""
    import importlib.util

    os.environ.pop("TRITON_INTERPRET", None)
    spec = importlib.util.spec_from_file_location("cross_compile", ROOT / "devkit" / "cross_compile.py")
    cross = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross)
    sys.path.insert(0, src_root)
    cross.use_target(cc)
    for jit_fn, variant, launch in cross.pack_kernel_jobs(cc):
        kernel = cross.compile_through(jit_fn, launch)
        print(json.dumps(dict(kernel=jit_fn.fn.__name__, variant=variant, **mix(kernel.asm["sass"]))), flush=True)


def compile_at(src_root: str, cc: int) -> list:
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tempfile.gettempdir(), "sparge-sass-mix-cache"))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, __file__, "--child", src_root, "--cc", str(cc)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="HEAD", help="the revision to compare this checkout with")
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.cc)
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", old, args.before], check=True)
        try:
            rev = subprocess.run(["git", "-C", old, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
            before, after = compile_at(old, args.cc), compile_at(str(ROOT), args.cc)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", old], check=False)
    print(f"SASS instructions by unit, sm{args.cc}: {rev} (before) -> this checkout (static counts)")
    print(f"{'kernel':<22} {'variant':<34} " + " ".join(f"{c:>17}" for c in (*CLASSES, "total")))
    rows = []
    for b, a in zip(before, after):
        rows.append(dict(kernel=b["kernel"], variant=b["variant"], before=b, after=a))
        cells = " ".join(f"{b[c]:>7} -> {a[c]:<7}" for c in (*CLASSES, "total"))
        print(f"{b['kernel']:<22} {b['variant']:<34} {cells}")
    res = dict(date=datetime.date.today().isoformat(), cc=args.cc, before=rev, rows=rows,
               triton=__import__("triton").__version__)
    sys.path.insert(0, str(HERE))
    from common import save

    print("saved", save(res, f"{res['date']}-cpu-sass_mix-sm{args.cc}"))


if __name__ == "__main__":
    main()
