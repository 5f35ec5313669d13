"""The whole SpargeAttn method in plain PyTorch (fp32 math, any device).

This is the specification the Triton kernels are tested against, so it models their
arithmetic exactly: the same int8 rounding, the same fp8/fp16 P.V rounding, the same block
visiting order and the same P.V skip rule. It is written for clarity, not speed. Step 0
(quantization) is in reference_quant.py, stage 1 (prediction) in reference_predict.py; this
module holds stage 2 (sparse attention over a block mask) and the call (sparge_reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .blockmask import num_blocks
from .params import SpargeParams
from .reference_predict import block_means, fill_logits, key_variances, mean_keys_i8, predict_block_mask
from .reference_quant import (
    LOG2E,
    TINY,
    block_token_counts,
    expand_kv,
    key_mean,
    quantize_int8_per_block,
    quantize_v,
    round_p,
    smooth_k,
    split_blocks,
)


def row_lse(m, l, q, k_mean, scale: float):
    """Each query row's log-sum-exp in natural-log units of the scaled scores, the logsumexp that
    flash attention returns: log sum_j exp(scale * q . k_j) over what the row summed.

    m, l: the online softmax's running max and denominator per query block and row (B,H,NQ,BQ),
    log2 units, l = sum_j 2^(s_j - m) (without the kernel's 2^8 P pre-scale), so
    log2 sum = m + log2 l. The scores s were taken against smoothed keys k_j - key_mean(k): adding
    back scale * q . key_mean(k) makes the value independent of the smoothing, so the lse of two key
    shards (each smoothed by its own vector) merge. That shift uses the un-quantized q (B,H,N,D) in fp32:
    int8 q's rounding cancels in the softmax but would not here (q . mean(k) can be large).
    A row that summed nothing: -inf. Returns (B,H,N)."""
    N = q.shape[2]
    shift = (q.float() @ k_mean[..., None])[..., 0] * scale
    lse2 = torch.where(l > 0, m + torch.log2(l.clamp_min(TINY)), torch.full_like(l, -math.inf))
    return lse2.flatten(2, 3)[:, :, :N] / LOG2E + shift


def sparse_attention_reference(q, k, v, mask, params: SpargeParams, block_q: int, block_k: int,
                               scale: float | None = None, pv_dtype: str = "fp8", fill=None,
                               return_lse: bool = False):
    """Sparse, quantized attention over the kept blocks of `mask` (B,H,NQ,NK), with P.V skipping.
    fill: the fill_skipped bias (B,H,NQ,NK) from fill_bias: after the kept blocks, every key
    block with a finite bias joins the softmax as one key (its mean key and mean value, scored by
    reference_predict.fill_logits).

    Returns (out in q.dtype (B,H,N,D), pv_skipped per query block (B,H,NQ) int64), and with
    return_lse a third item: the float32 (B,H,N) log-sum-exp the output was normalized by (row_lse)."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    dev = q.device
    scale = D ** -0.5 if scale is None else scale
    NQ, NK = num_blocks(N, block_q), num_blocks(Nk, block_k)

    qq, qscale = quantize_int8_per_block(q, block_q)
    ksm = smooth_k(k.float())
    kq, kscale = quantize_int8_per_block(ksm, block_k)
    # scores come out in log2 units so the softmax can use exp2
    qd = split_blocks(qq.float(), block_q) * (qscale * (scale * LOG2E))[..., None, None]  # (B,H,NQ,BQ,D)
    kd = expand_kv(split_blocks(kq.float(), block_k) * kscale[..., None, None], H)  # (B,H,NK,BK,D)
    vq, vscale = quantize_v(v, pv_dtype)
    vd = expand_kv(split_blocks(vq, block_k), H)
    vscale = expand_kv(vscale[:, :, None, :], H)[:, :, 0]

    q_pos = torch.arange(NQ * block_q, device=dev).view(NQ, block_q)
    row_valid = q_pos < N
    lam = params.per_head("pvthreshd", H, dev)[None, :, None, None]

    m = torch.full((B, H, NQ, block_q), -math.inf, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, H, NQ, block_q, D, device=dev)
    skipped = torch.zeros(B, H, NQ, dtype=torch.int64, device=dev)
    for j in range(NK):  # ascending, like the kernel's index lists
        keep = mask[..., j]
        if not keep.any():
            continue
        k_pos = j * block_k + torch.arange(block_k, device=dev)
        s = torch.einsum("bhqid,bhjd->bhqij", qd, kd[:, :, j])
        invalid = (k_pos >= Nk)[None, None, :]
        if params.is_causal:
            invalid = invalid | (k_pos[None, None, :] > q_pos[:, :, None] + (Nk - N))
        s = s.masked_fill(invalid, -math.inf)
        m_loc = s.amax(-1)
        # skip P.V when no (real) row of the tile gains anything from this block
        row_needs = ((m_loc - m) >= -lam) & row_valid
        do = keep & row_needs.any(-1)
        skipped += (keep & ~do).long()

        m_new = torch.where(do[..., None], torch.maximum(m, m_loc), m)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(s - m_safe[..., None])
        pv = round_p(p, pv_dtype) @ vd[:, :, j, None]
        upd = do[..., None]
        l = torch.where(upd, l * alpha + p.sum(-1), l)
        acc = torch.where(upd[..., None], acc * alpha[..., None] + pv, acc)
        m = m_new
    if fill is not None:
        # the kernel's last step: one more online-softmax update over the block means, P rounded like the main P
        kbar, vbar = (expand_kv(x, H) for x in block_means(k, v, block_k, pv_dtype, mean_keys_i8(ksm, block_k)))
        kvar = expand_kv(key_variances(k, block_k, k_smooth=ksm), H)
        t = fill_logits(split_blocks(qq.float(), block_q), qscale * (scale * LOG2E), kbar, kvar, fill,
                        block_token_counts(N, block_q, dev))  # (B,H,NQ,BQ,NK) log2 units
        m_new = torch.maximum(m, t.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - m_safe)
        p = torch.exp2(t - m_safe[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + round_p(p, pv_dtype) @ vbar[:, :, None]
        m = m_new
    out = acc / l.clamp_min(TINY)[..., None] * vscale[:, :, None, None, :]
    out = out.flatten(2, 3)[:, :, :N]
    if return_lse:
        lse = row_lse(m, l, q, expand_kv(key_mean(k.float()), H)[:, :, 0], scale)
        return out.to(q.dtype), skipped, lse
    return out.to(q.dtype), skipped


def dense_attention(q, k, v, scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """Exact attention in fp32 (the truth for error measurements)."""
    H = q.shape[1]
    out = F.scaled_dot_product_attention(
        q.float(), expand_kv(k.float(), H), expand_kv(v.float(), H), is_causal=is_causal, scale=scale
    )
    return out.to(q.dtype)


def sparge_reference(q, k, v, params: SpargeParams, block_q: int, block_k: int, scale=None, pv_dtype="fp8", mask=None,
                     return_lse: bool = False):
    """Stage 1 + stage 2. Returns (out, mask, pv_skipped), and the rows' lse (row_lse) as a fourth
    item with return_lse. fill_skipped applies to predicted masks."""
    fill = None
    if mask is None and params.fill_skipped:
        mask, fill = predict_block_mask(q, k, params, block_q, block_k, scale, return_fill=True)
    elif mask is None:
        mask = predict_block_mask(q, k, params, block_q, block_k, scale)
    res = sparse_attention_reference(q, k, v, mask, params, block_q, block_k, scale, pv_dtype, fill, return_lse)
    return (res[0], mask) + tuple(res[1:])
