"""CPU study (issue 14): stage-1 scores from each key block's moments instead of the lse pass.

The lse kernel (about a third of prediction + quantization at Wan 480p) scores every pooled query
against every key. The cumulant expansion that gave the estimate its second-order term
(fill_order2_study) also approximates the pooled query's own score of a block from numbers the
quantizers already write, with no pass over the keys:
    lse_j(q_pool) ~ log2 n_j + q_pool . kbar_j + (ln 2 / 2) sum_c q_pool_c^2 var_jc
Variants (the mask AND the estimate's bias come from the score, as they would in the kernels;
the estimate itself is the production one, grp8):
  lse      the exact pooled lse (production)
  mom1     log2 n + q_pool . kbar (first order: the paper's pooled score plus the block's size)
  mom2g8   + the second-order term over 16 channel groups (what K's quantizer writes)
  mom2d    + the second-order term with every channel's variance
Errors: rel-L1 of the whole output and of the worst head against fp32 dense attention, on sampled
query blocks of lse_sample_study's regimes (none of them the presets' tuning inputs).

    python bench/moment_score_study.py [--regimes ...] [--variants lse mom1 mom2g8 mom2d]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from fill_order2_study import LN2, regime_parts, share_sweep  # noqa: E402
from lse_sample_study import REGIMES, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402

VARIANTS = ("lse", "mom1", "mom2g8", "mom2d")


def block_scores(P, variant, block_k):
    """(NQs, NK) stage-1 scores of one head's pooled queries, log2 units."""
    if variant == "lse":
        return P["lse_exact"]
    cnt = torch.full((P["NK"],), float(block_k))
    cnt[-1] = block_k - P["pad"]
    first = torch.log2(cnt)[None] + P["mean_pool"]
    if variant == "mom1":
        return first
    qp2, var = P["qp"] ** 2, P["var"]
    if variant == "mom2g8":  # groups of 8 channels: summed squares times the group's mean variance
        quad = qp2.view(qp2.shape[0], -1, 8).sum(-1) @ var.view(var.shape[0], -1, 8).mean(-1).T
    elif variant == "mom2d":
        quad = qp2 @ var.T
    else:
        raise ValueError(variant)
    return first + 0.5 * LN2 * quad


def run_regime(name, kw, sample_qblocks, variants, log):
    parts, ref, info, qp_all, qs_all, n_k = regime_parts(name, kw, sample_qblocks, log)
    block_k = block_sizes(torch.device("cpu"), "reference")[1]
    for P in parts:
        P["lse_exact"] = P["lse_pool"]
    rows = []
    for variant in variants:
        for P in parts:  # the estimate's bias follows the score (fill_order2_study.fill_logits reads lse_pool)
            P["lse_pool"] = block_scores(P, variant, block_k)
        scores = torch.stack([P["lse_pool"] for P in parts])[None]
        rows += share_sweep(parts, ref, info, qp_all, qs_all, n_k, scores, "grp8", variant, log)
    return rows


if __name__ == "__main__":
    sweep_study("moment_score_study", REGIMES, VARIANTS, run_regime)
