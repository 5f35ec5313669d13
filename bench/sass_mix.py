"""Which execution units a kernel's machine code leans on, before and after a change, without a GPU.

Compiles every Triton kernel of the pack for a target (devkit/cross_compile.py, Triton's own
ptxas on the CPU) from this checkout and from another revision, disassembles the cubin and counts
the SASS instructions by the unit they issue to, in the whole kernel and per trip of each inner
loop (a kernel's main loop: its time where the loop dominates). The count is static (instructions in the code,
not executed), so it predicts the direction of a change in a loop body, not its time. The classes
that matter on Hopper (CUDA Programming Guide, arithmetic instruction throughput, cc 9.0, per SM
per clock): conversions (I2F, F2I, FRND, F2F: 16) and MUFU (ex2, lg2, rcp: 16) against FP32
(FADD, FMUL, FFMA, FMNMX: 128) and integer ALU (64).

    python bench/sass_mix.py [--before HEAD] [--cc 90]
"""
import datetime
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # devkit (the child imports Triton itself, uninterpreted)
CLASSES = {  # opcode (before the first '.') -> class
    "conversion": ("I2F", "F2I", "FRND", "F2F", "I2I", "I2FP", "F2IP"),
    "mufu": ("MUFU",),
    "tensor": ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "GMMA"),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FCHK"),
}
# cuobjdump -sass (devkit.cross_compile.cuobjdump: every instruction, where Triton's kernel.asm["sass"]
# stops at 4,096): "/*<offset>*/  [@predicate] OPCODE.modifiers operands ;  /* <encoding> */"
INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)")  # offset, opcode, rest


def mix(sass: str) -> dict:
    ops = Counter()
    for line in sass.splitlines():
        m = INSTR.match(line)
        if m:
            ops[m.group(2)] += 1
    out = {c: sum(ops[o] for o in names) for c, names in CLASSES.items()}
    out["total"] = sum(ops.values())
    out["detail"] = {o: ops[o] for names in CLASSES.values() for o in names if ops[o]}
    return out


def inner_loops(sass: str, least: int = 50) -> list:
    """The loops of the code (a branch back to an earlier offset) that hold no other loop and at
    least `least` instructions, as the class mix of their bodies: what one trip costs, where a
    kernel's time is its main loop's (the scoring kernel's key blocks, the attention kernel's).
    Code inside a branch of the body is counted whether or not a trip runs it."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3), line)
           for line in sass.splitlines() if (m := INSTR.match(line))]
    spans = []
    for off, op, rest, _ in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if t and int(t.group(1), 16) < off:
            spans.append((int(t.group(1), 16), off))
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    out = []
    for a, b in inner:
        m = mix("\n".join(line for off, _, _, line in ins if a <= off <= b))
        if m["total"] >= least:
            out.append({c: m[c] for c in (*CLASSES, "total")})
    return out


def child(cc: int) -> None:
    """One JSON line per kernel variant of the pack first on sys.path (devkit.cross_compile)."""
    from devkit.cross_compile import compile_through, cubin_resources, cuobjdump, pack_kernel_jobs

    for jit_fn, variant, launch in pack_kernel_jobs(cc):
        kernel = compile_through(jit_fn, launch)
        cubin = kernel.asm["cubin"]
        use = cubin_resources(cubin)
        sass = cuobjdump(cubin, "-sass")
        print(json.dumps(dict(kernel=jit_fn.fn.__name__, variant=variant, **mix(sass), regs=use["regs"],
                              stack=use["stack"], loops=inner_loops(sass))), flush=True)


def main():
    from devkit.cross_compile import revision_compare

    res = revision_compare(__file__, child, "sparge-sass-mix-cache")
    if res is None:  # a --child run
        return
    cc, rev, before, after = res
    print(f"SASS instructions by unit, sm{cc}: {rev} (before) -> this checkout (static counts)")
    cols = (*CLASSES, "total", "regs", "stack")  # registers per thread, stack bytes (spills)
    print(f"{'kernel':<22} {'variant':<34} " + " ".join(f"{c:>17}" for c in cols))
    rows = []
    old = {(r["kernel"], r["variant"]): r for r in before}
    for a in after:
        b = old.get((a["kernel"], a["variant"]))  # None: a kernel the revision does not have
        rows.append(dict(kernel=a["kernel"], variant=a["variant"], before=b, after=a))
        cells = " ".join(f"{b[c] if b else '-':>7} -> {a[c]:<7}" for c in cols)
        # instructions per trip of each inner loop (the main loop's body), before -> after
        loops = "/".join(str(x["total"]) for x in (b or {}).get("loops", [])) or "-"
        loops += " -> " + "/".join(str(x["total"]) for x in a["loops"])
        print(f"{a['kernel']:<22} {a['variant']:<34} {cells}  loops {loops}")
    res = dict(date=datetime.date.today().isoformat(), cc=cc, before=rev, rows=rows,
               triton=__import__("triton").__version__)
    sys.path.insert(0, str(HERE))
    from common import save

    print("saved", save(res, f"{res['date']}-cpu-sass_mix-sm{cc}"))


if __name__ == "__main__":
    main()
