"""Fused step 0 + stage-1 pooling: one pass over Q (or K) per token block gives the int8 block,
its scale, the block's mean vector and its mean pairwise cosine similarity (and for K, the
estimate's int8 mean keys and grouped variances). V's cast is in quantize_v.py."""
import torch
import triton
import triton.language as tl

from .caller_addrs import addr_args, caller_ptr
from .config import Launch, helper_launch
from .host_math import cdiv
from .launch import Kernel
from .fp8 import INTERPRET
from .numerics import batch_head, round_to_i32
from .token_blocks import check_input, check_perm, step_rows, token_rows

# fill_skipped's key variances are kept per group of contiguous channels, this many groups (head dim
# 128: 8 channels each): the attention kernel's product with them is one 16-deep fp16 MMA step
VAR_GROUPS = tl.constexpr(16)


@triton.jit
def _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
                     HAS_PERM: tl.constexpr):
    """Rows step i (ROWS tokens) of token block blk, in fp32, less the mean where SUBTRACT_MEAN
    (zero on the padded rows); and their token offsets."""
    offs_n, valid, rows = token_rows(PERM, blk * (BLOCK // ROWS) + i, N, ROWS, HAS_PERM, False)
    offs_d = tl.arange(0, HEAD_DIM)
    dmask = offs_d < D_TRUE
    x = tl.load(X + b * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_n + offs_d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mu = tl.load(MEAN + b * sm_b + h * sm_h + offs_d, mask=dmask, other=0.0)
        # x - mu on the real rows, 0 on the padded ones (loaded as 0): one FFMA a value, the same
        # bits as a subtraction (mu * 1 is exact), where a subtraction and a select took two
        x = tl.fma(-mu[None, :], valid[:, None].to(tl.float32), x)
    return offs_n, x


@triton.jit
def _row_sums(x, psum, usum, ssum, SUM: tl.constexpr, UNIT_SUM: tl.constexpr, SQ_SUM: tl.constexpr):
    """psum + the rows' sum (the pooled mean's), usum + the sum of the rows as unit vectors (the
    self-similarity's), ssum + the rows' sums of squares over VAR_GROUPS groups of contiguous
    channels (the grouped variances' and the energy similarity's: summed by group before the rows,
    so that 16 sums cross threads, not 128), each where wanted."""
    if SUM:
        psum += tl.sum(x, 0)
    if SQ_SUM:
        sq = tl.reshape(x * x, (x.shape[0], VAR_GROUPS, x.shape[1] // VAR_GROUPS))
        ssum += tl.sum(tl.sum(sq, 2), 0)
    if UNIT_SUM:
        norm = tl.sqrt(tl.sum(x * x, 1))
        unit = tl.where(norm[:, None] > 0, x / tl.maximum(norm, 1e-20)[:, None], 0.0)
        usum += tl.sum(unit, 0)
    return psum, usum, ssum


@triton.jit
def _round_rows(XQ, x, offs_n, s, b, h, sq_b, sq_h, sq_n, HEAD_DIM: tl.constexpr, INTERPRETED: tl.constexpr):
    """A rows step rounded to int8 at the block's scale and stored."""
    offs_d = tl.arange(0, HEAD_DIM)
    xq = round_to_i32(x, s, INTERPRETED)
    # padded rows / columns are written as zeros so the attention kernel reads without masks
    tl.store(XQ + b * sq_b + h * sq_h + offs_n[:, None].to(tl.int64) * sq_n + offs_d[None, :], xq.to(tl.int8))


@triton.jit
def _row_max(x, i, amax, top, ROWS: tl.constexpr):
    """amax and top carried over rows step i: the largest |x| so far (the int8 scale's) and the row
    that holds it, the block's top key (reference_predict.block_top_keys; the lse scores always
    read it), the first on ties as steps come in row order. The row maxima are the ones the scale
    takes anyway, so the top key costs one argmax over the rows."""
    rowmax = tl.max(tl.abs(x), 1)
    m = tl.max(rowmax, 0)
    top = tl.where(m > amax, i * ROWS + tl.argmax(rowmax, 0, tie_break_left=True), top)
    return tl.maximum(amax, m), top


@triton.jit
def _quant_pool_kernel(
    X, ADDRS, PERM, MEAN, XQ, SCALE, POOL, SIM, POOLQ, POOLS, POOLV, TOP,
    sx_b, sx_h, sx_n, sm_b, sm_h, sq_b, sq_h, sq_n, ss_b, ss_h, sp_b, sp_h, sp_n, spq_b, spq_h, sps_b, sps_h,
    spv_b, spv_h,
    N, H, extra_scale, POOL_BLOCKS,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr, WANT_POOL: tl.constexpr, WANT_SIM: tl.constexpr, HAS_PERM: tl.constexpr,
    POOL_I8: tl.constexpr, WANT_TOP: tl.constexpr, X_SLOT: tl.constexpr, ROWS: tl.constexpr,
    INTERPRETED: tl.constexpr, SIM_ENERGY: tl.constexpr,
):
    """One token block, ROWS tokens a step. The first pass takes the block's largest |x| (the
    int8 scale), its sums and unit-vector sums; the second rounds and stores the rows, read again
    (from L2: 16-32 KB a block) where the block took more than one step. K's whole 128-row tile
    (ROWS == BLOCK) held for both compiles to 253 registers, and spills with the self-similarity
    and top keys (sm_90, 4 warps); at 32 rows 127, 168 with them, no spill. SIM_ENERGY: the
    self-similarity from the sums the block takes anyway (reference_predict.energy_similarity), no
    per-token norms or unit vectors: with it and the top key, K's whole tile takes 166 registers
    (sm_90, v55)."""
    X = caller_ptr(X, ADDRS, X_SLOT)
    blk = tl.program_id(0)
    b, h = batch_head(tl.program_id(1), H)
    offs_d = tl.arange(0, HEAD_DIM)
    psum = tl.zeros([HEAD_DIM], tl.float32)
    usum = tl.zeros([HEAD_DIM], tl.float32)
    ssum = tl.zeros([VAR_GROUPS], tl.float32)
    top = 0
    SUMS: tl.constexpr = WANT_POOL or POOL_I8 or (WANT_SIM and SIM_ENERGY)
    UNIT_SUM: tl.constexpr = WANT_SIM and not SIM_ENERGY
    SQ_SUM: tl.constexpr = POOL_I8 or (WANT_SIM and SIM_ENERGY)
    # from 0, so that a block's top is its first row unless a later one is larger; clamped after
    # the rows, so that an all-zero block keeps a finite scale
    amax = 0.0
    if ROWS == BLOCK:  # one step: the tile stays in registers, X read once
        offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, 0, N, BLOCK, ROWS,
                                     HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
        amax, top = _row_max(x, 0, amax, top, ROWS)
        amax = tl.maximum(amax, 1e-20)
        _round_rows(XQ, x, offs_n, tl.math.div_rn(127.0, amax), b, h, sq_b, sq_h, sq_n, HEAD_DIM, INTERPRETED)
        psum, usum, ssum = _row_sums(x, psum, usum, ssum, SUMS, UNIT_SUM, SQ_SUM)
    else:
        for i in tl.static_range(BLOCK // ROWS):  # unrolled: every step's loads can be in flight
            offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK, ROWS,
                                         HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
            amax, top = _row_max(x, i, amax, top, ROWS)
            psum, usum, ssum = _row_sums(x, psum, usum, ssum, SUMS, UNIT_SUM, SQ_SUM)
        amax = tl.maximum(amax, 1e-20)
        s = tl.math.div_rn(127.0, amax)
        # a loop, not unrolled: so that the compiler does not keep the first pass's tiles for it
        for i in tl.range(0, BLOCK // ROWS):
            offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK, ROWS,
                                         HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
            _round_rows(XQ, x, offs_n, s, b, h, sq_b, sq_h, sq_n, HEAD_DIM, INTERPRETED)
    tl.store(SCALE + b * ss_b + h * ss_h + blk, amax / 127.0 * extra_scale)
    if WANT_TOP:
        tl.store(TOP + b * ss_b + h * ss_h + blk, top)
    if WANT_POOL or POOL_I8:
        cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        pooled = psum / cnt
        if WANT_POOL:
            tl.store(POOL + b * sp_b + h * sp_h + blk * sp_n + offs_d, pooled)
        if POOL_I8:  # the mean in int8 with its own scale (fill_skipped's mean keys, int8 tensor cores)
            pamax = tl.maximum(tl.max(tl.abs(pooled), 0), 1e-20)
            tl.store(POOLQ + b * spq_b + h * spq_h + blk * HEAD_DIM + offs_d,
                     round_to_i32(pooled, tl.math.div_rn(127.0, pamax), INTERPRETED).to(tl.int8))
            tl.store(POOLS + b * sps_b + h * sps_h + blk, pamax / 127.0)
            # and the channels' variances over the block, summed in VAR_GROUPS groups of contiguous
            # channels, fp16 up to its largest value (the estimate's second-order term,
            # reference_predict.key_variances)
            psq = tl.sum(tl.reshape(pooled * pooled, (VAR_GROUPS, HEAD_DIM // VAR_GROUPS)), 1)
            var = tl.minimum(tl.maximum(ssum / cnt - psq, 0.0), 65504.0)
            tl.store(POOLV + b * spv_b + h * spv_h + blk * VAR_GROUPS + tl.arange(0, VAR_GROUPS), var.to(tl.float16))
    if WANT_SIM:
        cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        if SIM_ENERGY:
            energy = tl.sum(ssum, 0)
            sim = tl.where(energy > 0, tl.sum(psum * psum, 0) / (cnt * tl.maximum(energy, 1e-30)), 0.0)
        else:
            sim = tl.sum(usum * usum, 0) / (cnt * cnt)
        tl.store(SIM + b * ss_b + h * ss_h + blk, sim)
    if POOL_I8:
        # the zeros past the real blocks, spread over the programs (no fill launch of their own);
        # last, so that no tile stays live across the loop
        nb = tl.cdiv(N, BLOCK)
        for pb in range(nb + blk, POOL_BLOCKS, nb):
            tl.store(POOLQ + b * spq_b + h * spq_h + pb * HEAD_DIM + offs_d, tl.zeros([HEAD_DIM], tl.int8))
            tl.store(POOLS + b * sps_b + h * sps_h + pb, 0.0)
            tl.store(POOLV + b * spv_b + h * spv_h + pb * VAR_GROUPS + tl.arange(0, VAR_GROUPS),
                     tl.zeros([VAR_GROUPS], tl.float16))


_quant_pool = Kernel(_quant_pool_kernel)


def quant_pool(x: torch.Tensor, block: int, head_dim: int, extra_scale: float = 1.0,
               mean: torch.Tensor | None = None, want_pool: bool = True, perm: torch.Tensor | None = None,
               want_sim: bool | None = None, pool_i8_blocks: int = 0, launch: Launch | None = None,
               addr: tuple | None = None, want_top: bool = False, sim_kind: str = "cosine"):
    """x (B,H,N,D) -> int8 (B,H,nb*block,head_dim), scale (B,H,nb) fp32 (times extra_scale),
    pooled (B,H,nb,D) fp32, sim (B,H,nb) fp32. `mean` (B,H,D) fp32 is subtracted first (K smoothing).
    With `perm` (int32 (N,)), token i of the output is token perm[i] of x. The pooled means and
    the self-similarities are only computed when wanted (want_sim defaults to want_pool); what is
    not computed is returned as None.
    pool_i8_blocks > 0: also returns the pooled means as int8 (B,H,pool_i8_blocks,
    head_dim) with one fp32 scale per block (B,H,pool_i8_blocks), as a pair, then each block's
    channel variances (of x less `mean`) summed in VAR_GROUPS groups of contiguous channels, fp16
    (B,H,pool_i8_blocks,VAR_GROUPS), zero past the nb real blocks.
    sim_kind: what the self-similarity measures: "cosine", the mean pairwise cosine
    (pool_and_similarity), or "energy", the mean pairwise dot over the mean squared norm
    (energy_similarity: from the sums, no per-token norms; the lse guard's).
    want_top: also returns, last, each block's position of the token that holds its largest |x|
    (less `mean`) (B,H,nb) int32, the first on ties (reference_predict.block_top_keys).
    `launch`: the warps per program and the token rows per step (launch.block, 0: the whole
    block; speed only). addr (table, slot): x is read at the address table[slot] holds instead
    (kernels/caller_addrs.py); x gives its type, shape and strides."""
    check_input(x, "x")
    B, H, N, D = x.shape
    if head_dim < D or head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} must be a power of two >= {D}")
    if sim_kind not in ("cosine", "energy"):
        raise ValueError(f"sim_kind {sim_kind!r} must be 'cosine' or 'energy'")
    nb = cdiv(N, block)
    dev = x.device
    xq = torch.empty(B, H, nb * block, head_dim, dtype=torch.int8, device=dev)
    scale = torch.empty(B, H, nb, dtype=torch.float32, device=dev)
    pool = torch.empty(B, H, nb, head_dim, dtype=torch.float32, device=dev) if want_pool else scale
    want_sim = want_pool if want_sim is None else want_sim
    sim = torch.empty(B, H, nb, dtype=torch.float32, device=dev) if want_sim else scale
    if mean is not None:
        mean = mean.float().contiguous()
    m = mean if mean is not None else scale
    perm = check_perm(perm, N, dev)
    pool_i8 = pool_i8_blocks > 0
    if pool_i8 and pool_i8_blocks < nb:
        raise ValueError(f"pool_i8_blocks {pool_i8_blocks} < {nb} blocks")
    # the kernel writes the zeros past the nb real blocks itself
    poolq = torch.empty(B, H, pool_i8_blocks, head_dim, dtype=torch.int8, device=dev) if pool_i8 else xq
    pools = torch.empty(B, H, pool_i8_blocks, dtype=torch.float32, device=dev) if pool_i8 else scale
    poolv = torch.empty(B, H, pool_i8_blocks, VAR_GROUPS.value, dtype=torch.float16, device=dev) if pool_i8 else xq
    top = torch.empty(B, H, nb, dtype=torch.int32, device=dev) if want_top else scale  # strides: scale's
    launch = launch or helper_launch(f"quant_pool{block}" if block in (64, 128) else "quant_pool64", dev)
    rows = step_rows(launch, block)
    addrs, slot = addr_args(addr, scale)
    _quant_pool[(nb, B * H)](
        x, addrs, perm if perm is not None else scale, m, xq, scale, pool, sim, poolq, pools, poolv, top,
        x.stride(0), x.stride(1), x.stride(2), m.stride(0), m.stride(1),
        xq.stride(0), xq.stride(1), xq.stride(2), scale.stride(0), scale.stride(1),
        pool.stride(0), pool.stride(1), pool.stride(2) if want_pool else 0,
        poolq.stride(0), poolq.stride(1), pools.stride(0), pools.stride(1), poolv.stride(0), poolv.stride(1),
        N, H, float(extra_scale), pool_i8_blocks,
        BLOCK=block, HEAD_DIM=head_dim, D_TRUE=D, SUBTRACT_MEAN=mean is not None, WANT_POOL=want_pool,
        WANT_SIM=want_sim, HAS_PERM=perm is not None, POOL_I8=pool_i8, WANT_TOP=want_top, X_SLOT=slot,
        ROWS=rows, INTERPRETED=INTERPRET, SIM_ENERGY=sim_kind == "energy", **launch.warps_and_cap(),
    )
    out = (xq, scale, pool[..., :D] if want_pool else None, sim if want_sim else None)
    out = out + ((poolq, pools), poolv) if pool_i8 else out
    return out + (top,) if want_top else out
