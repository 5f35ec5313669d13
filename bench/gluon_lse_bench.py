"""The Gluon prototype of the stage-1 lse scoring kernel (bench/gluon_lse.py) against production's
block_lse_scores(..., want_mean=True) (key_stride 1, no guard: the default), on the H200.

Inputs as bench/predict_tune.py makes them (realistic video Q/K/V at Wan 480p and HunyuanVideo
544p through the real quantizers: pooled queries, smoothed int8 keys with their scales, int8 mean
keys). Each kernel is timed alone from a CUDA-graph replay (common.bench_graph_ms); every Gluon
variant's scores and means are compared with production's on the same inputs: max |diff| in log2
units (FAIL above 1e-3 or on NaN/inf mismatches), and the share of bit-identical values (the
means are int8 dot * row scale * key scale: bit-identical means say the integer dots and the row
scales agree).

Each variant first runs a small smoke test in a child process with a 120 s limit (all at once): a
wrong mbarrier phase hangs the GPU, and a hang there costs one child, not the run. Random inputs,
4 query heads on 2 key heads, partial last key blocks, partial row tiles, programs with fewer key
blocks than ring stages. A variant that fails to compile, launch, finish or match there is
reported and left out of the timing.

    cd bench && python3 gluon_lse_bench.py [--shapes wan480,hunyuan544] [--variants pipe,pipe_t16]
"""
import argparse
import datetime
import json
import traceback

import torch
import triton

from common import (SHAPES, bench_graph_ms, bench_ms, realistic_text_tokens, run_smoke_children, save,
                    text_tail)
from devkit.realistic_inputs import make_video_qkv
from predict_tune import prediction_inputs
from sparge_attention.kernels.block_scores import block_lse_scores
from sparge_attention.kernels.config import BLOCK_N
from sparge_attention.sparge_core.hilbert import TokenPermutation
from sparge_attention.sparge_core.reference_predict import LSE_KEY_STRIDE

import gluon_lse

TOL = 1e-3  # log2 units
SMOKE_TIMEOUT_S = 120


def lse_inputs(q, k, v, perm, scale, n_k):
    """(q_pool, k_i8, k_scale, kbar) as prepare_sparse makes them (bench/predict_tune's)."""
    _, _, _, q_pool, k_out = prediction_inputs(q, k, v, perm, scale, n_k)
    return q_pool, k_out[0], k_out[1], k_out[4]


def production_fn(inp, scale, n_k):
    q_pool, k_i8, k_s, kbar = inp
    return lambda: block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, want_mean=True, kbar=kbar)


def gluon_fn(inp, scale, n_k, name):
    q_pool, k_i8, k_s, kbar = inp
    return lambda: gluon_lse.gluon_block_lse_scores(q_pool, k_i8, k_s, scale, n_k, BLOCK_N, kbar,
                                                    **gluon_lse.VARIANTS[name])


def compare(out, ref) -> dict:
    """Max |diff| of scores and means (over values finite in both), NaN and inf-pattern checks,
    and the share of bit-identical values."""
    r = {}
    for name, a, b in (("scores", out[0], ref[0]), ("mean", out[1], ref[1])):
        fin = torch.isfinite(a) & torch.isfinite(b)
        r[f"{name}_nan"] = bool(torch.isnan(a).any())
        r[f"{name}_inf_mismatch"] = not torch.equal(torch.isfinite(a), torch.isfinite(b))
        r[f"{name}_max_abs"] = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
        r[f"{name}_bit_equal"] = (a == b).float().mean().item()
    r["ok"] = all(not r[f"{n}_nan"] and not r[f"{n}_inf_mismatch"] and r[f"{n}_max_abs"] <= TOL
                  for n in ("scores", "mean"))
    return r


