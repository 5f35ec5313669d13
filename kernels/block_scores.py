"""Stage-1 "lse" scoring: for each pooled query and each key block, log2 sum_j exp2(q_pool . k_j)
over the block's keys. Costs about 1/BLOCK_M of dense attention and reads only the int8 keys."""
import torch
import triton
import triton.language as tl

from .fp8 import INTERPRET


@triton.jit
def _block_lse_kernel(QP, K, KS, OUT, sqp_b, sqp_h, sqp_r, sk_b, sk_h, sk_n, sks_b, sks_h, so_b, so_h, so_r,
                      NR, N_K, NKB, H, KV_GROUP, scale_log2,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
                      DOT_FP32: tl.constexpr):
    pid_r = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // KV_GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qp = tl.load(QP + b * sqp_b + h * sqp_h + offs_r[:, None] * sqp_r + offs_d[None, :],
                 mask=(offs_r < NR)[:, None] & (offs_d < D_TRUE)[None, :], other=0.0)
    qp = qp.to(tl.bfloat16)
    if DOT_FP32:  # the CPU interpreter cannot do bf16 dots: same values, fp32 arithmetic
        qp = qp.to(tl.float32)
    k_ptrs = K + b * sk_b + hk * sk_h + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None]
    out_ptrs = OUT + b * so_b + h * so_h + offs_r * so_r
    for kb in range(0, NKB):
        k = tl.load(k_ptrs + kb * BLOCK_N * sk_n)  # int8, padded to whole blocks (offset < 2^31 within a head)
        if DOT_FP32:
            k = k.to(tl.float32)
        else:
            k = k.to(tl.bfloat16)  # exact: |k| <= 127
        s = tl.dot(qp, k) * (tl.load(KS + b * sks_b + hk * sks_h + kb) * scale_log2)
        s = tl.where((kb * BLOCK_N + offs_n < N_K)[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        lse = m + tl.math.log2(tl.sum(tl.math.exp2(s - m[:, None]), 1))
        tl.store(out_ptrs + kb, lse, mask=offs_r < NR)


def block_lse_scores(q_pool: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, scale: float,
                     n_k: int, block_k: int) -> torch.Tensor:
    """q_pool (B,H,NQ,D) fp32, k_i8 (B,Hkv,NK*block_k,HD) int8 smoothed keys, k_scale (B,Hkv,NK).
    Returns (B,H,NQ,NK) fp32 in log2 units."""
    B, H, NQ, D = q_pool.shape
    Hkv, n_pad, hd = k_i8.shape[1:]
    if k_i8.dtype != torch.int8 or n_pad % block_k or H % Hkv or hd < D:
        raise ValueError("block_lse_scores wants int8 keys padded to whole blocks and matching heads")
    nkb = n_pad // block_k
    if k_scale.shape != (B, Hkv, nkb):
        raise ValueError(f"k_scale must be (B, Hkv, {nkb})")
    q_pool = q_pool.float().contiguous()
    out = torch.empty(B, H, NQ, nkb, dtype=torch.float32, device=q_pool.device)
    block_r = 64
    _block_lse_kernel[(triton.cdiv(NQ, block_r), B * H)](
        q_pool, k_i8, k_scale, out, q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_i8.stride(0), k_i8.stride(1), k_i8.stride(2), k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2), NQ, n_k, nkb, H, H // Hkv, scale * 1.4426950408889634,
        BLOCK_R=block_r, BLOCK_N=block_k, HEAD_DIM=hd, D_TRUE=D, DOT_FP32=INTERPRET, num_warps=4, num_stages=3,
    )
    return out
