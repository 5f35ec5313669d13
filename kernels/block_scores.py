"""Stage-1 "lse" scoring: for each pooled query and each key block, log2 sum_j exp2(q_pool . k_j)
over the block's keys, estimated from every key_stride-th key and the block's largest-norm one
(sparge_core.reference_predict.block_lse_scores). About 1/(BLOCK_M * key_stride) of dense attention's
work, on int8 tensor cores."""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .config import Launch, helper_launch
from .host_math import cdiv, next_pow2
from .launch import Kernel
from .fp8 import INTERPRET
from .numerics import MAGIC_F, batch_head, int32_bits_f32, log2_mufu, round_to_i32


@triton.jit
def _key_rows(top, offs_s, KEY_STRIDE: tl.constexpr):
    """The block's key positions a score reads: every one, or every KEY_STRIDE-th of the groups
    other than the top key's, after the top key itself in column 0 (its group's place). Column 0
    is then the top key in every block, so its weight (1, the others' w) is the same column in
    each and the weights stay out of the loop."""
    if KEY_STRIDE == 1:
        rows = offs_s
    else:
        group = tl.where(offs_s <= top // KEY_STRIDE, offs_s - 1, offs_s)  # the groups below the top's, then above
        rows = tl.where(offs_s == 0, top, group * KEY_STRIDE)
    return rows


@triton.jit
def _key_ptr_tile(k_base, kb, rows, sk_n, BLOCK_N: tl.constexpr):
    """(HEAD_DIM, keys) int8 tile of the keys at `rows` of key block kb, by pointers (K padded to
    whole blocks: no mask)."""
    return tl.load(k_base + (kb * BLOCK_N + rows)[None, :].to(tl.int64) * sk_n)


@triton.jit
def _key_tile(K, k_base, k_row, kb, rows, sk_n, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The same tile by a bulk tensor copy (TMA, every key of the block; K a descriptor over the
    (rows, HEAD_DIM) keys, k_row the head's first row) or by pointers (_key_ptr_tile)."""
    if TMA:
        k = K.load([k_row + kb * BLOCK_N, 0]).T
    else:
        k = _key_ptr_tile(k_base, kb, rows, sk_n, BLOCK_N)
    return k


@triton.jit
def _block_lse(q_i8, k, rows, k_base, sk_n, row_scale, ks, kb, lw_rest, exact, offs_s, N_K, BLOCK_N: tl.constexpr,
               KEY_STRIDE: tl.constexpr, MASK_KEYS: tl.constexpr, GUARD: tl.constexpr):
    """log2 sum_j w_j exp2(score_j) per row over the keys this key block's score reads (k, the keys
    at `rows`, _key_rows): every KEY_STRIDE-th, the one of the top key's group replaced by the top
    key (column 0, weight 1), the others weighted 2^lw_rest (reference_predict.block_lse_scores); with GUARD, a block
    where `exact` holds reads the rest of each group too, every key at weight 1 (the exact sum).
    score_j = dot_j * c with c = row_scale * ks (ks: this key block's scale). As in the attention
    kernel, the row max works on the raw float bits f_j = dot_j + MAGIC_F of (dot + MAGIC_I);
    f_j - f_max is exact (both in [2^23, 2^24)), so each score keeps full fp32 precision. row_scale
    (per row, loop-invariant) and ks stay apart so that the row scale enters the scores' layout
    once (see the caller)."""
    dot = tl.dot(q_i8, k)
    s = int32_bits_f32(dot)
    c = row_scale * ks
    if MASK_KEYS:
        s = tl.where((kb * BLOCK_N + rows < N_K)[None, :], s, float("-inf"))
    f_max = tl.max(s, 1)
    if KEY_STRIDE == 1:
        res = (f_max - MAGIC_F) * c + tl.math.log2(tl.sum(tl.math.exp2((s - f_max[:, None]) * c[:, None]), 1))
    else:  # the weight's log2 in the same FFMA
        lw = tl.where(offs_s == 0, 0.0, lw_rest)  # column 0: the top key (_key_rows)
        p = tl.math.exp2((s - f_max[:, None]) * c[:, None] + lw[None, :])
        res = (f_max - MAGIC_F) * c + tl.math.log2(tl.sum(p, 1))
        if GUARD:
            if exact:
                # the groups' other keys: position ^ t (the groups are KEY_STRIDE-aligned, a power
                # of two, and the key read is the group's first or the top key), weight 1, merged
                # like flash attention's running max
                m = f_max
                acc = tl.sum(tl.math.exp2((s - f_max[:, None]) * c[:, None]), 1)
                for t in tl.static_range(1, KEY_STRIDE):
                    rows_t = rows ^ t
                    k_t = _key_ptr_tile(k_base, kb, rows_t, sk_n, BLOCK_N)
                    s_t = int32_bits_f32(tl.dot(q_i8, k_t))
                    if MASK_KEYS:
                        s_t = tl.where((kb * BLOCK_N + rows_t < N_K)[None, :], s_t, float("-inf"))
                    m_t = tl.maximum(m, tl.max(s_t, 1))
                    acc = (acc * tl.math.exp2((m - m_t) * c)
                           + tl.sum(tl.math.exp2((s_t - m_t[:, None]) * c[:, None]), 1))
                    m = m_t
                res = (m - MAGIC_F) * c + tl.math.log2(acc)
    return res


@triton.jit
def _block_meta(ks_ptr, top_ptr, sim_ptr, kb, exact_below, KEY_STRIDE: tl.constexpr, GUARD: tl.constexpr):
    """Key block kb's scale, its top key (where KEY_STRIDE > 1, else 0) and whether the guard reads
    it in full (its keys' self-similarity below exact_below)."""
    top = 0
    exact = False
    if KEY_STRIDE > 1:
        top = tl.load(top_ptr + kb)
        if GUARD:
            exact = tl.load(sim_ptr + kb) < exact_below
    return tl.load(ks_ptr + kb), top, exact


@triton.jit
def _exp2_rel(f, c, bias, ref_b, INTERPRETED: tl.constexpr):
    """exp2 of each score relative to the row's reference (_block_lse_ref): one FFMA per score,
    f * c + bias; the interpreter's fma rounds the product first (at f * c's magnitude), so there
    the same t by steps."""
    if INTERPRETED:
        p = tl.math.exp2((f - MAGIC_F) * c[:, None] - ref_b[:, None])
    else:
        p = tl.math.exp2(tl.fma(f, c[:, None], bias[:, None]))
    return p


@triton.jit
def _block_lse_ref(q_i8, k, rows, k_base, sk_n, row_scale, ref, ks, kb, w, exact, offs_s, N_K, BLOCK_N: tl.constexpr,
                   KEY_STRIDE: tl.constexpr, MASK_KEYS: tl.constexpr, GUARD: tl.constexpr,
                   INTERPRETED: tl.constexpr):
    """_block_lse's sum over the keys k at `rows` (every key, or every KEY_STRIDE-th with the top
    key in column 0 at weight 1 and the others weighted w = 2^lw (_key_rows); with GUARD and
    `exact`, every key at weight 1) with each exp2 taken relative to ref (per row, log2 units; the
    caller's: the lse of its first block) instead of the block's own row max. No max over the
    block: per score one FFMA (the dot's float bits times the scale, plus a per-row bias that also
    takes the magic number out), the exp2 and the sum (a weighted sum's product folds into it as
    an FFMA); the max form adds a chain of FMNMX and two shuffles per row before the first exp2,
    and an FADD and FMUL per score. The block's log2 is the MUFU's (log2_mufu).
    2^t is a finite normal fp32 for t in [-126, 128). A key scoring more than 126 below ref
    counts as 0 (flushed), and a block whose sum is lost so gets about ref - 126: its mass is
    under 2^-119 of the reference block's, which no selection or estimate downstream tells from 0.
    A block whose sum passes 2^128 gets about ref + 128: it outweighs the reference block 2^128
    to 1 and is kept whatever its exact score. In between: the max form's value to fp32 rounding."""
    f = int32_bits_f32(tl.dot(q_i8, k))  # MAGIC_F + the int32 dot, exactly
    c = row_scale * ks
    # t = (f - MAGIC_F) * c - ref in one FFMA per score: f * c + bias, with bias any fp32 near
    # -(MAGIC_F * c + ref) and the reference taken as what bias makes it, ref_b = -(MAGIC_F * c + bias),
    # itself one FFMA per row: the product inside each FFMA is exact, so t and ref_b are rounded once,
    # at their own (small) magnitudes, and t + ref_b is the score to fp32 rounding
    bias = -(MAGIC_F * c + ref)
    ref_b = tl.fma(c, -MAGIC_F, -bias)
    p = _exp2_rel(f, c, bias, ref_b, INTERPRETED)
    if MASK_KEYS:
        p = tl.where((kb * BLOCK_N + rows < N_K)[None, :], p, 0.0)
    if KEY_STRIDE == 1:
        acc = tl.sum(p, 1)
    else:
        acc = tl.sum(p * tl.where(offs_s == 0, 1.0, w)[None, :], 1)  # column 0: the top key
        if GUARD:
            if exact:  # the groups' other keys (position ^ t, as in _block_lse), every key at weight 1
                acc = tl.sum(p, 1)
                for t in tl.static_range(1, KEY_STRIDE):
                    rows_t = rows ^ t
                    p_t = _exp2_rel(int32_bits_f32(tl.dot(q_i8, _key_ptr_tile(k_base, kb, rows_t, sk_n, BLOCK_N))),
                                    c, bias, ref_b, INTERPRETED)
                    if MASK_KEYS:
                        p_t = tl.where((kb * BLOCK_N + rows_t < N_K)[None, :], p_t, 0.0)
                    acc += tl.sum(p_t, 1)
    return ref_b + tl.minimum(tl.maximum(log2_mufu(acc, INTERPRETED), -126.0), 128.0)


@triton.jit
def _block_lse_kernel(QP, K, KS, TOP, KSIM, KBAR, KBS, OUT, MEAN, sqp_b, sqp_h, sqp_r, sk_b, sk_h, sk_n, sks_b, sks_h,
                      skb_b, skb_h, skbs_b, skbs_h, so_b, so_h, so_r,
                      NR, N_K, NKB, H, KV_GROUP, scale_log2, w_full, exact_below,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
                      KB_TILE: tl.constexpr, KEY_STRIDE: tl.constexpr, WANT_MEAN: tl.constexpr,
                      GUARD: tl.constexpr, TMA: tl.constexpr, INTERPRETED: tl.constexpr):
    """One program: BLOCK_R pooled queries against KB_TILE consecutive key blocks. The per-row
    results collect in a (BLOCK_R, KB_TILE) register tile, stored once at the end: a store per
    block would move each row's value through shared memory (the dot's row layout is not the
    store's) behind two barriers, every block. The mean scores are one product of the pooled
    queries with the tile's KB_TILE mean keys, before the loop."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    bh = tl.program_id(2)
    b, h = batch_head(bh, H)
    hk = h // KV_GROUP
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_N // KEY_STRIDE)
    offs_d = tl.arange(0, HEAD_DIM)
    qp = tl.load(QP + b * sqp_b + h * sqp_h + offs_r[:, None] * sqp_r + offs_d[None, :],
                 mask=(offs_r < NR)[:, None] & (offs_d < D_TRUE)[None, :], other=0.0)
    # pooled queries to int8, one scale per row (rounded as the quantizers round)
    qamax = tl.maximum(tl.max(tl.abs(qp), 1), 1e-20)
    q_i8 = round_to_i32(qp, tl.math.div_rn(127.0, qamax)[:, None], INTERPRETED).to(tl.int8)
    row_scale0 = qamax / 127.0 * scale_log2
    kb0 = pid_c * KB_TILE
    kb1 = tl.minimum(kb0 + KB_TILE, NKB)
    cols = tl.arange(0, KB_TILE)
    mean_t = tl.zeros([BLOCK_R, KB_TILE], dtype=tl.float32)
    if WANT_MEAN:  # the mean keys of this tile's blocks (int8, zero past the real blocks), one product
        kbar = tl.load(KBAR + b * skb_b + hk * skb_h + (kb0 + cols)[None, :] * HEAD_DIM + offs_d[:, None],
                       mask=(kb0 + cols < NKB)[None, :], other=0)
        kbs = tl.load(KBS + b * skbs_b + hk * skbs_h + kb0 + cols, mask=kb0 + cols < NKB, other=0.0)
        mean_t = tl.dot(q_i8, kbar).to(tl.float32) * row_scale0[:, None] * kbs[None, :]
    # the row scale into the scores' layout once, here: added to a zero row of the same dot's
    # layout, it is computed in that layout (left alone, the compiler multiplies it by each block's
    # scale first and moves the product through shared memory behind a barrier, every block)
    zero = tl.dot(q_i8, tl.zeros([HEAD_DIM, BLOCK_N // KEY_STRIDE], dtype=tl.int8))
    row_scale = row_scale0 + tl.max(zero, 1).to(tl.float32)
    if TMA:  # K: a descriptor over the (B * Hkv * padded keys, HEAD_DIM) rows
        k_base = K  # not read
        k_row = ((b * sk_b + hk * sk_h) // sk_n).to(tl.int32)  # rows < 2^31, as the descriptor wants
    else:
        k_base = K + b * sk_b + hk * sk_h + offs_d[:, None]
        k_row = 0
    ks_ptr = KS + b * sks_b + hk * sks_h
    top_ptr = TOP + b * sks_b + hk * sks_h  # TOP and KSIM have KS's strides
    sim_ptr = KSIM + b * sks_b + hk * sks_h
    lse_t = tl.zeros([BLOCK_R, KB_TILE], dtype=tl.float32)
    # only the last key block of the sequence can be partial: run the others without a mask
    kb_full = tl.minimum(kb1, N_K // BLOCK_N)
    # a partial last block's weight of the keys read besides the top one: (n - 1) / (the other real
    # keys read); a block of one key has no other real key (its other columns are masked: their
    # weight does not matter). Under the guard it is read in full (reference_predict.lse_exact_blocks)
    n_real = N_K - kb_full * BLOCK_N
    w_last = (tl.maximum(n_real - 1, 1).to(tl.float32)
              / tl.maximum(tl.cdiv(n_real, KEY_STRIDE) - 1, 1).to(tl.float32))
    # the tile's first block with its own row max (masked: it may be the partial last one); its
    # lse is the reference of the others (_block_lse_ref), which then need no max of their own
    first_partial = kb0 >= kb_full
    ks, top, exact = _block_meta(ks_ptr, top_ptr, sim_ptr, kb0, exact_below, KEY_STRIDE, GUARD)
    rows = _key_rows(top, offs_s, KEY_STRIDE)
    if GUARD:
        exact = exact | first_partial
    lw0 = tl.math.log2(tl.where(first_partial, w_last, w_full))
    ref = _block_lse(q_i8, _key_tile(K, k_base, k_row, kb0, rows, sk_n, BLOCK_N, TMA), rows, k_base, sk_n, row_scale,
                     ks, kb0, lw0, exact, offs_s, N_K, BLOCK_N, KEY_STRIDE, True, GUARD)
    lse_t = tl.where((cols == 0)[None, :], ref[:, None], lse_t)
    ks_next, top_next, exact_next = _block_meta(ks_ptr, top_ptr, sim_ptr, tl.minimum(kb0 + 1, NKB - 1), exact_below,
                                                KEY_STRIDE, GUARD)
    for kb in range(kb0 + 1, kb_full):
        ks = ks_next
        rows = _key_rows(top_next, offs_s, KEY_STRIDE)
        exact = exact_next
        # a block ahead: its loads' latency hides behind this one
        ks_next, top_next, exact_next = _block_meta(ks_ptr, top_ptr, sim_ptr, tl.minimum(kb + 1, NKB - 1),
                                                    exact_below, KEY_STRIDE, GUARD)
        k = _key_tile(K, k_base, k_row, kb, rows, sk_n, BLOCK_N, TMA)
        lse = _block_lse_ref(q_i8, k, rows, k_base, sk_n, row_scale, ref, ks, kb, w_full, exact, offs_s, N_K, BLOCK_N,
                             KEY_STRIDE, False, GUARD, INTERPRETED)
        lse_t = tl.where((cols == kb - kb0)[None, :], lse[:, None], lse_t)
    if (kb0 < kb_full) & (kb_full < kb1):  # the partial last block, unless it was the first
        ks, top, _ = _block_meta(ks_ptr, top_ptr, sim_ptr, kb_full, exact_below, KEY_STRIDE, False)
        rows = _key_rows(top, offs_s, KEY_STRIDE)
        k = _key_tile(K, k_base, k_row, kb_full, rows, sk_n, BLOCK_N, TMA)
        lse = _block_lse_ref(q_i8, k, rows, k_base, sk_n, row_scale, ref, ks, kb_full, w_last, GUARD, offs_s, N_K,
                             BLOCK_N, KEY_STRIDE, True, GUARD, INTERPRETED)
        lse_t = tl.where((cols == kb_full - kb0)[None, :], lse[:, None], lse_t)
    offs = b * so_b + h * so_h + offs_r[:, None] * so_r + (kb0 + cols)[None, :]
    ok = (offs_r < NR)[:, None] & (kb0 + cols < kb1)[None, :]
    tl.store(OUT + offs, lse_t, mask=ok)
    if WANT_MEAN:
        tl.store(MEAN + offs, mean_t, mask=ok)


_block_lse_launch = Kernel(_block_lse_kernel)


def block_lse_scores(q_pool: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, scale: float,
                     n_k: int, block_k: int, want_mean: bool = False, launch: Launch | None = None,
                     key_stride: int = 1, key_top: torch.Tensor | None = None, kbar: tuple | None = None,
                     key_sim: torch.Tensor | None = None, exact_below: float = 0.0):
    """q_pool (B,H,NQ,D) fp32, k_i8 (B,Hkv,NK*block_k,HD) int8 smoothed keys, k_scale (B,Hkv,NK).
    Returns (B,H,NQ,NK) fp32 in log2 units (reference_predict.block_lse_scores); with want_mean also the
    pooled queries' scores against the blocks' mean keys (same shape and units), kbar = (int8
    mean keys (B,Hkv,>=NK,HD) contiguous, their scales (B,Hkv,>=NK)) from quant_pool's
    pool_i8_blocks. key_stride > 1: each block's score reads every key_stride-th key and its
    largest-norm one, key_top (B,Hkv,NK) int32 (quant_pool's want_top); with key_sim (B,Hkv,NK)
    fp32, the keys' self-similarity per block (quant_pool's want_sim), a block where it is below
    exact_below, and a partial last block, read every key (reference_predict.lse_exact_blocks;
    key_stride a power of two).
    `launch`: tile rows, warps, stages and programs (speed only)."""
    B, H, NQ, D = q_pool.shape
    Hkv, n_pad, hd = k_i8.shape[1:]
    if k_i8.dtype != torch.int8 or n_pad % block_k or H % Hkv or hd < D:
        raise ValueError("block_lse_scores wants int8 keys padded to whole blocks and matching heads")
    nkb = n_pad // block_k
    if k_scale.shape != (B, Hkv, nkb):
        raise ValueError(f"k_scale must be (B, Hkv, {nkb})")
    if key_stride < 1 or block_k % key_stride or block_k // key_stride < 16:
        raise ValueError(f"key_stride {key_stride} must divide block_k {block_k} into >= 16 keys")
    if key_stride > 1 and (key_top is None or key_top.shape != k_scale.shape or key_top.dtype != torch.int32
                           or key_top.stride() != k_scale.stride()):
        raise ValueError(f"key_stride > 1 needs key_top, int32 (B, Hkv, {nkb}) with k_scale's strides")
    guard = key_sim is not None and key_stride > 1
    if guard and (key_stride & (key_stride - 1) or key_sim.shape != k_scale.shape
                  or key_sim.dtype != torch.float32 or key_sim.stride() != k_scale.stride()):
        raise ValueError(f"key_sim must be float32 (B, Hkv, {nkb}) with k_scale's strides, key_stride a power of two")
    if want_mean:
        if kbar is None:
            raise ValueError("want_mean needs the mean keys (kbar)")
        kbar_i8, kbar_s = kbar
        if (kbar_i8.dtype != torch.int8 or kbar_i8.shape[:2] != (B, Hkv) or kbar_i8.shape[2] < nkb
                or kbar_i8.shape[3] != hd or kbar_i8.stride(2) != hd or kbar_i8.stride(3) != 1
                or kbar_s.shape != kbar_i8.shape[:3]):
            raise ValueError(f"kbar must be int8 (B, Hkv, >= {nkb}, {hd}) rows and their (B, Hkv, >= {nkb}) scales")
    else:
        kbar_i8, kbar_s = k_i8, k_scale  # not read
    q_pool = q_pool.float().contiguous()
    out = torch.empty(B, H, NQ, nkb, dtype=torch.float32, device=q_pool.device)
    mean = torch.empty_like(out) if want_mean else out
    launch = launch or helper_launch("block_lse", q_pool.device)
    block_r = launch.block or 64
    row_tiles = cdiv(NQ, block_r)
    # key blocks per program: the most (up to launch.tile) that still make about launch.programs
    # programs, so that small grids fill every SM; a power of two (the width of the result tile),
    # 16 at least (the mean keys' product)
    kb_tile = max(16, next_pow2(launch.tile))
    while kb_tile > 16 and row_tiles * B * H * cdiv(nkb, kb_tile) < launch.programs:
        kb_tile //= 2
    # the weight of the keys read besides the top one in a full block: (block_k - 1) / (the others read)
    w_full = (block_k - 1) / (block_k // key_stride - 1) if key_stride > 1 else 1.0
    top = key_top if key_stride > 1 else k_scale
    # the keys by bulk tensor copies where every key of a block is read (Hopper: launch.tma)
    tma = launch.tma and key_stride == 1 and k_i8.is_contiguous() and hd % 16 == 0
    k_arg = TensorDescriptor.from_tensor(k_i8.view(-1, hd), [block_k, hd]) if tma else k_i8
    grid = (row_tiles, cdiv(nkb, kb_tile), B * H)
    _block_lse_launch[grid](
        q_pool, k_arg, k_scale, top, key_sim if guard else k_scale, kbar_i8, kbar_s, out, mean,
        q_pool.stride(0), q_pool.stride(1), q_pool.stride(2),
        k_i8.stride(0), k_i8.stride(1), k_i8.stride(2), k_scale.stride(0), k_scale.stride(1),
        kbar_i8.stride(0), kbar_i8.stride(1), kbar_s.stride(0), kbar_s.stride(1),
        out.stride(0), out.stride(1), out.stride(2), NQ, n_k, nkb, H, H // Hkv, scale * 1.4426950408889634,
        w_full, float(exact_below), BLOCK_R=block_r, BLOCK_N=block_k, HEAD_DIM=hd, D_TRUE=D, KB_TILE=kb_tile,
        KEY_STRIDE=key_stride,
        WANT_MEAN=want_mean, GUARD=guard, TMA=tma, INTERPRETED=INTERPRET, num_stages=launch.num_stages,
        **launch.warps_and_cap(),
    )
    return (out, mean) if want_mean else out
