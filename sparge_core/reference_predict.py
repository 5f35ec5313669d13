"""Stage 1 of the method in plain PyTorch: pooled blocks, the lse scores of a pooled query
against each key block's keys, block selection, and the skipped-block estimate's bias and block
means.

Part of the reference (reference.py is the whole method): the twin of kernels/block_scores.py,
kernels/select.py and the pooling in kernels/quantize.py, rounding as they do."""
from __future__ import annotations

import math

import torch

from .blockmask import causal_block_mask
from .params import SpargeParams
from .reference_quant import (
    LOG2E,
    TINY,
    block_token_counts,
    expand_kv,
    quantize_int8_per_block,
    quantize_v,
    int8_values,
    smooth_k,
    split_blocks,
)


def pool_and_similarity(x: torch.Tensor, block: int):
    """Per block: the mean token (B,H,nb,D) and the mean pairwise cosine similarity (B,H,nb).

    mean_{i,j} cos(x_i, x_j) = ||sum_i x_i/||x_i|| ||^2 / n^2, computed without the n^2 pairs."""
    n = x.shape[2]
    xb = split_blocks(x.float(), block)
    cnt = block_token_counts(n, block, x.device)
    pooled = xb.sum(-2) / cnt[:, None]
    norm = xb.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, xb / norm.clamp_min(TINY), torch.zeros_like(xb))
    s = unit.sum(-2)
    sim = (s * s).sum(-1) / (cnt * cnt)
    return pooled, sim