def smoke(name: str):
    """Child process: small random problems through the variant and production; one JSON line."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {"variant": name, "ok": True}
    # (query heads, key heads, tokens): 3000 tokens = 23 full key blocks + 56 keys, 47 pooled
    # queries (a partial row tile), 24 key blocks in tiles of 16: the second tile has 8 blocks;
    # 2100 tokens: 17 key blocks, the second tile a single partial block (fewer than the stages);
    # 16 heads x 16,384 tokens: 256 programs of 32 key blocks (the default tile, full blocks only)
    for H, Hkv, N in ((4, 2, 3000), (2, 2, 2100), (16, 2, 16384)):
        q = torch.randn(1, H, N, 128, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, N, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        perm = torch.arange(N, device=dev, dtype=torch.int32)
        scale = 128 ** -0.5
        inp = lse_inputs(q, k, v, perm, scale, N)
        ref = production_fn(inp, scale, N)()
        out = gluon_fn(inp, scale, N, name)()
        torch.cuda.synchronize()
        c = compare(out, ref)
        res[f"H{H}_Hkv{Hkv}_N{N}"] = c
        res["ok"] = res["ok"] and c["ok"]
    k_ = next(iter(gluon_lse.COMPILED.values()), None)
    if k_ is not None:
        res.update(n_regs=k_.n_regs, n_spills=k_.n_spills, shared=k_.metadata.shared)
    print(json.dumps(res), flush=True)


def run_smokes(names) -> dict:
    """The smoke tests of all variants, each in a child process of its own, run at once."""
    return run_smoke_children(__file__, names, SMOKE_TIMEOUT_S)


def time_us(fn) -> tuple[float, str]:
    """GPU time of fn from a CUDA-graph replay; triton's do_bench if the capture fails."""
    try:
        return bench_graph_ms(fn) * 1e3, "graph"
    except Exception:  # noqa: BLE001 - a launch that cannot be captured is still timed
        torch.cuda.synchronize()
        return bench_ms(fn) * 1e3, "do_bench (graph capture failed: " + text_tail(traceback.format_exc(), 1) + ")"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="wan480,hunyuan544")
    ap.add_argument("--variants", default=",".join(gluon_lse.VARIANTS))
    ap.add_argument("--smoke", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        return smoke(args.smoke)
    if LSE_KEY_STRIDE != 1:
        print(f"note: the pack's default lse key stride is {LSE_KEY_STRIDE}; this compares the stride-1 kernel")
    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "tol_log2": TOL, "smoke": {}, "shapes": {}}
    res["smoke"] = run_smokes(args.variants.split(","))
    names = []
    for name, s in res["smoke"].items():
        print(f"smoke {name}: " + ("OK " if s.get("ok") else "FAILED ")
              + json.dumps({key: val for key, val in s.items() if key != "error"}))
        if "error" in s:
            print("  " + s["error"].replace("\n", "\n  "))
        if s.get("ok"):
            names.append(name)
    rows = []
    for shape in args.shapes.split(","):
        B, H, N, D, grid, _ = SHAPES[shape]
        q, k, v, _ = make_video_qkv(grid=grid, heads=H, head_dim=D, n_text=realistic_text_tokens(shape), seed=0,
                                    device=dev)
        N = q.shape[2]
        perm = TokenPermutation.for_grid(grid, N, device=dev).perm32
        scale = D ** -0.5
        inp = lse_inputs(q, k, v, perm, scale, N)
        del q, k, v
        prod = production_fn(inp, scale, N)
        ref = prod()
        torch.cuda.synchronize()
        t_prod, how = time_us(prod)
        r = res["shapes"][shape] = {"tokens": N, "pooled_queries": inp[0].shape[2],
                                    "key_blocks": inp[1].shape[2] // 128,
                                    "production_us": t_prod, "timing": how, "rows": []}
        rows.append(dict(shape=shape, variant="production", us=t_prod, ratio=1.0, ok=True))
        for name in names:
            row = dict(shape=shape, variant=name)
            try:
                fn = gluon_fn(inp, scale, N, name)
                out = fn()
                torch.cuda.synchronize()
                row.update(compare(out, ref))
                del out
                row["us"], row["timing"] = time_us(fn)
                row["ratio"] = row["us"] / t_prod
                k_ = gluon_lse.COMPILED.get(name)
                if k_ is not None:
                    row.update(n_regs=k_.n_regs, n_spills=k_.n_spills, shared=k_.metadata.shared)
            except Exception:  # a variant that fails to launch here is a result too
                row.update(ok=False, error=text_tail(traceback.format_exc()))
                print(f"{shape} {name} raised:\n  " + row["error"].replace("\n", "\n  "))
            r["rows"].append(row)
            rows.append(row)
        del inp, ref, prod
        torch.cuda.empty_cache()
    path = save(res, "gluon_lse")
    print(f"\n{res['card']}  torch {res['torch']}  triton {res['triton']}  ({path})")
    print(f"{'shape':<11} {'variant':<11} {'us':>9} {'x prod':>7} {'scores |d|':>11} {'mean |d|':>10} "
          f"{'bit-eq s/m':>11}  regs/spills/smem")
    for w in rows:
        if "error" in w:
            print(f"{w['shape']:<11} {w['variant']:<11} {'raised':>9}")
            continue
        if w["variant"] == "production":
            print(f"{w['shape']:<11} {w['variant']:<11} {w['us']:>9.1f} {1.0:>7.3f}")
            continue
        flag = "" if w["ok"] else "  FAIL" + (" NaN" if w["scores_nan"] or w["mean_nan"] else "")
        print(f"{w['shape']:<11} {w['variant']:<11} {w['us']:>9.1f} {w['ratio']:>7.3f} {w['scores_max_abs']:>11.2e} "
              f"{w['mean_max_abs']:>10.2e} {w['scores_bit_equal']:>5.3f}/{w['mean_bit_equal']:<5.3f}  "
              f"{w.get('n_regs')}/{w.get('n_spills')}/{w.get('shared')}{flag}")


if __name__ == "__main__":
    main()
