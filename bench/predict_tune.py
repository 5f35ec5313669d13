"""Launch shapes of the prediction and quantization kernels (issue 14): each helper kernel timed
alone (GPU time, graph replay) over its launch shapes at the sizes users run, every variant's
outputs checked against the current default's, and the best printed next to the default. The
chosen shapes go into kernels/config.py's _HELPERS; bench/fill_cost.py then times the whole
prediction with them.

    python bench/predict_tune.py [--shapes wan480,hunyuan544] [--kernels block_lse,kv_stats] [--quick]
"""
import argparse
import datetime
import itertools
import math

import torch

from common import SHAPES, bench_graph_ms, card_name, realistic_text_tokens, save
from devkit.realistic_inputs import make_video_qkv
from sparge_attention.kernels.fill_pass import FILL_PAD
from sparge_attention.kernels.block_scores import block_lse_scores
from sparge_attention.kernels.config import BLOCK_M, BLOCK_N, Launch, helper_launch
from sparge_attention.kernels.host_math import cdiv
from sparge_attention.kernels.kv_stats import kv_stats
from sparge_attention.kernels.quantize import quant_pool
from sparge_attention.kernels.quantize_v import quant_v
from sparge_attention.kernels.select import select_blocks_fused
from sparge_attention.sparge_core.hilbert import TokenPermutation
from sparge_attention.sparge_core.reference_quant import FP8_MAX, KMEAN_SAMPLE, LOG2E, V_HEADROOM
from sparge_attention.sparge_core.triton_call import key_lse_sampling, key_quant_outputs


HD = 128  # the head dim the kernels run (the shapes' D, padded)


def grids(quick: bool) -> dict:
    """kernel name -> the Launch shapes to try."""
    g = {
        # v34: token rows per step (0: the whole block; fewer keep fewer values live per thread: a whole
        # 128-row tile compiled to 253-255 registers for K, and spilled for V with its overflow check)
        # v53: register caps for more programs per SM (sm_90: Q 96 registers at 4 warps, 80 -> 6 programs
        # with 56 B of spills; K 165 -> 3 programs, 8 warps at 80 -> 3 of 8 warps with 32 B; V 229 at
        # 2 warps -> 4 programs, 168 -> 6 with 120 B)
        "quant_pool64": [Launch(num_warps=n, block=b) for n, b in itertools.product((2, 4, 8), (0, 32, 16))]
        + [Launch(maxnreg=80), Launch(maxnreg=64)],
        "quant_pool128": [Launch(num_warps=n, block=b) for n, b in itertools.product((2, 4, 8), (0, 64, 32, 16))]
        + [Launch(maxnreg=128), Launch(num_warps=8, maxnreg=80)],
        "quant_v": [Launch(num_warps=n, block=b) for n, b in itertools.product((2, 4, 8), (0, 64, 32, 16))]
        + [Launch(num_warps=2, block=64, maxnreg=r) for r in (168, 128)] + [Launch(num_warps=4, maxnreg=128)],
        # v57: fewer programs (one wave at 96 registers, 5 per SM) with the sampled runs' loads ahead
        "kv_stats": [Launch(num_warps=4, num_stages=s, block=b, programs=p)
                     for b, s, p in itertools.product((32, 64), (1, 3), (128, 256, 512, 1024))],
        # v24: register caps for 4 programs per SM (128; with 2 stages, as 3 stages' shared memory fits
        # only 3; slower, the grid has it no more) and result-tile widths (two key blocks per dot, measured
        # slower, is in NOTES v24);
        # v39: the keys by TMA or by pointers (--quick: the default shape and the same with pointers)
        # v60: at stride 4 (v56) the keys come by pointers (TMA is for stride 1), 32 a block: more
        # pooled queries per key tile (128 rows, 4 or 8 warps), wider result tiles, other program counts
        "block_lse": [Launch(num_warps=4, num_stages=s, block=64, programs=256, maxnreg=r, tile=t, tma=m)
                      for s, r, t, m in itertools.product((3, 2), (168, None), (32, 16), (True, False))]
        + [Launch(num_warps=w, num_stages=s, block=b, programs=256, maxnreg=168, tile=t, tma=True)
           for (b, w), s, t in itertools.product(((128, 4), (128, 8), (64, 2)), (3, 2), (32, 64))]
        + [Launch(num_warps=4, num_stages=3, block=64, programs=p, maxnreg=168, tile=t, tma=True)
           for p, t in ((128, 32), (512, 32), (1024, 32), (256, 64))]
        + [Launch(num_warps=w, num_stages=s, block=b, programs=256, maxnreg=128, tile=32, tma=True)
           for (b, w), s in itertools.product(((128, 8), (64, 4)), (3, 2))]
        + [Launch(num_warps=2, num_stages=s, block=64, programs=256, maxnreg=r, tile=32, tma=True)
           for s, r in itertools.product((3, 4), (168, 128, 96, None))]
        + [Launch(num_warps=4, num_stages=s, block=64, programs=256, maxnreg=r, tile=32, tma=True)
           for s, r in itertools.product((3, 4), (128, 112, 96))],
        "select": [Launch(num_warps=n) for n in (1, 2, 4, 8)],
        "block_lse_nomean": [],  # the default shape only: what the fill_skipped mean scores cost
        # the default shape only, for comparison: v31's V stats before (all of V read for its max,
        # no overflow check in quant_v), and the lse scores from half the keys
        "kv_stats_fullv": [],
        "block_lse_every_key": [],
        "quant_v_unchecked": [],
        # K's quantizer as every key needs it (no self-similarity, no top keys: before v55), and
        # with v40's cosine self-similarity (its whole tile spilled on sm_90)
        "quant_pool128_nosim": [],
        "quant_pool128_cosine": [Launch(num_warps=n, block=b) for n, b in itertools.product((4, 8), (0, 64))],
        # v37: what the quantizers' bytes cost elsewhere. The same kernels in token order (no Hilbert
        # gather through perm), and torch's own passes over V: a cast to fp8 (V's bytes in and out,
        # contiguous) and the gather of V's rows by perm (bf16 in and out)
        "quant_v_noperm": [],
        "quant_pool128_noperm": [],
        "torch_cast_fp8": [],
        "torch_gather": [],
    }
    if quick:
        g = {k: v[:2] for k, v in g.items()}
    return g


