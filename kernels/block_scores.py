"""Stage-1 "lse" scoring: for each pooled query and each key block, log2 sum_j exp2(q_pool . k_j)
over the block's keys. About 1/BLOCK_M of dense attention's work, on int8 tensor cores."""
import torch
import triton
import triton.language as tl

from .config import Launch, helper_launch
from .host_math import cdiv, next_pow2
from .launch import Kernel
from .numerics import MAGIC_F, batch_head, int32_bits_f32, round_half_away


@triton.jit
def _block_lse(q_i8, k_ptrs, sk_n, row_scale, ks, kb, offs_n, N_K, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr,
               WANT_MEAN: tl.constexpr):
    """log2 sum_j exp2(score_j) over one key block, per row (and the mean score, when wanted),
    score_j = dot_j * c with c = row_scale * ks (ks: this key block's scale). As in the attention
    kernel, the row max works on the raw float bits f_j = dot_j + MAGIC_F of (dot + MAGIC_I);
    f_j - f_max is exact (both in [2^23, 2^24)), so each score keeps full fp32 precision.
    row_scale (per row, loop-invariant) and ks stay apart so that the row scale enters the scores'
    layout once (see the caller)."""
    k = tl.load(k_ptrs + kb * BLOCK_N * sk_n)  # int8, padded to whole blocks (offset < 2^31 within a head)
    dot = tl.dot(q_i8, k)
    s = int32_bits_f32(dot)
    c = row_scale * ks
    mean = tl.zeros_like(c)
    if WANT_MEAN:  # padded keys are zero: their dots add nothing to the sum
        n_real = tl.minimum(N_K - kb * BLOCK_N, BLOCK_N).to(tl.float32)
        # summed as int32 (|sum| <= 128 * 2^21 < 2^31), exact, and one conversion per row
        # instead of one per score on the 16-per-clock conversion unit
        mean = tl.sum(dot, 1).to(tl.float32) * c / n_real
    if MASK_KEYS:
        s = tl.where((kb * BLOCK_N + offs_n < N_K)[None, :], s, float("-inf"))
    f_max = tl.max(s, 1)
    p = tl.math.exp2((s - f_max[:, None]) * c[:, None])
    return (f_max - MAGIC_F) * c + tl.math.log2(tl.sum(p, 1)), mean


@triton.jit
def _into_tile(lse_t, mean_t, lse, mean, cols, j, WANT_MEAN: tl.constexpr):
    """Column j of the result tiles <- one key block's per-row results."""
    hit = (cols == j)[None, :]
    lse_t = tl.where(hit, lse[:, None], lse_t)
    if WANT_MEAN:
        mean_t = tl.where(hit, mean[:, None], mean_t)
    return lse_t, mean_t


@triton.jit
def _block_lse_kernel(QP, K, KS, OUT, MEAN, sqp_b, sqp_h, sqp_r, sk_b, sk_h, sk_n, sks_b, sks_h, so_b, so_h, so_r,
                      NR, N_K, NKB, H, KV_GROUP, scale_log2,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
                      KB_TILE: tl.constexpr, WANT_MEAN: tl.constexpr):
    """One program: BLOCK_R pooled queries against KB_TILE consecutive key blocks. The per-row
    results collect in a (BLOCK_R, KB_TILE) register tile, stored once at the end: a store per
    block would move each row's value through shared memory (the dot's row layout is not the
    store's) behind two barriers, every block."""
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
    # the row scale into the scores' layout once, here: added to a zero row of the same dot's
    # layout, it is computed in that layout (left alone, the compiler multiplies it by each block's
    # scale first and moves the product through shared memory behind a barrier, every block)
    zero = tl.dot(q_i8, tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.int8))
    row_scale = row_scale + tl.max(zero, 1).to(tl.float32)
    k_ptrs = K + b * sk_b + hk * sk_h + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None]
    ks_ptr = KS + b * sks_b + hk * sks_h
    kb0 = pid_c * KB_TILE
    kb1 = tl.minimum(kb0 + KB_TILE, NKB)
    cols = tl.arange(0, KB_TILE)
    lse_t = tl.zeros([BLOCK_R, KB_TILE], dtype=tl.float32)
    mean_t = tl.zeros([BLOCK_R, KB_TILE], dtype=tl.float32)
    # only the last key block of the sequence can be partial: run the others without a mask
    kb_full = tl.minimum(kb1, N_K // BLOCK_N)
    ks_next = tl.load(ks_ptr + kb0)
    for kb in range(kb0, kb_full):
        ks = ks_next
        ks_next = tl.load(ks_ptr + tl.minimum(kb + 1, NKB - 1))  # a block ahead: its latency hides behind this one
        lse, mean = _block_lse(q_i8, k_ptrs, sk_n, row_scale, ks, kb, offs_n, N_K, BLOCK_N, False, WANT_MEAN)
        lse_t, mean_t = _into_tile(lse_t, mean_t, lse, mean, cols, kb - kb0, WANT_MEAN)
    if kb_full < kb1:
        lse, mean = _block_lse(q_i8, k_ptrs, sk_n, row_scale, tl.load(ks_ptr + kb_full), kb_full, offs_n, N_K,
                               BLOCK_N, True, WANT_MEAN)
        lse_t, mean_t = _into_tile(lse_t, mean_t, lse, mean, cols, kb_full - kb0, WANT_MEAN)
    offs = b * so_b + h * so_h + offs_r[:, None] * so_r + (kb0 + cols)[None, :]
    ok = (offs_r < NR)[:, None] & (kb0 + cols < kb1)[None, :]
    tl.store(OUT + offs, lse_t, mask=ok)
    if WANT_MEAN:
        tl.store(MEAN + offs, mean_t, mask=ok)


_block_lse_launch = Kernel(_block_lse_kernel)


def block_lse_scores(q_pool: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, scale: float,
                     n_k: int, block_k: int, want_mean: bool = False, launch: Launch | None = None):
    """q_pool (B,H,NQ,D) fp32, k_i8 (B,Hkv,NK*block_k,HD) int8 smoothed keys, k_scale (B,Hkv,NK).
    Returns (B,H,NQ,NK) fp32 in log2 units; with want_mean also the mean score over each block's
    real keys (same shape and units). `launch`: tile rows, warps, stages and programs (speed only)."""
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
    launch = launch or helper_launch("block_lse", q_pool.device)
    block_r = launch.block or 64
    row_tiles = cdiv(NQ, block_r)
    # key blocks per program: the most (up to launch.tile) that still make about launch.programs
    # programs, so that small grids fill every SM; a power of two (the width of the result tile)
    kb_tile = max(8, next_pow2(launch.tile))
    while kb_tile > 8 and row_tiles * B * H * cdiv(nkb, kb_tile) < launch.programs:
        kb_tile //= 2
    grid = (row_tiles, cdiv(nkb, kb_tile), B * H)
    _block_lse_launch[grid](
        q_pool, k_i8, k_scale, out, mean, q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_i8.stride(0), k_i8.stride(1), k_i8.stride(2), k_scale.stride(0), k_scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2), NQ, n_k, nkb, H, H // Hkv, scale * 1.4426950408889634,
        BLOCK_R=block_r, BLOCK_N=block_k, HEAD_DIM=hd, D_TRUE=D, KB_TILE=kb_tile, WANT_MEAN=want_mean,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
        **({"maxnreg": launch.maxnreg} if launch.maxnreg else {}),
    )
    return (out, mean) if want_mean else out
