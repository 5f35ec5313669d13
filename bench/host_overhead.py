"""Host (Python) time per sparse attention call, by stage: what the CPU spends queueing one call.

A model hides it while the GPU is busier than the CPU (long sequences); at short sequences the
CPU becomes the limit. Times are CPU-side only (no synchronisation inside the loop).

    python bench/host_overhead.py [--tokens 7800]
"""
import argparse
import datetime
import math
import time

import torch

from common import card_name, save
from sparge_attention.kernels.attn_fwd import sparse_attn_fwd
from sparge_attention.kernels.block_scores import block_lse_scores
from sparge_attention.kernels.kv_stats import kv_stats
from sparge_attention.kernels.quantize import quant_pool, quant_v
from sparge_attention.kernels.select import select_blocks_fused
from sparge_attention.sparge_core import SpargeParams, sparge_attention
from sparge_attention.sparge_core.api import prepare_sparse


def host_us(fn, n=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7800)
    args = ap.parse_args()
    B, H, N, D = 2, 12, args.tokens, 128
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    p = SpargeParams(simthreshd1=-1.0, cdfthreshd=0.95, pvthreshd=math.inf, scoring="lse")
    P = prepare_sparse(q, k, v, p, D ** -0.5)
    cfg, bm = P["cfg"], P["block_mask"]
    q_i8, q_s, q_pool, _ = quant_pool(q, 64, 128, want_pool=True, want_sim=False)
    mean, amax = kv_stats(k, v)
    pvt = torch.full((H,), math.inf, device="cuda")
    rows = {
        "full call (sparge_attention)": lambda: sparge_attention(q, k, v, p),
        "prepare_sparse": lambda: prepare_sparse(q, k, v, p, D ** -0.5),
        "quant_pool (Q, pooled)": lambda: quant_pool(q, 64, 128, want_pool=True, want_sim=False),
        "kv_stats": lambda: kv_stats(k, v),
        "quant_v": lambda: quant_v(v, amax, 128, 128, True),
        "block_lse_scores": lambda: block_lse_scores(q_pool, P["k_i8"], P["k_s"], D ** -0.5, N, 128),
        "select_blocks_fused": lambda: select_blocks_fused(torch.zeros(B, H, bm.kv_num_blocks.shape[2], bm.kv_indices.shape[3], device="cuda"),
                                                           torch.ones(B, H, bm.kv_num_blocks.shape[2], dtype=torch.bool, device="cuda"),
                                                           None, p.per_head("cdfthreshd", H, q.device), "cdf", False, False, N, N, 64, 128),
        "attention kernel launch": lambda: sparse_attn_fwd(P["q_i8"], P["k_i8"], P["v_t"], P["q_s"], P["k_s"], P["v_scale"],
                                                           bm.kv_num_blocks, bm.kv_indices, pvt, N, N, D, q.dtype,
                                                           False, False, cfg),
        "torch.empty (one tensor)": lambda: torch.empty(B, H, N, D, device="cuda"),
    }
    res = {"card": torch.cuda.get_device_name(), "tokens": N, "host_us": {}}
    for name, fn in rows.items():
        res["host_us"][name] = host_us(fn)
        print(f"{name:<32} {res['host_us'][name]:8.1f} us")
    save(res, f"{datetime.date.today().isoformat()}-{card_name()}-host")


if __name__ == "__main__":
    main()
