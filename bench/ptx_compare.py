"""Did a source change alter the attention kernel's machine code? Compiles `_sparse_attn_fwd` for a
GPU target on this machine (no GPU needed: devkit/cross_compile.py) from this checkout and from
another revision, in all 16 variants (fill, causal, P.V skip, output permutation; lse off), and
compares their PTX with parameter indices, register numbers and labels abstracted and the lines
sorted: "same code" means the same instructions on the same operand kinds, in any order (ptxas
schedules them anyway), so a change that only adds parameters the variant never reads shows as
"same code" with more parameters.

    python bench/ptx_compare.py --before 8c015cf^ [--cc 90]
"""
import datetime
import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # devkit (the child imports Triton itself, uninterpreted)
VARIANTS = [dict(fill=f, causal=c, pv_skip=p, perm=m) for f in (False, True) for c in (False, True)
            for p in (False, True) for m in (False, True)]


def normalized(ptx: str) -> dict:
    """Digest of the kernel body's instruction multiset, its instruction and parameter counts."""
    body = ptx[ptx.index(".visible .entry"):]
    body = body[:body.index(".section")] if ".section" in body else body
    lines = []
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".loc", ".file", ".param", "$L")):
            continue
        s = re.sub(r"_param_\d+", "_param", s)
        s = re.sub(r"%(r|rd|f|p|rs|h|hh|fd)\d+", r"%\1", s)
        lines.append(re.sub(r"\$L__BB\d+_\d+", "L", s))
    instr = [s for s in lines if not s.startswith((".", "{", "}"))]
    return dict(code=hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()[:16], instructions=len(instr),
                params=ptx.count(".param ."))


def child(cc: int) -> None:
    """Print one JSON line per variant for the kernels first on sys.path (devkit.cross_compile)."""
    from devkit.cross_compile import attention_launch, compile_through
    from kernels import attn_fwd
    from kernels.config import config_for_capability

    cfg = config_for_capability(cc // 10, cc % 10)
    for v in VARIANTS:
        kernel = compile_through(attn_fwd._sparse_attn_fwd, attention_launch(cfg, **v))
        print(json.dumps(dict(v, shared=kernel.metadata.shared, **normalized(kernel.asm["ptx"]))), flush=True)


def main():
    from devkit.cross_compile import revision_compare

    res = revision_compare(__file__, child, "sparge-ptx-compare-cache")
    if res is None:  # a --child run
        return
    cc, rev, before, after = res
    rows, same = [], 0
    print(f"_sparse_attn_fwd for sm{cc}: {rev} (before) vs this checkout")
    for b, a in zip(before, after):
        name = " ".join(f"{k}={int(b[k])}" for k in ("fill", "causal", "pv_skip", "perm"))
        eq = b["code"] == a["code"] and b["shared"] == a["shared"]
        same += eq
        rows.append(dict(variant=name, same_code=eq, before=b, after=a))
        print(f"  {name}: {'same code' if eq else 'DIFFERENT'}; instructions {b['instructions']} -> "
              f"{a['instructions']}, params {b['params']} -> {a['params']}, shared {b['shared']} -> {a['shared']}")
    print(f"{same} of {len(rows)} variants compile to the same code")
    res = dict(date=datetime.date.today().isoformat(), cc=cc, before=rev, rows=rows, same=same,
               triton=__import__("triton").__version__)
    sys.path.insert(0, str(HERE))
    from common import save

    print("saved", save(res, f"{res['date']}-cpu-ptx_compare-sm{cc}"))


if __name__ == "__main__":
    main()