# comparison rows -> the kernel whose launch shape they take
ALIASES = {"block_lse_nomean": "block_lse", "kv_stats_fullv": "kv_stats", "quant_v_unchecked": "quant_v",
           "block_lse_every_key": "block_lse", "quant_pool128_nosim": "quant_pool128",
           "quant_pool128_cosine": "quant_pool128",
           "quant_v_noperm": "quant_v", "quant_pool128_noperm": "quant_pool128", "torch_cast_fp8": "quant_v",
           "torch_gather": "quant_v"}


# K's quantizer as prepare_sparse runs it for the lse scores (mean added per call)
K_KW = key_quant_outputs(predict=True, lse=True)


def prediction_inputs(q, k, v, perm, scale, n_k):
    """What prepare_sparse gives the prediction kernels: (nkc, k_mean, v_scale, q_pool, and K's
    quant_pool outputs: int8 keys, scales, pooled (None), self-similarity, (int8 mean keys, their
    scales), top keys)."""
    nkc = cdiv(cdiv(n_k, BLOCK_N), FILL_PAD) * FILL_PAD
    k_mean, v_scale = kv_stats(k, v, v_format_max=FP8_MAX, k_sample=KMEAN_SAMPLE, perm=perm, v_headroom=V_HEADROOM)
    q_pool = quant_pool(q, BLOCK_M, HD, extra_scale=scale * LOG2E, want_pool=True, want_sim=False, perm=perm)[2]
    k_out = quant_pool(k, BLOCK_N, HD, mean=k_mean, **K_KW, perm=perm, pool_i8_blocks=nkc)
    return nkc, k_mean, v_scale, q_pool, k_out


def runners(q, k, v, perm, scale, n_k):
    """kernel name -> fn(launch) returning the kernel's outputs, on the inputs prepare_sparse gives it."""
    hd = HD
    nkc, k_mean, v_scale, q_pool, k_out = prediction_inputs(q, k, v, perm, scale, n_k)
    k_i8, k_s, kbar = k_out[0], k_out[1], k_out[4]
    sampling = key_lse_sampling(k_out)  # as prepare_sparse passes them
    lse_kw = dict(kbar=kbar, **sampling)
    scores, mean = block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, want_mean=True, **lse_kw)
    minshare = torch.full((q.shape[1],), 1.5, device=q.device)  # Balanced
    return {
        "quant_pool64": lambda L: quant_pool(q, BLOCK_M, hd, extra_scale=scale * LOG2E, want_pool=True, want_sim=False,
                                             perm=perm, launch=L),
        "quant_pool128": lambda L: quant_pool(k, BLOCK_N, hd, mean=k_mean, **K_KW, perm=perm, pool_i8_blocks=nkc,
                                              launch=L),
        "quant_v": lambda L: quant_v(v, v_scale, BLOCK_N, hd, True, perm=perm, mean_blocks=nkc, launch=L,
                                     rescale_above=FP8_MAX),
        "kv_stats": lambda L: kv_stats(k, v, v_format_max=FP8_MAX, launch=L, k_sample=KMEAN_SAMPLE, perm=perm,
                                       v_headroom=V_HEADROOM),
        "quant_v_unchecked": lambda L: quant_v(v, v_scale, BLOCK_N, hd, True, perm=perm, mean_blocks=nkc, launch=L),
        "kv_stats_fullv": lambda L: kv_stats(k, v, v_format_max=FP8_MAX, launch=L, k_sample=KMEAN_SAMPLE, perm=perm),
        "block_lse": lambda L: block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, want_mean=True, launch=L,
                                                **lse_kw),
        "block_lse_nomean": lambda L: block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, launch=L,
                                                       **sampling),
        # every key (stride 1, no guard: before v55)
        "block_lse_every_key": lambda L: block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, want_mean=True,
                                                          launch=L, kbar=kbar),
        "quant_pool128_nosim": lambda L: quant_pool(k, BLOCK_N, hd, mean=k_mean, want_pool=False, perm=perm,
                                                    pool_i8_blocks=nkc, launch=L),
        "quant_pool128_cosine": lambda L: quant_pool(k, BLOCK_N, hd, mean=k_mean, want_pool=False, want_sim=True,
                                                     perm=perm, pool_i8_blocks=nkc, want_top=True, launch=L),
        "quant_v_noperm": lambda L: quant_v(v, v_scale, BLOCK_N, hd, True, mean_blocks=nkc, launch=L,
                                            rescale_above=FP8_MAX),
        "quant_pool128_noperm": lambda L: quant_pool(k, BLOCK_N, hd, mean=k_mean, want_pool=False, want_sim=False,
                                                     pool_i8_blocks=nkc, launch=L),
        "torch_cast_fp8": lambda L: v.to(torch.float8_e4m3fn),
        "torch_gather": lambda L: v.index_select(2, perm),
        "select": lambda L: select_blocks_fused(scores, None, None, minshare, "share", True, False, q.shape[2], n_k,
                                                BLOCK_M, BLOCK_N, fill_mean=mean, fill_blocks=nkc, launch=L),
    }


