"""CPU study (issue 14): a second-order term in the skipped-block estimate's weight.

fill_skipped gives a skipped key block j one key in row r's softmax, with weight
    2^(q_r . kbar_j + bias_ij),   bias_ij = lse_ij - q_pool_i . kbar_j      (log2 units)
exact for the pooled query of block i, first order in (q_r - q_pool_i) around it. The true weight is
2^lse_j(q_r); by the cumulant expansion of a block's scores s = q . k (in log2 units),
    lse_j(q) = log2 n_j + q . kbar_j + (ln 2 / 2) q^T Sigma_j q + ...,
with Sigma_j the covariance of the block's keys, so the estimate misses, per row,
    c_rj = (ln 2 / 2) (q_r^T Sigma_j q_r - q_pool^T Sigma_j q_pool).
A query row pointed along the keys' spread more than its block's mean is, gets more of the block
than the mean says. With Sigma_j's diagonal (each channel's variance over the block: 128 numbers
per block, as many as the mean key) the term is one more product per skipped block in the kernel's
fill pass, (q_r^2 - q_pool^2) . var_j.

Variants, all on the same masks (Balanced's share rule over lse scores from the pooled query,
swept over minshare), everything in fp32 so that only the estimate differs (no quantization):
  mean      today's weight
  diag      + c_rj with Sigma_j's diagonal
  diag/2    + c_rj / 2 (a damped term: the expansion overshoots where a block's scores are skewed)
  diag<2    + c_rj held within +-2 (log2 units; what the kernel does, reference_predict.fill_logits)
  full      + c_rj with the whole Sigma_j (what the diagonal leaves out)
  oracle    the true per-row weight 2^lse_j(q_r) (a bound for weights with the mean value only: the
            diagonal term beats it, so part of its gain comes through the value side)
  grpN      diag with the channels in groups of N (contiguous): each row's summed (q^2 - q_pool^2) and
            each block's mean variance per group; grp8 is one fp16 MMA k-step (16 groups) in the kernel
  mean+X    today's weight raised by a constant X (log2 units): whether the gain is a mere mass boost
Errors: rel-L1 of the whole output and of the worst head against fp32 dense attention, on
sampled query blocks. The regimes are lse_sample_study's (none of them the presets' tuning inputs).

    python bench/fill_order2_study.py                               # three regimes (~8 min on 2 cores)
    python bench/fill_order2_study.py --variants mean diag mean+0.3 mean+0.6 mean+1.0 --tag=-boost
    python bench/fill_order2_study.py --variants mean diag "diag<2" --tag=-clamp
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from devkit.metrics import rel_l1  # noqa: E402
from lse_sample_study import REGIMES, regime_inputs, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference_predict import select_blocks  # noqa: E402
from sparge_attention.sparge_core.reference_quant import LOG2E, smooth_k  # noqa: E402

VARIANTS = ("mean", "diag", "diag/2", "full", "oracle")  # the default run; mean+X and diag<2 on request
SHARES = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0)
LN2 = math.log(2.0)


def block_lse(scores, pad, nk, block_k):
    """(R, N) scores in log2 units -> each key block's log2-sum-exp2 (R, NK), the last block's
    padding left out."""
    s = torch.nn.functional.pad(scores, (0, pad), value=-math.inf).view(scores.shape[0], nk, block_k)
    return torch.logsumexp(s * LN2, -1) / LN2


def head_parts(qh, kh, vh, block_q, block_k):
    """One head's fp32 pieces: scaled rows q' (log2 units per key), pooled q', every row's scores
    against every key (R, N), and per key block its mean key, mean value, channel variance,
    covariance and the pooled query's lse and mean score."""
    D = qh.shape[-1]
    qs = qh.float() * (D ** -0.5 * LOG2E)
    R, N = qs.shape[0], kh.shape[0]
    NK = -(-N // block_k)
    pad = NK * block_k - N
    kb = torch.nn.functional.pad(kh, (0, 0, 0, pad)).view(NK, block_k, D)
    vb = torch.nn.functional.pad(vh.float(), (0, 0, 0, pad)).view(NK, block_k, D)
    cnt = torch.full((NK,), float(block_k))
    cnt[-1] = block_k - pad
    valid = (torch.arange(NK * block_k) < N).view(NK, block_k)
    kbar = kb.sum(1) / cnt[:, None]
    vbar = vb.sum(1) / cnt[:, None]
    dk = (kb - kbar[:, None]) * valid[..., None]
    cov = dk.transpose(1, 2) @ dk / cnt[:, None, None]  # (NK, D, D)
    var = torch.diagonal(cov, dim1=1, dim2=2)  # (NK, D)
    qp = qs.view(-1, block_q, D).mean(1)  # (NQs, D)
    lse_pool = block_lse(qp @ kh.T, pad, NK, block_k)  # (NQs, NK)
    mean_pool = qp @ kbar.T
    s = qs @ kh.T  # (R, N)
    return dict(qs=qs, qp=qp, s=s, kbar=kbar, vbar=vbar, var=var, cov=cov, lse_pool=lse_pool,
                mean_pool=mean_pool, NK=NK, pad=pad, vb=vb)


def fill_logits(P, variant, block_q, block_k):
    """(R, NK) log2 weights of every key block as one key for every row, by variant."""
    qs, qp = P["qs"], P["qp"]
    rows_blk = torch.arange(qs.shape[0]) // block_q
    bias = (P["lse_pool"] - P["mean_pool"])[rows_blk]  # (R, NK)
    t = qs @ P["kbar"].T + bias
    if variant == "mean":
        return t
    if variant.startswith("mean+"):  # the same weight raised by a constant: is the gain a mere mass boost?
        return t + float(variant[5:])
    if variant == "oracle":
        s = torch.nn.functional.pad(P["s"], (0, P["pad"]), value=-math.inf).view(qs.shape[0], P["NK"], block_k)
        return torch.logsumexp(s * LN2, -1) / LN2
    if variant in ("diag", "diag/2", "diag<2"):
        quad = (qs * qs) @ P["var"].T - ((qp * qp) @ P["var"].T)[rows_blk]
    elif variant.startswith("grp"):  # channels in groups of N: the rows' summed squares times the mean variance
        g = int(variant[3:])
        d2 = (qs * qs - (qp * qp)[rows_blk])
        quad = d2.view(d2.shape[0], -1, g).sum(-1) @ P["var"].view(P["var"].shape[0], -1, g).mean(-1).T
    elif variant == "full":
        quad = torch.einsum("rd,jde,re->rj", qs, P["cov"], qs) - torch.einsum("id,jde,ie->ij", qp, P["cov"], qp)[rows_blk]
    else:
        raise ValueError(variant)
    c = 0.5 * LN2 * quad
    if variant == "diag<2":  # the term held within 2 log2 units (a factor 4 of mass) either way
        c = c.clamp(-2.0, 2.0)
    return t + (0.5 * c if variant == "diag/2" else c)


def estimate(P, keep_rows, variant, block_q, block_k):
    """Every sampled row's output: its kept blocks exactly, its skipped blocks as one key each."""
    R, N = P["s"].shape
    NK = P["NK"]
    key_blk = torch.arange(N) // block_k
    kept_keys = keep_rows[:, key_blk]  # (R, N)
    s = P["s"].masked_fill(~kept_keys, -math.inf)
    t = fill_logits(P, variant, block_q, block_k).masked_fill(keep_rows, -math.inf)
    m = torch.maximum(s.amax(-1), t.amax(-1))[:, None]
    ps, pt = torch.exp2(s - m), torch.exp2(t - m)
    vh = P["vb"].view(NK * block_k, -1)[:N]
    num = ps @ vh + pt @ P["vbar"]
    return num / (ps.sum(-1) + pt.sum(-1))[:, None]


def regime_parts(name, kw, sample_qblocks, log, sample_rows=None):
    """A regime's per-head fp32 pieces (head_parts), the exact output of its sampled rows, and what
    select_blocks needs: (parts, ref, info, pooled queries, their self-similarity, key count).
    sample_rows: see lse_sample_study.regime_inputs."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    q, k, v, info, _, qp_all, qs_all = regime_inputs(name, kw, sample_qblocks, log, sample_rows)
    ksm = smooth_k(k.float())
    H, Hkv = q.shape[1], k.shape[1]
    parts, refs = [], []
    for h in range(H):
        hk = h * Hkv // H
        P = head_parts(q[0, h], ksm[0, hk], v[0, hk], block_q, block_k)
        refs.append(torch.softmax(P["s"] * LN2, -1) @ v[0, hk].float())
        parts.append(P)
    return parts, torch.stack(refs)[None], info, qp_all, qs_all, k.shape[2]


def regime_mask(parts, qp_all, qs_all, n_k, scores, share):
    """Balanced's share rule at `share` over stage-1 `scores` (1, H, NQs, NK), as the presets select."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    R, D = parts[0]["qs"].shape
    params = PRESETS["Balanced"].params(minshare=share)
    return select_blocks(qp_all, qs_all, None, None, params, D ** -0.5, R, n_k, block_q, block_k, scores)


def error_row(parts, ref, info, mask, estimator, label, share, log):
    """The whole and worst-head rel-L1 of the sampled rows' output with `mask` kept exactly and the
    other blocks by fill_logits' `estimator`, as a result row (logged) named `label`."""
    block_q, block_k = block_sizes(torch.device("cpu"), "reference")
    rows_blk = torch.arange(ref.shape[2]) // block_q
    out = torch.stack([estimate(P, mask[0, h][rows_blk], estimator, block_q, block_k)
                       for h, P in enumerate(parts)])[None]
    per_head = rel_l1(out, ref, dims=(0, 2, 3))
    row = dict(variant=label, minshare=share, density=mask.float().mean().item(), whole=rel_l1(out, ref),
               worst_head=per_head.max().item(), worst_head_type=info["head_types"][int(per_head.argmax())])
    log(f"  {label:8s} minshare {share:5.1f}  density {row['density']:.4f}  rel-L1 {row['whole']:.4f}  "
        f"worst head {row['worst_head']:.4f} ({row['worst_head_type']})")
    return row


def share_sweep(parts, ref, info, qp_all, qs_all, n_k, scores, estimator, label, log):
    """error_row at every minshare of SHARES, the mask from `scores` (regime_mask), the skipped
    blocks by `estimator`; the rows named `label`."""
    return [error_row(parts, ref, info, regime_mask(parts, qp_all, qs_all, n_k, scores, share), estimator, label,
                      share, log) for share in SHARES]


def run_regime(name, kw, sample_qblocks, variants, log):
    parts, ref, info, qp_all, qs_all, n_k = regime_parts(name, kw, sample_qblocks, log)
    lse = torch.stack([P["lse_pool"] for P in parts])[None]  # (1, H, NQs, NK)
    rows = []
    for share in SHARES:
        mask = regime_mask(parts, qp_all, qs_all, n_k, lse, share)
        rows += [error_row(parts, ref, info, mask, variant, variant, share, log) for variant in variants]
    return rows


if __name__ == "__main__":
    sweep_study("fill_order2_study", REGIMES, VARIANTS, run_regime)
