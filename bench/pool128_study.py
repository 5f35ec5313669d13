"""CPU study (issue 14): stage 1 from one pooled query per 128 query rows instead of per 64-row block.

The lse scoring kernel scores every pooled query against every key: ~100 us of a Balanced call's
~1 ms at Wan 480p (bench/results 2026-12-06-H100-call_profile), and the selection runs once per
pooled query. Pooling over two query blocks would halve both, if the pair can share its kept key
blocks and its estimate's biases. What it costs: the mask of a pair is the union of what the two
blocks need, chosen from their mean query, and each block's skipped-block estimate is exact for the
pair's pooled query instead of its own (the bias lse - q_pool . kbar and the second-order term are
taken around it).

Variants, everything else as fill_order2_study (fp32, Hilbert order, Balanced's share rule swept
over minshare, the estimator "grp8": first order plus the second-order term over groups of 8
channels, unclamped):
  pool64    today: one pooled query per 64-row block
  pool128   one per aligned pair of blocks (rows 128 i .. 128 i + 127); both blocks of the pair get
            its scores, its mask and its biases
The sampled query rows are whole aligned 128-row chunks (pairs), the same for both variants.
Compared at equal kept density (the kernel's time is a fixed part plus one linear in density):
the density where the whole output's rel-L1 crosses 0.05, and where the worst head's crosses 0.10.

    python bench/pool128_study.py                    # three regimes, 6 pairs each (~1.5 min on 2 cores)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from fill_order2_study import block_lse, regime_parts, share_sweep  # noqa: E402
from lse_sample_study import REGIMES, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402

VARIANTS = ("pool64", "pool128")
PAIR = 128


def pooled_over(P, rows: int):
    """head_parts' pieces with the pooled query, its lse and its mean scores taken over `rows` query
    rows (a multiple of the block), repeated for each block of the group. The pooled query's scores
    are the mean of its rows' (a score is linear in the query)."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    qs, s = P["qs"], P["s"]
    qp = qs.view(-1, rows, qs.shape[1]).mean(1)
    lse = block_lse(s.view(-1, rows, s.shape[1]).mean(1), P["pad"], P["NK"], block_k)
    rep = rows // block_q
    return {**P, "qp": qp.repeat_interleave(rep, 0), "lse_pool": lse.repeat_interleave(rep, 0),
            "mean_pool": (qp @ P["kbar"].T).repeat_interleave(rep, 0)}


def run_regime(name, kw, sample_qblocks, variants, log):
    pairs = max(1, sample_qblocks // 2)  # as many query rows as the other studies' sample
    parts, ref, info, qp_all, qs_all, n_k = regime_parts(name, kw, pairs, log, sample_rows=PAIR)
    rows = []
    for variant in variants:
        vparts = [pooled_over(P, int(variant[4:])) for P in parts]
        lse = torch.stack([P["lse_pool"] for P in vparts])[None]  # (1, H, NQs, NK), per 64-row block
        rows += share_sweep(vparts, ref, info, qp_all, qs_all, n_k, lse, "grp8", variant, log)
    return rows


if __name__ == "__main__":
    sweep_study("pool128_study", REGIMES, VARIANTS, run_regime)