def valid_lists(out):
    """The selection's outputs with the index entries past each row's count zeroed (never written)."""
    counts, idx = out[:2]
    keep = torch.arange(idx.shape[-1], device=idx.device) < counts[..., None]
    return (counts, torch.where(keep, idx, 0)) + tuple(out[2:])


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in flat(o)]


def differs(a, b) -> float:
    """Largest |a - b| over the outputs, relative to the largest |a| (0.0: identical)."""
    worst = 0.0
    for x, y in zip(flat(a), flat(b)):
        x, y = x.float(), y.float()
        fin = torch.isfinite(x) & torch.isfinite(y)
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
            return math.inf
        d = (x[fin] - y[fin]).abs().max().item() if fin.any() else 0.0
        worst = max(worst, d / max(x[fin].abs().max().item(), 1e-30) if fin.any() else 0.0)
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--kernels", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--quick", action="store_true", help="two shapes per kernel (a smoke run)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "shapes": {}}
    for name in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[name]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, batch=B, n_text=realistic_text_tokens(name),
                                    seed=0, device=dev)
        N = q.shape[2]
        perm = TokenPermutation.for_grid(grid, N, device=dev).perm32
        run = runners(q, k, v, perm, D ** -0.5, N)
        r = res["shapes"][name] = {}
        print(f"\n{name} {tuple(q.shape)}")
        for kern, shapes in grids(args.quick).items():
            if args.kernels and kern not in args.kernels.split(","):
                continue
            default = helper_launch(ALIASES.get(kern, kern), dev)
            canon = valid_lists if kern == "select" else (lambda out: out)
            ref = canon(run[kern](default))
            rows = []
            for L in [default] + [s for s in shapes if s != default]:
                try:
                    d = differs(ref, canon(run[kern](L)))
                    ms = bench_graph_ms(lambda L=L: run[kern](L))
                except Exception as e:  # noqa: BLE001 - a shape that does not compile or fit is reported, not fatal
                    rows.append({"launch": vars(L), "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                rows.append({"launch": vars(L), "us": ms * 1e3, "max_rel_diff": d})
            ok = [x for x in rows if "us" in x and x["max_rel_diff"] < 1e-5]
            best = min(ok, key=lambda x: x["us"])
            r[kern] = {"default": rows[0], "best": best, "rows": rows}
            print(f"  {kern:<14} default {rows[0]['us']:7.1f} us  best {best['us']:7.1f} us  {best['launch']}"
                  f"  ({len(rows)} shapes, {sum('error' in x for x in rows)} failed,"
                  f" {sum(x.get('max_rel_diff', 0) >= 1e-5 for x in rows)} differ)")
        used = [k_ for k_ in r if k_ not in ALIASES]  # the comparison rows are not part of a call
        tot_d = sum(r[k_]["default"]["us"] for k_ in used)
        tot_b = sum(r[k_]["best"]["us"] for k_ in used)
        r["sum_us"] = {"default": tot_d, "best": tot_b}
        print(f"  sum of the {len(used)} kernels of a call: default {tot_d:.1f} us, best {tot_b:.1f} us")
        del q, k, v, run
        torch.cuda.empty_cache()
    subset = f"-{args.kernels.replace(',', '-')}" if args.kernels else ""
    print("saved", save(res, f"{res['date']}-{card_name()}-predict_tune{subset}"))


if __name__ == "__main__":
    main()
