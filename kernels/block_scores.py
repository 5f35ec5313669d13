"""Stage-1 "lse" scoring: for each pooled query and each key block, log2 sum_j exp2(q_pool . k_j)
over the block's keys. About 1/BLOCK_M of dense attention's work, on int8 tensor cores."""
import torch
import triton
import triton.language as tl

from .host_math import cdiv
from .numerics import MAGIC_F, batch_head, int32_bits_f32, round_half_away


@triton.jit
def _block_lse(q_i8, k_ptrs, sk_n, row_scale, kb, offs_n, N_K, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr,
               WANT_MEAN: tl.constexpr):
    """log2 sum_j exp2(score_j) over one key block, per row (and the mean score, when wanted). As
    in the attention kernel, the row max works on the raw float bits of (dot + MAGIC_I); unlike
    there, MAGIC_F is subtracted exactly before scaling, so the scores keep full fp32 precision."""
    k = tl.load(k_ptrs + kb * BLOCK_N * sk_n)  # int8, padded to whole blocks (offset < 2^31 within a head)
    dot = tl.dot(q_i8, k)
    s = int32_bits_f32(dot)
    mean = tl.zeros_like(row_scale)
    if WANT_MEAN:  # padded keys are zero: their dots add nothing to the sum
        n_real = tl.minimum(N_K - kb * BLOCK_N, BLOCK_N).to(tl.float32)
        # summed as int32 (|sum| <= 128 * 2^21 < 2^31), exact, and one conversion per row
        # instead of one per score on the 16-per-clock conversion unit
        mean = tl.sum(dot, 1).to(tl.float32) * row_scale / n_real
    if MASK_KEYS:
        s = tl.where((kb * BLOCK_N + offs_n < N_K)[None, :], s, float("-inf"))
    m = (tl.max(s, 1) - MAGIC_F) * row_scale
    p = tl.math.exp2((s - MAGIC_F) * row_scale[:, None] - m[:, None])
    return m + tl.math.log2(tl.sum(p, 1)), mean


@triton.jit
def _block_lse_kernel(QP, K, KS, OUT, MEAN, sqp_b, sqp_h, sqp_r, sk_b, sk_h, sk_n, sks_b, sks_h, so_b, so_h, so_r,
                      NR, N_K, NKB, KB_PER_PROG, H, KV_GROUP, scale_log2,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
                      WANT_MEAN: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    bh = tl.program_id(2)
    b, h = batch_head(bh, H)
    hk = h // KV_GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qp = tl.load(QP + b * sqp_b + h * sqp_h + offs_r[:, None] * sqp_r + offs_d[None, :],
                 mask=(offs_r < NR)[:, None] & (offs_d < D_TRUE)[None, :], other=0.0)
    # pooled queries to int8, one scale per row (round half away from zero, like the quantizer)
    qamax = tl.maximum(tl.max(tl.abs(qp), 1), 1e-20)
    qs = qp * (127.0 / qamax)[:, None]
    q_i8 = round_half_away(qs).to(tl.int8)
    row_scale = qamax / 127.0 * scale_log2
    k_ptrs = K + b * sk_b + hk * sk_h + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None]
    out_ptrs = OUT + b * so_b + h * so_h + offs_r * so_r
    mean_ptrs = MEAN + b * so_b + h * so_h + offs_r * so_r  # same layout as OUT
    kb0 = pid_c * KB_PER_PROG
    kb1 = tl.minimum(kb0 + KB_PER_PROG, NKB)
    # only the last key block of the sequence can be partial: run the others without a mask
    kb_full = tl.minimum(kb1, N_K // BLOCK_N)
    for kb in range(kb0, kb_full):
        lse, mean = _block_lse(q_i8, k_ptrs, sk_n, row_scale * tl.load(KS + b * sks_b + hk * sks_h + kb), kb, offs_n,
                               N_K, BLOCK_N, False, WANT_MEAN)
        tl.store(out_ptrs + kb, lse, mask=offs_r < NR)
        if WANT_MEAN:
            tl.store(mean_ptrs + kb, mean, mask=offs_r < NR)
    if kb_full < kb1:
        lse, mean = _block_lse(q_i8, k_ptrs, sk_n, row_scale * tl.load(KS + b * sks_b + hk * sks_h + kb_full), kb_full,
                               offs_n, N_K, BLOCK_N, True, WANT_MEAN)
        tl.store(out_ptrs + kb_full, lse, mask=offs_r < NR)
        if WANT_MEAN:
            tl.store(mean_ptrs + kb_full, mean, mask=offs_r < NR)


def block_lse_scores(q_pool: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, scale: float,
                     n_k: int, block_k: int, want_mean: bool = False):
    """q_pool (B,H,NQ,D) fp32, k_i8 (B,Hkv,NK*block_k,HD) int8 smoothed keys, k_scale (B,Hkv,NK).
    Returns (B,H,NQ,NK) fp32 in log2 units; with want_mean also the mean score over each block's
    real keys (same shape and units)."""
    B, H, NQ, D = q_pool.shape
    Hkv, n_pad, hd = k_i8.shape[1:]
    if k_i8.dtype != torch.int8 or n_pad % block_k or H % Hkv or hd < D:
        raise ValueError("block_lse_scores wants int8 keys padded to whole blocks and matching heads")
    nkb = n_pad // block_k
    if k_scale.shape != (B, Hkv, nkb):
        raise ValueError(f"k_scale must be (B, Hkv, {nkb})")
    q_pool = q_pool.float().contiguous()
    out = torch.empty(B, H, NQ, nkb, dtype=torch.float32, device=q_pool.device)
    mean = torch.empty_like(out) if want_mean else out
    block_r = 64
    row_tiles = cdiv(NQ, block_r)
    # split the key blocks over programs so that small grids still fill every SM
    chunks = max(1, min(nkb, cdiv(1024, row_tiles * B * H)))
    per_prog = cdiv(nkb, chunks)
    grid = (row_tiles, cdiv(nkb, per_prog), B * H)
    _block_lse_kernel[grid](
        q_pool, k_i8, k_scale, out, mean, q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_i8.stride(0), k_i8.stride(1), k_i8.stride(2), k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2), NQ, n_k, nkb, per_prog, H, H // Hkv, scale * 1.4426950408889634,
        BLOCK_R=block_r, BLOCK_N=block_k, HEAD_DIM=hd, D_TRUE=D, WANT_MEAN=want_mean, num_warps=4, num_stages=3,
    )
    return (out, mean) if want_mean else out
