"""CPU study (issue 14): could the fill pass skip the steps whose skipped blocks the prediction
gives almost no mass? (NOTES v58: no; v44 (f) counted the same with a fixed threshold.)

The fill pass (kernels/fill_pass.py) runs every step of key-block means for every query block:
~0.15 ms of a 0.93 ms Balanced call at Wan 480p (fill_cost-v57), as much per step as a main-loop
tile. Stage 1 knows each skipped block's predicted share of the pooled query's mass (the
selection's softmax over the block scores). A step whose skipped blocks together hold almost none
of it adds almost nothing: it could be dropped (its biases -inf) and skipped by the kernel.

Rules, each with a budget eps of the row's predicted mass (the pooled query's), steps of 64 blocks:
  chunk     drop a step when its skipped blocks' mass <= eps / (the row's steps): the dropped
            total <= eps
  budget    drop the steps in order of increasing mass while the dropped total stays <= eps
Reported per regime and minshare: the share of (query block, step) pairs dropped among the
steps that hold a skipped block, and the rel-L1 (whole, worst head) with and without dropping,
on sampled query blocks, against fp32 dense attention. Inputs: lse_sample_study's regimes (none
the presets were tuned on), production's scoring (reference_predict.lse_stage1: guarded, every
4th key).

    python bench/fill_cull_study.py [--regimes ...] [--tag=-x]      # ~3 min on 2 cores
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401
from devkit.metrics import rel_l1  # noqa: E402
from lse_sample_study import REGIMES, regime_inputs, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference import sparse_attention_reference  # noqa: E402
from sparge_attention.sparge_core.reference_predict import fill_bias, lse_stage1, select_blocks  # noqa: E402

CHUNK = 64
SHARES = (1.0, 1.5, 3.0, 8.0)
RULES = {"none": (None, 0.0), "chunk0.005": ("chunk", 0.005), "budget0.002": ("budget", 0.002),
         "budget0.005": ("budget", 0.005), "budget0.01": ("budget", 0.01)}


def chunk_mass(scores, bias):
    """(B,H,NQ,NCH) predicted mass of each step's skipped blocks, (B,H,NQ,NCH) whether it holds any."""
    m = scores.amax(-1, keepdim=True)
    p = torch.exp2(scores - m)
    p = p / p.sum(-1, keepdim=True)
    NK = scores.shape[-1]
    est = torch.isfinite(bias[..., :NK])
    nch = -(-NK // CHUNK)
    pad = nch * CHUNK - NK
    pm = torch.nn.functional.pad(p * est, (0, pad)).unflatten(-1, (nch, CHUNK)).sum(-1)
    has = torch.nn.functional.pad(est, (0, pad)).unflatten(-1, (nch, CHUNK)).any(-1)
    return pm, has


def drop_steps(mass, has, rule, eps):
    nch = mass.shape[-1]
    if rule == "chunk":
        return has & (mass <= eps / nch)
    srt, order = torch.sort(mass, dim=-1)
    keep_sorted = torch.cumsum(srt, -1) > eps
    drop = torch.zeros_like(has)
    drop.scatter_(-1, order, ~keep_sorted)
    return drop & has


def run_regime(name, kw, sample_qblocks, variants, log):
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    q, k, v, info, ref, qp, qs = regime_inputs(name, kw, sample_qblocks, log)
    scale = q.shape[-1] ** -0.5
    lse, mean = lse_stage1(qp, k, block_k, scale)
    rows = []
    for share in SHARES:
        params = PRESETS["Balanced"].params(minshare=share)
        mask = select_blocks(qp, qs, None, None, params, scale, q.shape[2], k.shape[2], block_q, block_k, lse)
        bias = fill_bias(lse, mean, mask, params, q.shape[2], k.shape[2], block_q, block_k)
        mass, has = chunk_mass(lse, bias)
        for variant in variants:
            rule, eps = RULES[variant]
            if rule is None:
                b2, dropped = bias, torch.zeros_like(has)
            else:
                dropped = drop_steps(mass, has, rule, eps)
                cols = dropped.repeat_interleave(CHUNK, -1)[..., :bias.shape[-1]]
                b2 = bias.masked_fill(cols, -math.inf)
            out = sparse_attention_reference(q, k, v, mask, params, block_q, block_k, fill=b2)[0]
            per_head = rel_l1(out, ref, dims=(0, 2, 3))
            row = dict(variant=variant, minshare=share, density=mask.float().mean().item(),
                       steps_with_skipped=has.float().mean().item(),
                       dropped_of_those=(dropped.float().sum() / has.float().sum()).item(),
                       dropped_mass_max=(mass * dropped).sum(-1).max().item(),
                       whole=rel_l1(out, ref), worst_head=per_head.max().item())
            rows.append(row)
            log(f"  minshare {share:4.1f} density {row['density']:.4f} {variant:12s}: steps dropped "
                f"{row['dropped_of_those']:.3f} of {row['steps_with_skipped']:.3f} (max mass {row['dropped_mass_max']:.4f})"
                f"  rel-L1 {row['whole']:.4f}  worst head {row['worst_head']:.4f}")
    return rows


if __name__ == "__main__":
    sweep_study("fill_cull_study", REGIMES, tuple(RULES), run_regime)