def energy_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per block (B,H,nb): ||sum_i x_i||^2 / (n sum_i ||x_i||^2), the mean pairwise dot product of
    its tokens over their mean squared norm (0 for an all-zero block). Equal to
    pool_and_similarity's mean pairwise cosine where the tokens' norms are equal, and, unlike it,
    made from the block's sums alone: K's quantizer takes its column sums and sums of squares for
    the estimate anyway, so the lse guard costs it no per-token work."""
    n = x.shape[2]
    xb = split_blocks(x.float(), block)
    cnt = block_token_counts(n, block, x.device)
    s = xb.sum(-2)
    energy = (xb * xb).sum((-2, -1))
    return torch.where(energy > 0, (s * s).sum(-1) / (cnt * energy.clamp_min(1e-30)), torch.zeros_like(energy))


# The lse scores read every LSE_KEY_STRIDE-th key of a block and, always, the block's top key
# (block_top_keys, in place of the sampled key of its group), the others weighted for the keys not
# read: the scoring kernel's work per block falls by the stride. Without that key a sink (one strong
# key) falls out of the sample half the time. With it, stride 2 needed the same density as every
# key on realistic inputs the presets were not tuned on (bench/lse_sample_study.py). On random
# keys (the tiny random-weight models) the estimated masses move each call's error by -8% to +30%,
# and those models' error curves have a cliff (rel-L1 0.013-0.04 at minshare 1.0, 0.15-0.22 at
# 1.5) near which that is enough to miss a target: the Quality preset's measured error on the tiny
# HunyuanVideo model rose 0.011 -> 0.028 against its 0.02 (bench/NOTES.md v31, v32). Hence the
# guard: a block whose smoothed keys' self-similarity (energy_similarity) is below LSE_EXACT_SIM is
# read in full, and so is a partial last block. Random-weight models' key blocks measure
# 0.02-0.10, the realistic inputs' 0.29-0.90 (0.09-0.47 at a noisy step, where 12% of the blocks
# are read in full; bench/lse_guard_study.py). On by default since v55, when K's quantizer took the
# guard's similarity and the top key from what it computes anyway (before: per-token norms and
# unit vectors, which made it spill and cost the gain at Wan 480p; NOTES v40, v55). Stride 4 since
# v56: on the realistic regimes +3% / +1% density at rel-L1 0.05 over stride 2 with the worst head
# no worse (CPU), and the presets' errors within 1% on the GPU, for a scoring kernel about half as
# long (prediction + quantization 0.0155x -> 0.0141x at HunyuanVideo 544p, H100; NOTES v56).
LSE_KEY_STRIDE = 4
LSE_EXACT_SIM = 0.2


def lse_exact_blocks(k_smooth, block_k: int, stride: int = LSE_KEY_STRIDE):
    """The key blocks the lse scores read in full at `stride` (B,Hkv,NK) bool: those whose smoothed
    keys' self-similarity (energy_similarity) is below LSE_EXACT_SIM, and a partial last block
    (too few keys for a sample to stand for; in joint attention it holds the text tokens). None at
    stride 1 (every block is read in full)."""
    if stride == 1:
        return None
    exact = energy_similarity(k_smooth, block_k) < LSE_EXACT_SIM
    if k_smooth.shape[2] % block_k:
        exact[..., -1] = True
    return exact


def block_top_keys(k_smooth: torch.Tensor, block_k: int, n_k: int) -> torch.Tensor:
    """Per key block, the position in the block (0 .. block_k - 1) of its top key: the one that
    holds the block's largest |value| (smoothed keys, before rounding), the first such key on
    ties, real keys only. (B,H,NK) int64. K's quantizer finds it from the row maxima its int8 scale
    takes anyway; until v55 it was the largest-norm key by the int8 values, which cost that kernel
    a second reduction per row and its spills (the same densities on the realistic regimes,
    bench/lse_sample_study.py, NOTES v55)."""
    kb = split_blocks(k_smooth.float(), block_k).abs().amax(-1)  # (B,H,NK,BK)
    NK = kb.shape[2]
    valid = (torch.arange(NK * block_k, device=k_smooth.device) < n_k).view(NK, block_k)
    return kb.masked_fill(~valid, -1.0).argmax(-1)


def lse_sampling(k_smooth: torch.Tensor, block_k: int) -> dict:
    """block_lse_scores' stride, exact and top for stage 1 as production runs it on these smoothed
    keys (B,Hkv,Nk,D): LSE_KEY_STRIDE, the guard's blocks read in full and each block's top key."""
    return dict(stride=LSE_KEY_STRIDE, exact=lse_exact_blocks(k_smooth, block_k),
                top=block_top_keys(k_smooth, block_k, k_smooth.shape[2]))


def lse_key_rows(top: torch.Tensor, block_k: int, stride: int) -> torch.Tensor:
    """The positions in each key block that its lse score reads (B,H,NK,block_k // stride): j *
    stride for every j, except the top key's group j = top // stride, which reads the top key."""
    rows = (torch.arange(block_k // stride, device=top.device) * stride).expand(*top.shape, -1).clone()
    return rows.scatter_(-1, (top // stride)[..., None], top[..., None])


def block_lse_scores(q_pool, k_i8, k_scale, scale: float, n_k: int, block_k: int, want_mean: bool = False,
                     kbar=None, stride: int = 1, exact=None, top=None):
    """Per pooled query and key block: log2 of sum_j exp2(score_j) over the block's real keys.

    This is the attention mass the pooled query gives each key block, computed against its keys
    rather than the key block's mean, so one strong key (a sink) is never averaged away. With
    stride S, the sum is estimated: the block's top key exactly (`top` (B,Hkv,NK), block_top_keys'
    answer, needed at S > 1), the other n - 1 real keys from the block_k / S - 1 other keys
    lse_key_rows reads, each of those weighted (n - 1) / (the real ones among them); blocks where
    `exact` (B,Hkv,NK) bool is set (lse_exact_blocks) get the exact sum. Stride 1 is the exact sum
    everywhere.
    Models the Triton kernel: pooled queries in int8 (one scale per row), smoothed int8 keys.
    want_mean: also return the pooled query's score against each block's mean key (log2 units,
    for fill_skipped), kbar = (the mean keys' int8 values (B,Hkv,>=NK,D), their scales
    (B,Hkv,>=NK)) as mean_keys_i8 gives them: the mean key the estimate itself uses."""
    H = q_pool.shape[1]
    if stride > 1 and exact is not None and exact.any():
        est = block_lse_scores(q_pool, k_i8, k_scale, scale, n_k, block_k, want_mean, kbar, stride, top=top)
        full = block_lse_scores(q_pool, k_i8, k_scale, scale, n_k, block_k, False, None, 1)
        pick = expand_kv(exact[..., None], H)[..., 0][:, :, None, :]  # (B,H,1,NK)
        if not want_mean:
            return torch.where(pick, full, est)
        return torch.where(pick, full, est[0]), est[1]
    qamax = q_pool.abs().amax(-1, keepdim=True).clamp_min(TINY)
    q_i8 = int8_values(q_pool, qamax)
    row_scale = (qamax / 127.0) * (scale * LOG2E)  # (B,H,NQ,1)
    kb = split_blocks(k_i8.float(), block_k)  # (B,Hkv,NK,BK,D) integer values
    NK, D = kb.shape[2], kb.shape[-1]
    n_real = (n_k - torch.arange(NK, device=q_pool.device) * block_k).clamp(max=block_k)  # (NK,)
    if stride == 1:  # every key, weight 1 (no copy of the keys)
        kd = expand_kv(kb, H)
        valid = (torch.arange(block_k, device=q_pool.device) < n_real[:, None])[None, None, None]  # (1,1,1,NK,BK)
        lw = 0.0
    else:
        if top is None:
            raise ValueError(f"lse scores at stride {stride} need each key block's top key (block_top_keys)")
        top = top.long()  # the kernel's are int32
        rows = lse_key_rows(top, block_k, stride)  # (B,Hkv,NK,R)
        kd = expand_kv(kb.gather(3, rows[..., None].expand(*rows.shape, D)), H)  # (B,H,NK,R,D)
        valid = expand_kv(rows < n_real[:, None], H)[:, :, None]  # (B,H,1,NK,R)
        w = (n_real - 1).float() / ((n_real + stride - 1) // stride - 1).clamp_min(1).float()
        # log2 of each key's weight: 0 for the top key
        lw = expand_kv(torch.where(rows == top[..., None], 0.0, torch.log2(w)[:, None]), H)[:, :, None]
    s = torch.einsum("bhqd,bhjrd->bhqjr", q_i8, kd)
    ks = expand_kv(k_scale[..., None], H)[..., 0]  # (B,H,NK)
    s = s * (row_scale[..., None] * ks[:, :, None, :, None])
    s = s.masked_fill(~valid, -math.inf)
    m = s.amax(-1)
    lse = m + torch.log2(torch.exp2(s - m[..., None] + lw).sum(-1))
    if not want_mean:
        return lse
    if kbar is None:
        raise ValueError("want_mean needs the mean keys (kbar)")
    kv, kscale = kbar
    mean = (q_i8 @ expand_kv(kv[:, :, :NK].float(), H).transpose(-1, -2)) * row_scale
    return lse, mean * expand_kv(kscale[:, :, None, :NK], H)


def pooled_scores(q_pool, k_pool, k_ss, scale: float):
    """The paper's block scores in log2 units: q_pool . k_pool, with key blocks that their mean
    does not represent given no predicted mass (they are kept for every query anyway)."""
    H = q_pool.shape[1]
    scores = (q_pool @ expand_kv(k_pool, H).transpose(-1, -2)) * (scale * LOG2E)
    return scores.masked_fill(~k_ss[:, :, None, :], -math.inf)


def keep_from_scores(scores, params: SpargeParams, causal):
    """CDF, top-k or share selection of key blocks from per-row block scores (B,H,NQ,NK), log2 units.

    Ties are kept together: block j is kept when the blocks strictly more probable than it hold
    less than cdfthreshd of the mass (CDF), when it is at least as probable as the
    ceil(topk * blocks)-th one (top-k), or when its probability is at least minshare / blocks
    (share; blocks = the row's non-causal-masked key blocks). Always at least one block."""
    B, H, NQ, NK = scores.shape
    dev = scores.device
    if causal is not None:
        scores = scores.masked_fill(~causal, -math.inf)
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    prob = torch.exp2(scores - m)
    prob = prob / prob.sum(-1, keepdim=True).clamp_min(TINY)
    n_valid = causal.sum(-1).float() if causal is not None else torch.full((NQ,), float(NK), device=dev)
    if params.mode == "share":
        c = params.per_head("minshare", H, dev)[None, :, None, None]
        # p * n >= minshare rather than p >= minshare / n: the kernel computes the same product
        return (prob * n_valid[..., None] >= c) | (prob >= prob.amax(-1, keepdim=True))  # top block always
    sorted_p = torch.sort(prob, dim=-1, descending=True).values
    if params.mode == "cdf":
        tau = params.per_head("cdfthreshd", H, dev)[None, :, None, None]
        # tau >= 1 keeps every block, even where the fp32 running sum reaches 1.0 early
        keep_sorted = ((torch.cumsum(sorted_p, dim=-1) - sorted_p) < tau) | (tau >= 1.0)
    else:
        topk = params.per_head("topk", H, dev)[None, :, None]
        n_keep = torch.ceil(topk * n_valid - 1e-3).clamp_min(1)  # (1,H,NQ); the tolerance absorbs fp32 rounding
        keep_sorted = torch.arange(NK, device=dev)[None, None, None, :] < n_keep[..., None]
    keep_sorted = keep_sorted.expand(B, H, NQ, NK).clone()
    keep_sorted[..., 0] = True
    thr = torch.where(keep_sorted, sorted_p, torch.full_like(sorted_p, math.inf)).amin(-1, keepdim=True)
    return prob >= thr


def select_blocks(q_pool, q_sim, k_pool, k_sim, params: SpargeParams, scale: float, n_q: int, n_k: int,
                  block_q: int, block_k: int, block_scores=None):
    """From pooled blocks to the boolean block mask (B,H,NQ,NK): the PyTorch twin of the fused
    Triton selection kernel (kernels/select.py).

    scoring "pooled" (the paper): scores = q_pool . k_pool. scoring "lse": `block_scores` from
    block_lse_scores (log2 units); key blocks are then represented exactly, so the key-side
    similarity rule has nothing to protect and only the query-side rule applies."""
    B, H, NQ, _ = q_pool.shape
    dev = q_pool.device
    theta = params.per_head("simthreshd1", H, dev)[None, :, None]
    q_ss = q_sim > theta  # (B,H,NQ)
    k_ss = None
    if params.scoring == "lse":
        if block_scores is None:
            raise ValueError("scoring 'lse' needs block_scores")
        scores = block_scores
    else:
        k_ss = expand_kv(k_sim[..., None], H)[..., 0] > theta  # (B,H,NK)
        scores = pooled_scores(q_pool, k_pool, k_ss, scale)
    NK = scores.shape[-1]
    causal = causal_block_mask(NQ, NK, block_q, block_k, n_q, n_k, dev) if params.is_causal else None
    mask = keep_from_scores(scores, params, causal)

    mask |= ~q_ss[..., :, None]  # a query block its mean does not represent attends densely
    if k_ss is not None:
        mask |= ~k_ss[..., None, :]  # and so is such a key block attended by every query
    if params.attention_sink:
        mask[..., 0] = True
    if causal is not None:
        mask &= causal
    return mask


def fill_bias(lse, mean, mask, params: SpargeParams, n_q: int, n_k: int, block_q: int, block_k: int):
    """The per-(query block, key block) bias of the skipped-block estimate (fill_skipped), log2
    units: a row r of query block i gives skipped key block j the weight
    exp2(q_r . kbar_j + bias_ij), with bias_ij = lse_ij - mean_ij, which is exact for the pooled
    query. Kept blocks (already attended exactly) get -inf, and so do blocks that the causal
    mask does not wholly allow for the block's first row (a mean key would leak later keys)."""
    bias = (lse - mean).masked_fill(mask, -math.inf)
    if params.is_causal:
        NQ, NK = mask.shape[-2:]
        first_q = torch.arange(NQ, device=mask.device) * block_q + (n_k - n_q)
        last_k = (torch.arange(NK, device=mask.device) + 1) * block_k - 1
        bias = bias.masked_fill(last_k[None, :] > first_q[:, None], -math.inf)
    return bias


def mean_keys_i8(k_smooth, block_k: int):
    """Every key block's mean of the smoothed keys (B,Hkv,Nk,D) in int8 with one scale per mean:
    (the int8 values as fp32 (B,Hkv,NK,D), the scales (B,Hkv,NK))."""
    cnt = block_token_counts(k_smooth.shape[2], block_k, k_smooth.device)[:, None]
    kbar = split_blocks(k_smooth.float(), block_k).sum(-2) / cnt
    amax = kbar.abs().amax(-1, keepdim=True).clamp_min(TINY)
    return int8_values(kbar, amax), (amax / 127.0)[..., 0]


def block_means(k, v, block_k: int, pv_dtype: str, kbar=None):
    """The estimate's mean key and mean value of every key block, (B, Hkv, NK, D) each, as the
    kernel sees them: the smoothed K's mean in int8 with one scale per mean (mean_keys_i8), and
    the mean of V over its per-channel scale (the units P.V accumulates in), rounded like V (fp8
    or fp16). kbar: mean_keys_i8's answer for k, where the caller has it already."""
    n = k.shape[2]
    cnt = block_token_counts(n, block_k, k.device)[:, None]
    kv, kscale = mean_keys_i8(smooth_k(k.float()), block_k) if kbar is None else kbar
    kbar = kv * kscale[..., None]
    vs, _ = quantize_v(v, "fp32")  # v times its scale's reciprocal, unrounded
    vbar = split_blocks(vs, block_k).sum(-2) / cnt
    if pv_dtype == "fp8":
        vbar = vbar.to(torch.float8_e4m3fn).float()
    elif pv_dtype == "fp16":
        vbar = vbar.half().float()
    return kbar, vbar


FILL_VAR_GROUPS = 16  # the second-order term's channel groups: one fp16 tensor-core k-step in the kernel


def padded_head_dim(D: int) -> int:
    """The head dim the kernels work in: q, k and v are zero padded to it (the true scale is kept)."""
    return 64 if D <= 64 else 128


def channel_groups(x, mean: bool):
    """(..., D) -> (..., FILL_VAR_GROUPS): x zero padded to the kernels' head dim and summed (or
    averaged) over groups of that many contiguous channels (8 at head dim 128, 4 at 64)."""
    hd = padded_head_dim(x.shape[-1])
    x = torch.nn.functional.pad(x, (0, hd - x.shape[-1]))
    g = x.view(*x.shape[:-1], FILL_VAR_GROUPS, hd // FILL_VAR_GROUPS)
    return g.mean(-1) if mean else g.sum(-1)


def key_variances(k, block_k: int, k_smooth=None):
    """Every key block's channel variances of the smoothed keys over its real tokens, summed in
    FILL_VAR_GROUPS groups of contiguous channels (B, Hkv, NK, FILL_VAR_GROUPS): a group's mean
    of squares less its channels' squared means, in fp32 (as K's quantizer sums them: its squares
    summed by group before the rows, 16 sums across threads instead of 128), held at >= 0, then
    rounded to fp16 like the kernel's copy (held below fp16's largest value): the second-order
    term of the skipped-block estimate (fill_logits)."""
    ks = smooth_k(k.float()) if k_smooth is None else k_smooth
    cnt = block_token_counts(ks.shape[2], block_k, ks.device)[:, None]
    xb = split_blocks(ks, block_k)
    mean = xb.sum(-2) / cnt
    var = channel_groups((xb * xb).sum(-2), mean=False) / cnt - channel_groups(mean * mean, mean=False)
    return var.clamp(0.0, 65504.0).to(torch.float16).float()


FILL_ORDER2_CLAMP = 2.0  # log2 units: the second-order term moves a block's weight by 4x at most


def fill_logits(q_i8, q_scale, kbar, kvar, bias, n_rows):
    """The skipped-block estimate's score of every row against every key block's mean key, log2
    units: q_i8 (..., NQ, BQ, D) the int8 query rows (as floats; zeros past the real rows) and
    q_scale (..., NQ) their scales in log2 units, kbar (..., NK, D) the mean keys, kvar (..., NK,
    FILL_VAR_GROUPS) the keys' grouped variances (key_variances), bias (..., NQ, NK) from
    fill_bias, n_rows (NQ,) the real rows of each query block.

    The weight 2^(q . kbar + bias) is exact for the block's pooled query and first order in the
    row's distance from it. The cumulant expansion of a block's scores s = q . k,
        log2 sum_k 2^s = log2 n + q . kbar + (ln 2 / 2) q^T Sigma q + ...,
    gives the second-order term a row misses: (ln 2 / 2) (q^T Sigma q - qbar^T Sigma qbar), here
    with Sigma's diagonal and qbar the mean of the block's int8 rows (the kernel has them at hand),
    the channels taken in FILL_VAR_GROUPS groups: each group's mean of (q^2 - qbar^2) times the
    term's factor (ln 2 / 2 and the squared scale; fp32, rounded to fp16) against the group's
    summed variance (kvar). That
    is one 16-deep product per skipped block, an eighth of the whole diagonal's at head dim 128
    (whose row operand alone held 32 registers a thread and made the kernel spill). It is held
    within +-FILL_ORDER2_CLAMP through its operands (capped variances: the kernel adds the product
    straight into the scores' tile). On query rows spread around their pooled query the whole
    diagonal cut the density needed for rel-L1 0.05 by ~30%, the groups of 8 nearly as much
    (bench/fill_order2_study.py, NOTES v42, v43); the full Sigma overshoots (the expansion's higher
    terms), the diagonal does not."""
    qbar = q_i8.sum(-2, keepdim=True) / n_rows.to(q_i8.dtype)[:, None, None]
    c2 = 0.5 * math.log(2.0) * q_scale * q_scale
    # the kernel's operand: the groups' means times the term's factor, in fp16
    d2 = (channel_groups(q_i8 * q_i8 - qbar * qbar, mean=True) * c2[..., None, None]).to(torch.float16).float()
    # the bound, through the operands: each query block caps its key blocks' group variances at
    # clamp over its real rows' largest sum of |d2|, so that no row's term passes +-clamp
    real = torch.arange(q_i8.shape[-2], device=q_i8.device) < n_rows[:, None]  # (NQ, BQ)
    s_max = (d2.abs().sum(-1) * real).amax(-1)  # (..., NQ)
    cap = (FILL_ORDER2_CLAMP / s_max.clamp_min(1e-30)).clamp(max=65504.0).to(torch.float16).float()
    kv = torch.minimum(kvar[..., None, :, :], cap[..., None, None])  # (..., NQ, NK, G)
    t = (q_i8 @ kbar[..., None, :, :].transpose(-1, -2)) * q_scale[..., None, None] + bias[..., None, :]
    return t + d2 @ kv.transpose(-1, -2)


def lse_stage1(q_pool, k, block_k: int, scale: float):
    """The lse scores and mean scores (block_lse_scores, log2 units) of the pooled queries
    against the smoothed int8 keys (B,Hkv,Nk,D), as stage 1 computes them."""
    ksm = smooth_k(k.float())
    k_i8, k_scale = quantize_int8_per_block(ksm, block_k)
    return block_lse_scores(q_pool, k_i8, k_scale, scale, k.shape[2], block_k, want_mean=True,
                            kbar=mean_keys_i8(ksm, block_k), **lse_sampling(ksm, block_k))


def predict_block_mask(q, k, params: SpargeParams, block_q: int, block_k: int, scale: float | None = None,
                       return_fill: bool = False):
    """Stage 1 on un-quantized inputs (B,H,N,D); k may have fewer (GQA) heads.
    return_fill (lse scoring): also return the fill_skipped bias (see fill_bias)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qp, qs = pool_and_similarity(q, block_q)
    if params.scoring == "lse":
        scores, mean = lse_stage1(qp, k, block_k, scale)
        mask = select_blocks(qp, qs, None, None, params, scale, q.shape[2], k.shape[2], block_q, block_k, scores)
        if return_fill:
            return mask, fill_bias(scores, mean, mask, params, q.shape[2], k.shape[2], block_q, block_k)
        return mask
    if return_fill:
        raise ValueError("the fill_skipped estimate needs lse scoring")
    kp, ks = pool_and_similarity(smooth_k(k.float()), block_k)
    return select_blocks(qp, qs, kp, ks, params, scale, q.shape[2], k.shape[2], block_q, block_k)
