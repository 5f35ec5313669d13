"""A/B of the attention kernel's compile-time variants at given block masks, in one process.

Each variant is a KernelConfig (kernels/config.py: tile shape, warps, stages, tma, maxnreg) given to
the launcher. Every row is a ratio to SDPA-cuDNN timed in the same run, two ways: `x_cudnn`, each
timed alone (do_bench), cuDNN right before the row (one cuDNN figure from the run's start let the
same kernel on the same mask read 0.175 and 0.208 two rows apart, 2026-12-06), and `x_paired`, the
two alternating (common.paired_ratio). Alone, each runs at the clocks its own power draw allows;
alternating, both run at about one clock. On an H100 at its 700 W limit (2026-12-06) the kernel read
0.68-0.76 alone from row to row and 0.751 paired at density 1.0, Wan 480p; bench/power_draw.py
measured why: alone the ratio follows the energy per call (0.713 against 0.705), paired the clock
cycles (0.755 against 0.759). bench/goals.py takes the paired figure: stable, and the one a GPU
below its power limit sees. `ms` is the kernel timed alone. The first variant is timed twice so the
table shows the run's noise. Error columns compare each variant with the first one on the same mask
(should be rounding-level) and, with nothing skipped, with cuDNN (quantization error).

    python bench/kernel_variants.py [--shapes wan480,hunyuan544] [--variants hopper,no_cap,pointers] [--causal]
"""
import argparse
import dataclasses
import datetime
import math

import torch
import triton

from common import SHAPES, bench_ms, card_name, paired_ratio, random_block_mask, save, sdpa_cudnn
from devkit.metrics import rel_l1
from gpu_check import prepare
from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
from sparge_attention.kernels.config import KernelConfig
from sparge_attention.sparge_core import SpargeBlockMask
from sparge_attention.sparge_core.blockmask import causal_block_mask


def _cfg(block_m=64, block_n=128, num_warps=4, num_stages=3, **kw) -> KernelConfig:
    # pv_fp8: gpu_check.prepare quantizes V to fp8 (the launcher reads V's dtype, not this flag)
    return KernelConfig(block_m, block_n, num_warps, num_stages, pv_fp8=True, **kw)


VARIANTS = {  # the first of a run is the baseline of the error column
    "hopper": _cfg(tma=True, maxnreg=168),  # kernels/config.py's choice for sm90
    "hopper_s4": _cfg(tma=True, maxnreg=168, num_stages=4),
    "no_cap": _cfg(tma=True),  # 2 programs per SM (198 registers)
    "pointers": _cfg(tma=False, maxnreg=168),  # cp.async loads, as on pre-Hopper GPUs
    "s2": _cfg(tma=True, maxnreg=168, num_stages=2),
    "pointers_no_cap": _cfg(tma=False),
    "128x128w8": _cfg(tma=True, block_m=128, num_warps=8),
    "128x64w8r128": _cfg(tma=True, block_m=128, block_n=64, num_warps=8, maxnreg=128),
    "64x64r128": _cfg(tma=True, block_n=64, maxnreg=128),
}


def run_variant(prep, bmask, N, D, cfg, causal=False):
    qi, ki, vt, qs, ks, vs = prep
    pvt = torch.full((qi.shape[1],), math.inf, device=qi.device)
    return lambda: sparse_attn_fwd(qi, ki, vt, qs, ks, vs, bmask.kv_num_blocks, bmask.kv_indices, pvt,
                                   N, N, D, torch.bfloat16, causal, False, cfg)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--tag", default="variants")
    # causal masking (no P.V skip): at 3 stages Hopper's causal kernel keeps 3-deep K/V buffers (106.6 KB
    # of shared memory, two programs per SM), so production runs it at 2 (the s2 variant; NOTES v59).
    # The masks keep no block past the diagonal (the density is of the blocks below it), and cuDNN
    # is timed causal too
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    names = args.variants.split(",")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "causal": args.causal, "variants": {n: dataclasses.asdict(VARIANTS[n]) for n in names}, "shapes": {}}
    rows = []
    for shape in args.shapes.split(","):
        B, H, N, D, _, _ = SHAPES[shape]
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        def dense():
            return sdpa_cudnn(q, k, v, is_causal=args.causal)
        t_cudnn = bench_ms(dense)
        ref = dense()
        r = res["shapes"][shape] = {"cudnn_ms": t_cudnn, "rows": []}  # at the start, for scale
        preps, masks = {}, {}
        for dens in map(float, args.densities.split(",")):
            first = None
            for i, name in enumerate(names + names[:1]):
                cfg = VARIANTS[name]
                bm, bn = cfg.block_m, cfg.block_n
                if (bm, bn) not in preps:
                    preps[(bm, bn)] = prepare(q, k, v, bm, bn)
                if (bm, bn, dens) not in masks:  # same seed: a 128-row mask is not the 64-row one
                    nq, nk = triton.cdiv(N, bm), triton.cdiv(N, bn)
                    dm = random_block_mask(B, H, nq, nk, dens, dev, seed=1)
                    if args.causal:  # as the selection leaves it: no block past the diagonal
                        dm &= causal_block_mask(nq, nk, bm, bn, N, N, dev)
                    masks[(bm, bn, dens)] = SpargeBlockMask.from_dense(dm, bm, bn, N, N)
                fn = run_variant(preps[(bm, bn)], masks[(bm, bn, dens)], N, D, cfg, args.causal)
                try:
                    out = fn()
                    torch.cuda.synchronize()
                except Exception as e:  # a variant that fails to compile is a result too
                    rows.append((shape, dens, name, float("nan"), float("nan"), float("nan"), f"failed: {str(e)[:80]}", ""))
                    continue
                if first is None:
                    first = out
                err_first = rel_l1(out, first)
                err_sdpa = rel_l1(out, ref) if dens == 1.0 else float("nan")
                bad = bool(torch.isnan(out).any())
                t_ref = bench_ms(dense)
                t = bench_ms(fn)
                x_pair, t_pair, t_ref_pair = paired_ratio(fn, dense)
                label = name + (" (again)" if i == len(names) else "")
                r["rows"].append(dict(density=dens, variant=label, ms=t, x_cudnn=t / t_ref, cudnn_ms=t_ref,
                                      x_paired=x_pair, ms_paired=t_pair, cudnn_ms_paired=t_ref_pair,
                                      l1_vs_first=err_first, l1_vs_sdpa=err_sdpa, nan=bad))
                rows.append((shape, dens, label, t, t / t_ref, x_pair, f"{err_first:.4f}",
                             f"{err_sdpa:.4f}" + (" NaN!" if bad else "")))
        del q, k, v, ref, preps, masks
        torch.cuda.empty_cache()
    path = save(res, f"{datetime.date.today().isoformat()}-{card_name()}-{args.tag}")
    print(f"\n{res['card']}  ({path})")
    print(f"{'shape':<11} {'dens':>5} {'variant':<16} {'ms':>8} {'x cuDNN':>8} {'paired':>7} {'L1 vs 1st':>9} "
          f"{'L1 vs SDPA':>10}")
    for s, d, n, t, x, xp, e1, e2 in rows:
        print(f"{s:<11} {d:>5.2f} {n:<16} {t:>8.3f} {x:>8.3f} {xp:>7.3f} {e1:>9} {e2:>10}")


if __name__ == "__main__":
    main()
