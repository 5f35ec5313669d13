"""The skipped-block estimate's split columns, in plain PyTorch (NOTES v71; off unless a caller
asks: measured as a prototype first, bench/fill_split_proto.py).

fill_skipped gives every skipped key block one key in a row's softmax: its mean key and value
(reference_predict.fill_logits). Most of what that estimate gets wrong sits in the few skipped
blocks of most mass, just below the selection's threshold. Split columns give each query block's
m skipped blocks of highest stage-1 score two keys instead of one: the means of their two halves
(block_k / 2 keys each), their own variances and biases. On the CPU study's regimes (none of them
the presets' tuning inputs) m = 32 cut the density that rel-L1 0.05 needs by ~23% at Wan 480p and
~21% on a HunyuanVideo-like mix with text (bench/fill_group_study.py); the other direction, one
key for a group of blocks, raised it by 25%.

A half's bias needs no lse of its own from stage 1: the cumulant expansion of the halves' scores
for the pooled query (log2 n + qp . kbar + (ln 2 / 2) sum_g mean_g(qp^2) var_g, the grouped
variances of fill_logits' second-order term) splits the parent block's stage-1 lse between its two
halves, and the two halves' weights for the pooled query sum to the parent's exactly (as the one
key's did). On the study's regimes that matched halves with exact lses (density 0.0262 against
0.0265 at Wan 480p)."""
from __future__ import annotations

import math

import torch

from .blockmask import num_blocks
from .reference_predict import block_means, channel_groups, key_variances, mean_keys_i8
from .reference_quant import block_token_counts, expand_kv, smooth_k

LN2 = math.log(2.0)


def half_tables(k, v, block_k: int, pv_dtype: str, k_smooth=None):
    """Every key block's two halves (block_k // 2 keys each) as the estimate sees a block
    (reference_predict.block_means and key_variances at half the block), half 2j + h of block j:
    (kbar (B,Hkv,2*NK,D) int8 values times their scales, kvar (B,Hkv,2*NK,FILL_VAR_GROUPS), vbar
    (B,Hkv,2*NK,D) in V's rounding, counts (2*NK,) keys per half). A last block of at most half a
    block has an empty second half: zeros, count 0."""
    n = k.shape[2]
    half = block_k // 2
    ks = smooth_k(k.float()) if k_smooth is None else k_smooth
    kbar, vbar = block_means(k, v, half, pv_dtype, mean_keys_i8(ks, half))
    kvar = key_variances(k, half, k_smooth=ks)
    nh = 2 * num_blocks(n, block_k)
    pad = nh - kbar.shape[2]
    counts = torch.nn.functional.pad(block_token_counts(n, half, k.device), (0, pad))
    kbar, kvar, vbar = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (kbar, kvar, vbar))
    return kbar, kvar, vbar, counts


def half_biases(lse, q_pool, kbar_h, kvar_h, counts_h):
    """Every half's bias (B,H,NQ,2*NK), log2 units: the parent's stage-1 lse (B,H,NQ,NK) split by
    the halves' cumulant expansion for the pooled query q_pool (B,H,NQ,D, in the scores' log2
    units). The bias of half a is o_a + lse_j - log2(2^c_a + 2^c_b), c = qp . kbar + o and
    o = log2 n + (ln 2 / 2) sum_g mean_g(qp^2) var_g: a row r then weighs it 2^(q_r . kbar_a +
    bias_a), the fill's form, and the pooled query weighs the two halves 2^lse_j together. kbar_h,
    kvar_h: (B,H,2*NK,...) (half_tables, expanded to the query heads); an empty half gets -inf."""
    o = torch.log2(counts_h) + 0.5 * LN2 * (channel_groups(q_pool * q_pool, mean=True) @ kvar_h.transpose(-1, -2))
    c = q_pool @ kbar_h.transpose(-1, -2) + o  # (B,H,NQ,2NK); -inf for an empty half
    pair = torch.logsumexp(c.unflatten(-1, (-1, 2)) * LN2, -1) / LN2  # (B,H,NQ,NK)
    return o + (lse - pair).repeat_interleave(2, -1)


def split_columns(lse, bias, half_bias, m: int):
    """Each query block's m skipped blocks of highest stage-1 score (lse (B,H,NQ,NK)) among those
    the fill counts (finite `bias`, reference_predict.fill_bias), as their halves: (the bias with
    those blocks at -inf, idx (B,H,NQ,2m) int64 the halves' columns (2j, 2j + 1 per block, in the
    order of the blocks' scores), their biases (B,H,NQ,2m) from half_bias (half_biases); -inf where
    a query block has fewer than m such blocks, at index 0)."""
    m = min(m, lse.shape[-1])
    cand = lse.masked_fill(torch.isinf(bias), -math.inf)
    top, j = cand.topk(m, -1)
    ok = top > -math.inf
    j = torch.where(ok, j, 0)
    idx = torch.stack([2 * j, 2 * j + 1], -1).flatten(-2)
    sbias = half_bias.gather(-1, idx).masked_fill(~ok.repeat_interleave(2, -1), -math.inf)
    bias = bias.scatter(-1, j, torch.where(ok, -math.inf, bias.gather(-1, j)))
    return bias, idx, sbias


def predict_split(q, k, v, lse, bias, m: int, block_q: int, block_k: int, pv_dtype: str, scale: float | None = None):
    """The reference pipeline's split columns: the pooled queries of q (B,H,N,D) in the scores'
    units, the halves of k and v, then split_columns over stage 1's lse and the fill's bias.
    Returns (bias, idx, sbias) as split_columns."""
    from .reference_predict import pool_and_similarity
    from .reference_quant import LOG2E

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    H = q.shape[1]
    qp = pool_and_similarity(q, block_q)[0].float() * (scale * LOG2E)
    kbar, kvar, _, counts = half_tables(k, v, block_k, pv_dtype)
    hb = half_biases(lse, qp, expand_kv(kbar, H), expand_kv(kvar, H), counts)
    return split_columns(lse, bias, hb, m)
