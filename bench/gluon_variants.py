"""The Gluon attention prototypes (bench/gluon_attn.py) against the production kernel and
SDPA-cuDNN on the H200, at the Wan 480p and HunyuanVideo 544p shapes and densities 1.0-0.1.

Every time is a ratio to SDPA-cuDNN timed in the same run, in alternating pairs
(common.paired_ratio, as the goals are read: at the GPU's power limit a cuDNN figure taken once
drifts). Error columns: each Gluon variant against the production kernel's output on the same
mask (rounding-level, < 0.01, or FAIL), and at density 1.0 against cuDNN (the quantization error,
~0.04 for production).

Each Gluon variant first runs a small smoke test in a child process with a time limit (all at once): a wrong
mbarrier phase hangs the GPU, and a hang there costs one child, not the whole run. A variant
that fails to compile, launch, finish or match production there is reported and left out of the
timed run (its numbers are still printed).

    cd bench && python3 gluon_variants.py [--shapes wan480,hunyuan544] [--variants pipe,ws]
"""
import argparse
import datetime
import json
import math
import traceback

import torch
import triton

from common import SHAPES, paired_ratio, random_block_mask, run_smoke_children, save, sdpa_cudnn, text_tail
from devkit.metrics import rel_l1
from gpu_check import prepare
from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
from sparge_attention.kernels.config import KernelConfig
from sparge_attention.kernels.fp8 import v_in_key_order
from sparge_attention.sparge_core import SpargeBlockMask

import gluon_attn

HOPPER = KernelConfig(64, 128, 4, 3, pv_fp8=True, tma=True, maxnreg=168)  # kernel_variants.py's "hopper"
TOL = 0.01  # vs production on one mask: only accumulation order and rounding differ
SMOKE_TIMEOUT_S = 120


def production_fn(prep, bmask, N, D):
    qi, ki, vt, qs, ks, vs = prep
    pvt = torch.full((qi.shape[1],), math.inf, device=qi.device)
    return lambda: sparse_attn_fwd(qi, ki, vt, qs, ks, vs, bmask.kv_num_blocks, bmask.kv_indices, pvt,
                                   N, N, D, torch.bfloat16, False, False, HOPPER)[0]


def gluon_fn(prep, bmask, N, D, name):
    qi, ki, vt, qs, ks, vs = prep
    # the prototypes multiply P in the tile's column order: V^T back in key order (production's
    # fp8 V^T holds each 32-key group in the MMA operand's order since v34, kernels/fp8.py)
    vt = v_in_key_order(vt).contiguous()
    return lambda: gluon_attn.gluon_sparse_attn_fwd(qi, ki, vt, qs, ks, vs, bmask.kv_num_blocks, bmask.kv_indices,
                                                    N, N, D, torch.bfloat16, **gluon_attn.VARIANTS[name])


SMOKE_CASES = ("1.0", "0.5", "uneven")


def uneven_block_mask(B, H, nq, nk, device, seed=2):
    """Every query block keeps its own random number of key blocks, 0 to all: lists of unequal
    length side by side (a ping-pong consumer then passes turns for the other) and empty lists."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = torch.rand(B, H, nq, nk, generator=g, device=device).argsort(-1).argsort(-1)
    keep = torch.randint(0, nk + 1, (B, H, nq, 1), generator=g, device=device)
    return rank < keep


def smoke(name: str):
    """Child process: one small problem (a partial last key block, 2 heads, an odd count of query
    blocks; dense, half-dense and uneven masks) through the variant and production; prints one
    JSON line."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 3000, 128
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    prep = prepare(q, k, v, 64, 128)
    res = {"variant": name}
    nq, nk = triton.cdiv(N, 64), triton.cdiv(N, 128)
    for case in SMOKE_CASES:
        mask = (uneven_block_mask(B, H, nq, nk, dev) if case == "uneven"
                else random_block_mask(B, H, nq, nk, float(case), dev, seed=1))
        bmask = SpargeBlockMask.from_dense(mask, 64, 128, N, N)
        ref = production_fn(prep, bmask, N, D)()
        out = gluon_fn(prep, bmask, N, D, name)()
        torch.cuda.synchronize()
        res[f"l1_vs_production_{case}"] = rel_l1(out, ref)
        res[f"nan_{case}"] = bool(torch.isnan(out).any())
    k_ = gluon_attn.COMPILED.get(name)
    if k_ is not None:
        res.update(n_regs=k_.n_regs, n_spills=k_.n_spills, shared=k_.metadata.shared)
    print(json.dumps(res), flush=True)


