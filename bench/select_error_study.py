"""CPU study (issue 14): select key blocks by the estimate's expected error, not by their mass.

With fill_skipped every skipped key block is estimated as one key (its mean key, its mean value,
a per-pair bias that makes the pooled query's mass exact). Share selection keeps a block when its
mass share p_ij is large, but the estimate of a skipped block errs only where the block's
attention is uneven AND its values differ: for a query row that spreads its mass over the block
evenly, the mean value is the exact answer whatever the mass. Stage 1 already has a measure of
the unevenness for free: the Jensen gap of the block's scores,
    g_ij = lse_ij - mean_ij - log2(n_j) >= 0   (log2 units; 0 iff every key scores the same),
so 1 - 2^-g_ij is the share of the block's mass that an even spread would misplace. The value
side is the key block's spread sigma_j = rms_t ||v_t - vbar_j|| (in V's per-channel scale; what
quant_v could write per block).

Selection scores (log2 units; keep_from_scores' share rule on them, swept over minshare):
  share        lse_ij (today)
  gap          lse_ij + log2(1 - 2^-g_ij)
  vspread      lse_ij + log2(sigma_j)
  gap+vspread  both factors
The top block of each row is kept by the share rule as before; the estimate (fill_bias) is the
same for every variant. No parameter is fit.
  oracle       not a predictor, a bound on what any selection could gain: the exact error of
               estimating block j's values by their mean under each row's true mass,
               e_ij = sum_r || sum_t w_rt v_t - (sum_t w_rt) vbar_j ||_1 / Z_r over query block i's
               rows r (w the true attention weights, Z_r the row's total), from fp32 dense scores.
               Swept over a wider minshare range (ORACLE_SHARES): its scores spread differently.
  oracle-global  the same errors, kept above one threshold over every row and head (plus each
               row's largest), not by their share of the row: the greedy choice for the whole
               output's error, which the per-row share rule is not. Compared at equal kept density (the kernel's time is
a fixed part plus one linear in density): the density where the whole output's rel-L1 crosses
0.05, and where the worst head's crosses 0.10. The inputs are not the presets' tuning inputs
(realistic_bench: seed 0, default head mix); the regimes are lse_sample_study's plus one more.

    python bench/select_error_study.py                    # four regimes (~15 min on 2 cores)
    python bench/select_error_study.py --regimes wan480-seed5 --sample-qblocks 6 --tag=-quick
    python bench/select_error_study.py --variants share oracle --tag=-oracle
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (loads the pack as `sparge_attention`, puts the root on sys.path)
from lse_sample_study import REGIMES as LSE_REGIMES, mask_row, regime_inputs, sweep_shares, sweep_study  # noqa: E402
from sparge_attention.sparge_core.api import block_sizes  # noqa: E402
from sparge_attention.sparge_core.blockmask import num_blocks  # noqa: E402
from sparge_attention.sparge_core.presets import PRESETS  # noqa: E402
from sparge_attention.sparge_core.reference_predict import lse_stage1  # noqa: E402
from sparge_attention.sparge_core.reference_quant import block_token_counts, split_blocks, value_scale  # noqa: E402

REGIMES = dict(LSE_REGIMES)
REGIMES["wan480-global-text512-seed8"] = dict(grid=(17, 30, 52), heads=12, seed=8, n_text=512,
                                              head_types=["global", "local", "global", "temporal"] * 3)
VARIANTS = ("share", "gap", "vspread", "gap+vspread", "oracle", "oracle-global")
SHARES = (0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0)
ORACLE_SHARES = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 32.0)


def value_spread(v, block_k):
    """sigma_j (B,Hkv,NK): each key block's rms distance of its values from their mean, in V's
    per-channel scale (reference_quant.value_scale), over its real tokens."""
    n = v.shape[2]
    vs = v.float() / value_scale(v)[:, :, None, :]
    vb = split_blocks(vs, block_k)
    cnt = block_token_counts(n, block_k, v.device)
    valid = (torch.arange(vb.shape[2] * block_k) < n).view(vb.shape[2], block_k)[None, None, :, :, None]
    mean = vb.sum(-2, keepdim=True) / cnt[:, None, None]
    dev = torch.where(valid, vb - mean, 0.0)
    return ((dev * dev).sum((-1, -2)) / cnt).sqrt()


def jensen_gap(lse, mean, n_k, block_k):
    """g_ij = lse_ij - mean_ij - log2(n_j) >= 0 (rounding can make it a hair negative: clamped)."""
    n_real = (n_k - torch.arange(lse.shape[-1]) * block_k).clamp(max=block_k).float()
    return (lse - mean - torch.log2(n_real)).clamp_min(0.0)


def oracle_scores(q, k, v, block_q, block_k, scale):
    """log2 e_ij (B,H,NQ,NK): for each query block i of q (the sampled rows) and key block j, the
    exact L1 error of the mean-value estimate under the rows' true weights (see the docstring)."""
    B, H, n, _ = q.shape
    n_k = k.shape[2]
    NK = num_blocks(n_k, block_k)
    cnt = block_token_counts(n_k, block_k)
    out = torch.empty(B, H, n // block_q, NK)
    for b in range(B):
        for h in range(H):
            hk = h // (H // k.shape[1])
            s = (q[b, h].float() @ k[b, hk].float().T) * scale
            w = torch.exp(s - s.amax(-1, keepdim=True))  # (n, n_k)
            z = w.sum(-1)  # each row's total
            wb = torch.nn.functional.pad(w, (0, NK * block_k - n_k)).view(n, NK, block_k)
            vb = split_blocks(v[b:b + 1, hk:hk + 1].float(), block_k)[0, 0]  # (NK, block_k, D), zero padded
            vbar = vb.sum(1) / cnt[:, None]
            num = torch.einsum("rjt,jtd->rjd", wb, vb)
            err = (num - wb.sum(-1)[..., None] * vbar[None]).abs().sum(-1) / z[:, None]  # (n, NK)
            out[b, h] = err.view(n // block_q, block_q, NK).sum(1)
    return torch.log2(out.clamp_min(1e-30))


def sweep_global(variant, err, q, k, v, ref, lse, mean, head_types, log, points=12):
    """sweep_shares' rows for masks that keep every pair whose log2 error err is above a threshold
    over all rows and heads (quantiles of err), plus each row's largest."""
    top = torch.nn.functional.one_hot(err.argmax(-1), err.shape[-1]).bool()
    params = PRESETS["Balanced"].params()
    rows = []
    for keep in torch.logspace(math.log10(0.005), math.log10(0.25), points).tolist():
        tau = torch.quantile(err.flatten().float(), 1.0 - keep)
        row = mask_row(variant, None, (err >= tau) | top, q, k, v, ref, lse, mean, params, head_types)
        rows.append(row)
        log(f"  {variant:12s} kept above quantile  density {row['density']:.4f}  rel-L1 {row['whole']:.4f}  "
            f"worst head {row['worst_head']:.4f} ({row['worst_head_type']})")
    return rows


def selection_scores(variant, lse, gap, sigma):
    s = lse
    if "gap" in variant:
        s = s + torch.log2((1.0 - torch.exp2(-gap)).clamp_min(1e-30))
    if "vspread" in variant:
        H = lse.shape[1]
        s = s + torch.log2(sigma.clamp_min(1e-30)).repeat_interleave(H // sigma.shape[1], 1)[:, :, None, :]
    return s


def run_regime(name, kw, sample_qblocks, variants, log):
    block_k = block_sizes(torch.device("cpu"), "reference")[1]
    q, k, v, info, ref, qp, qs = regime_inputs(name, kw, sample_qblocks, log)
    lse, mean = lse_stage1(qp, k, block_k, q.shape[-1] ** -0.5)
    gap = jensen_gap(lse, mean, k.shape[2], block_k)
    sigma = value_spread(v, block_k)
    log(f"  gap median {gap.median().item():.2f}, "
        f"sigma_j max/median {(sigma.amax(-1) / sigma.median(-1).values).mean().item():.2f}")
    rows = []
    oracle = None
    for variant in variants:
        if variant.startswith("oracle"):
            if oracle is None:
                block_q = block_sizes(torch.device("cpu"), "reference")[0]
                oracle = oracle_scores(q, k, v, block_q, block_k, q.shape[-1] ** -0.5)
            if variant == "oracle":
                rows += sweep_shares(variant, ORACLE_SHARES, q, k, v, ref, qp, qs, oracle, lse, mean,
                                     info["head_types"], log)
            else:
                rows += sweep_global(variant, oracle, q, k, v, ref, lse, mean, info["head_types"], log)
            continue
        sel = selection_scores(variant, lse, gap, sigma)
        rows += sweep_shares(variant, SHARES, q, k, v, ref, qp, qs, sel, lse, mean, info["head_types"], log)
    return rows


if __name__ == "__main__":
    sweep_study("select_error_study", REGIMES, VARIANTS, run_regime)