def run_smokes(names) -> dict:
    """The smoke tests of all variants, each in a child process of its own, run at once."""
    return run_smoke_children(__file__, names, SMOKE_TIMEOUT_S)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--variants", default=",".join(gluon_attn.VARIANTS))
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--smoke", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        return smoke(args.smoke)
    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "smoke": {}, "shapes": {}}
    names = []
    res["smoke"] = run_smokes(args.variants.split(","))
    for name, s in res["smoke"].items():
        ok = "error" not in s and all(not s[f"nan_{c}"] and s[f"l1_vs_production_{c}"] < TOL for c in SMOKE_CASES)
        print(f"smoke {name}: " + ("OK " if ok else "FAILED ") + json.dumps({key: val for key, val in s.items() if key != "error"}))
        if "error" in s:
            print("  " + s["error"].replace("\n", "\n  "))
        if ok:
            names.append(name)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        B, H, N, D, _, _ = SHAPES[shape]
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        cudnn = lambda: sdpa_cudnn(q, k, v)  # noqa: E731  (each row times its own cuDNN pairs)
        ref = cudnn()
        prep = prepare(q, k, v, 64, 128)
        r = res["shapes"][shape] = {"rows": []}
        nq, nk = triton.cdiv(N, 64), triton.cdiv(N, 128)
        for dens in map(float, args.densities.split(",")):
            bmask = SpargeBlockMask.from_dense(random_block_mask(B, H, nq, nk, dens, dev, seed=1), 64, 128, N, N)
            prod = production_fn(prep, bmask, N, D)
            base = prod()
            fns = [("production", prod)] + [(n, gluon_fn(prep, bmask, N, D, n)) for n in names]
            for name, fn in fns:
                row = dict(shape=shape, density=dens, variant=name)
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    row["l1_vs_production"] = rel_l1(out, base)
                    row["l1_vs_cudnn"] = rel_l1(out, ref) if dens == 1.0 else float("nan")
                    row["nan"] = bool(torch.isnan(out).any())
                    row["ok"] = name == "production" or (row["l1_vs_production"] < TOL and not row["nan"])
                    del out
                    row["x_cudnn"], row["ms"], row["cudnn_ms"] = paired_ratio(fn, cudnn)
                except Exception:  # a variant that fails to compile or launch is a result too
                    row.update(ok=False, error=text_tail(traceback.format_exc()))
                    print(f"{shape} {dens} {name} raised:\n  " + row["error"].replace("\n", "\n  "))
                r["rows"].append(row)
                rows.append(row)
        q = k = v = ref = prep = None  # free the shape's tensors before the next one
        torch.cuda.empty_cache()
    path = save(res, "gluon_variants")
    print(f"\n{res['card']}  torch {res['torch']}  triton {res['triton']}  ({path})")
    print(f"{'shape':<11} {'dens':>5} {'variant':<12} {'ms':>8} {'x cuDNN':>8} {'L1 vs prod':>10} {'L1 vs cuDNN':>11}")
    for w in rows:
        if "error" in w:
            print(f"{w['shape']:<11} {w['density']:>5.2f} {w['variant']:<12} {'raised':>8}")
            continue
        flag = "" if w["ok"] else "  FAIL" + (" NaN" if w["nan"] else "")
        print(f"{w['shape']:<11} {w['density']:>5.2f} {w['variant']:<12} {w['ms']:>8.3f} {w['x_cudnn']:>8.3f} "
              f"{w['l1_vs_production']:>10.4f} {w['l1_vs_cudnn']:>11.4f}{flag}")


if __name__ == "__main__":
    main()
