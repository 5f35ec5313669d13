"""Fused step 0 + stage-1 pooling: one pass over Q (or K) per token block gives the int8 block,
its scale, the block's mean vector and its mean pairwise cosine similarity. V gets its own
per-channel fp8/fp16 cast, written transposed so the P.V product reads it K-major."""
import torch
import triton
import triton.language as tl

from .caller_addrs import addr_args, caller_ptr
from .config import Launch, helper_launch
from .fp8 import INTERPRET, to_pv_dtype, v_column, v_key
from .host_math import cdiv
from .launch import Kernel
from .numerics import batch_head, round_half_away

# fill_skipped's key variances are kept per group of contiguous channels, this many groups (head dim
# 128: 8 channels each): the attention kernel's product with them is one 16-deep fp16 MMA step
VAR_GROUPS = tl.constexpr(16)


@triton.jit
def _token_rows(PERM, blk, N, BLOCK: tl.constexpr, HAS_PERM: tl.constexpr, PV_ORDER: tl.constexpr):
    """Positions of block blk, whether each holds a token, and the rows of the input they read:
    gathered through PERM (curve order) when HAS_PERM, so the quantizers need no separate permute
    pass. With PV_ORDER (fp8 V) position k holds key v_key(k), the P.V operand's order
    (kernels/fp8.py), so that the output is stored in order: a store through permuted addresses
    kept the tile from its layout change and spilled (sm_90)."""
    offs_n = blk * BLOCK + tl.arange(0, BLOCK)
    src = v_key(offs_n, PV_ORDER)
    rows = src
    if HAS_PERM:
        rows = tl.load(PERM + src, mask=src < N, other=0)
    return offs_n, src < N, rows


@triton.jit
def _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
                     HAS_PERM: tl.constexpr):
    """Rows step i (ROWS tokens) of token block blk, in fp32, less the mean where SUBTRACT_MEAN
    (zero on the padded rows); and their token offsets."""
    offs_n, valid, rows = _token_rows(PERM, blk * (BLOCK // ROWS) + i, N, ROWS, HAS_PERM, False)
    offs_d = tl.arange(0, HEAD_DIM)
    dmask = offs_d < D_TRUE
    x = tl.load(X + b * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_n + offs_d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if SUBTRACT_MEAN:
        mu = tl.load(MEAN + b * sm_b + h * sm_h + offs_d, mask=dmask, other=0.0)
        x = tl.where(valid[:, None], x - mu[None, :], 0.0)
    return offs_n, x


@triton.jit
def _row_sums(x, psum, usum, ssum, SUM: tl.constexpr, UNIT_SUM: tl.constexpr, SQ_SUM: tl.constexpr):
    """psum + the rows' sum (the pooled mean's), usum + the sum of the rows as unit vectors (the
    self-similarity's), ssum + the rows' sum of squares (the channel variances'), each where wanted."""
    if SUM:
        psum += tl.sum(x, 0)
    if SQ_SUM:
        ssum += tl.sum(x * x, 0)
    if UNIT_SUM:
        norm = tl.sqrt(tl.sum(x * x, 1))
        unit = tl.where(norm[:, None] > 0, x / tl.maximum(norm, 1e-20)[:, None], 0.0)
        usum += tl.sum(unit, 0)
    return psum, usum, ssum


@triton.jit
def _round_rows(XQ, x, offs_n, amax, b, h, sq_b, sq_h, sq_n, i, best, top, ROWS: tl.constexpr,
                HEAD_DIM: tl.constexpr, WANT_TOP: tl.constexpr):
    """Rows step i rounded to int8 at the block's scale and stored; (best, top) carry the largest
    int8 norm so far and its row, the block's top key (the lse scores always read it): the
    first on ties, as steps come in row order."""
    offs_d = tl.arange(0, HEAD_DIM)
    xq = round_half_away(x * (127.0 / amax))
    # padded rows / columns are written as zeros so the attention kernel reads without masks
    tl.store(XQ + b * sq_b + h * sq_h + offs_n[:, None].to(tl.int64) * sq_n + offs_d[None, :], xq.to(tl.int8))
    if WANT_TOP:
        r = tl.sum(xq * xq, 1)
        m = tl.max(r, 0)
        top = tl.where(m > best, i * ROWS + tl.argmax(r, 0, tie_break_left=True), top)
        best = tl.maximum(best, m)
    return best, top


@triton.jit
def _quant_pool_kernel(
    X, ADDRS, PERM, MEAN, XQ, SCALE, POOL, SIM, POOLQ, POOLS, POOLV, TOP,
    sx_b, sx_h, sx_n, sm_b, sm_h, sq_b, sq_h, sq_n, ss_b, ss_h, sp_b, sp_h, sp_n, spq_b, spq_h, sps_b, sps_h,
    spv_b, spv_h,
    N, H, extra_scale, POOL_BLOCKS,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
    SUBTRACT_MEAN: tl.constexpr, WANT_POOL: tl.constexpr, WANT_SIM: tl.constexpr, HAS_PERM: tl.constexpr,
    POOL_I8: tl.constexpr, WANT_TOP: tl.constexpr, X_SLOT: tl.constexpr, ROWS: tl.constexpr,
):
    """One token block, ROWS tokens a step. The first pass takes the block's largest |x| (the
    int8 scale), its sums and unit-vector sums; the second rounds and stores the rows, read again
    (from L2: 16-32 KB a block) where the block took more than one step. K's whole 128-row tile
    (ROWS == BLOCK) held for both compiles to 253 registers, and spills with the self-similarity
    and top keys (sm_90, 4 warps); at 32 rows 127, 168 with them, no spill."""
    X = caller_ptr(X, ADDRS, X_SLOT)
    blk = tl.program_id(0)
    b, h = batch_head(tl.program_id(1), H)
    offs_d = tl.arange(0, HEAD_DIM)
    psum = tl.zeros([HEAD_DIM], tl.float32)
    usum = tl.zeros([HEAD_DIM], tl.float32)
    ssum = tl.zeros([HEAD_DIM], tl.float32)
    top = 0
    if ROWS == BLOCK:  # one step: the tile stays in registers, X read once
        offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, 0, N, BLOCK, ROWS,
                                     HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-20)
        _, top = _round_rows(XQ, x, offs_n, amax, b, h, sq_b, sq_h, sq_n, 0, -1.0, top, ROWS, HEAD_DIM, WANT_TOP)
        psum, usum, ssum = _row_sums(x, psum, usum, ssum, WANT_POOL or POOL_I8, WANT_SIM, POOL_I8)
    else:
        amax = 1e-20
        for i in tl.static_range(BLOCK // ROWS):  # unrolled: every step's loads can be in flight
            offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK, ROWS,
                                         HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(x), 1), 0))
            psum, usum, ssum = _row_sums(x, psum, usum, ssum, WANT_POOL or POOL_I8, WANT_SIM, POOL_I8)
        best = -1.0
        # a loop, not unrolled: so that the compiler does not keep the first pass's tiles for it
        for i in tl.range(0, BLOCK // ROWS):
            offs_n, x = _quant_pool_rows(X, PERM, MEAN, b, h, sx_b, sx_h, sx_n, sm_b, sm_h, blk, i, N, BLOCK, ROWS,
                                         HEAD_DIM, D_TRUE, SUBTRACT_MEAN, HAS_PERM)
            best, top = _round_rows(XQ, x, offs_n, amax, b, h, sq_b, sq_h, sq_n, i, best, top, ROWS, HEAD_DIM,
                                    WANT_TOP)
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
                     round_half_away(pooled * (127.0 / pamax)).to(tl.int8))
            tl.store(POOLS + b * sps_b + h * sps_h + blk, pamax / 127.0)
            # and the channels' variances over the block, summed in VAR_GROUPS groups of contiguous
            # channels, fp16 up to its largest value (the estimate's second-order term,
            # reference_predict.key_variances)
            var = tl.maximum(ssum / cnt - pooled * pooled, 0.0)
            var = tl.minimum(tl.sum(tl.reshape(var, (VAR_GROUPS, HEAD_DIM // VAR_GROUPS)), 1), 65504.0)
            tl.store(POOLV + b * spv_b + h * spv_h + blk * VAR_GROUPS + tl.arange(0, VAR_GROUPS), var.to(tl.float16))
    if WANT_SIM:
        cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        tl.store(SIM + b * ss_b + h * ss_h + blk, tl.sum(usum * usum, 0) / (cnt * cnt))
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


@triton.jit
def _quant_v_block(V, PERM, VT, VBAR, s, blk, b, h, sv_b, sv_h, sv_n, st_b, st_h, st_d, sb_b, sb_h, sb_d, N,
                   BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, PV_FP8: tl.constexpr,
                   EMULATE_FP8: tl.constexpr, HAS_PERM: tl.constexpr, WANT_MEAN: tl.constexpr,
                   ROWS: tl.constexpr):
    """Token block blk of V over the per-channel scale s (HEAD_DIM,) into VT (and its mean into
    VBAR), ROWS tokens at a time; returns the block's max |v| per channel (before the scale).
    Steps of fewer rows keep fewer values live per thread, but each step's sums over rows and its
    transposed store (a layout change) go through shared memory behind a barrier, so small steps
    cost time (bench/NOTES.md v34, v37); kernels/config.py picks the rows per GPU."""
    offs_d = tl.arange(0, HEAD_DIM)
    dmask = offs_d < D_TRUE
    # v times 1 / s rounded once, as reference_quant.value_reciprocal: `/` is the approximate
    # div.full.f32, a reciprocal and fix-up per value (the kernel 30% slower, NOTES v37) that
    # decides the exact fp8 ties of an exact scale by an ulp
    r = tl.math.div_rn(tl.full([HEAD_DIM], 1.0, tl.float32), s)
    ysum = tl.zeros([HEAD_DIM], tl.float32)
    cmax = tl.zeros([HEAD_DIM], tl.float32)
    for i in tl.static_range(BLOCK // ROWS):  # unrolled: every step's loads can be in flight
        # fp8: position k of the block holds key v_key(k), the MMA operand's order (kernels/fp8.py)
        offs_n, valid, rows = _token_rows(PERM, blk * (BLOCK // ROWS) + i, N, ROWS, HAS_PERM, PV_FP8)
        x = tl.load(V + b * sv_b + h * sv_h + rows[:, None].to(tl.int64) * sv_n + offs_d[None, :],
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        y = x * r[None, :]
        if WANT_MEAN:
            ysum += tl.sum(y, 0)
        cmax = tl.maximum(cmax, tl.max(tl.abs(x), 0))
        y = to_pv_dtype(y, PV_FP8, EMULATE_FP8)
        tl.store(VT + b * st_b + h * st_h + offs_d[None, :].to(tl.int64) * st_d + offs_n[:, None], y)
    if WANT_MEAN:  # the block's mean value (fill_skipped), stored like V itself: transposed, fp8 (in the
        # operand's order, over the mean blocks) or fp16
        cnt = tl.minimum(N - blk * BLOCK, BLOCK).to(tl.float32)
        ybar = to_pv_dtype(ysum / cnt, PV_FP8, EMULATE_FP8)
        tl.store(VBAR + b * sb_b + h * sb_h + offs_d.to(tl.int64) * sb_d + v_column(blk, PV_FP8), ybar)
    return cmax


@triton.jit
def _quant_v_kernel(V, ADDRS, PERM, VSCALE, VT, VBAR, VMAXB, RATIO, sv_b, sv_h, sv_n, svs_b, svs_h, st_b, st_h, st_d,
                    sb_b, sb_h, sb_d, N, H,
                    MEAN_BLOCKS,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, PV_FP8: tl.constexpr,
                    EMULATE_FP8: tl.constexpr, HAS_PERM: tl.constexpr, WANT_MEAN: tl.constexpr,
                    CHECK: tl.constexpr, V_SLOT: tl.constexpr, ROWS: tl.constexpr):
    V = caller_ptr(V, ADDRS, V_SLOT)
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = batch_head(bh, H)
    nb = tl.cdiv(N, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    s = tl.load(VSCALE + b * svs_b + h * svs_h + offs_d, mask=offs_d < D_TRUE, other=1.0)
    cmax = _quant_v_block(V, PERM, VT, VBAR, s, blk, b, h, sv_b, sv_h, sv_n, st_b, st_h, st_d, sb_b, sb_h, sb_d, N,
                          BLOCK, HEAD_DIM, D_TRUE, PV_FP8, EMULATE_FP8, HAS_PERM, WANT_MEAN, ROWS)
    if CHECK:  # for the overflow check (_quant_v_fix): the block's largest |v| / s, and its max |v| per channel
        # div_rn (IEEE, as the reference; `/` is the approximate div.full.f32 on NVIDIA GPUs):
        # 128 per program
        tl.store(RATIO + bh * nb + blk, tl.max(tl.math.div_rn(cmax, s), 0))
        tl.store(VMAXB + (bh * nb + blk).to(tl.int64) * HEAD_DIM + offs_d, cmax)
    if WANT_MEAN:  # the zero columns past the real blocks (last: no tile stays live across the loop)
        for pb in range(nb + blk, MEAN_BLOCKS, nb):
            tl.store(VBAR + b * sb_b + h * sb_h + offs_d.to(tl.int64) * sb_d + v_column(pb, PV_FP8),
                     tl.zeros([HEAD_DIM], VBAR.dtype.element_ty))


@triton.jit
def _quant_v_fix_kernel(V, ADDRS, PERM, VSCALE, VT, VBAR, VMAXB, RATIO, sv_b, sv_h, sv_n, svs_b, svs_h, st_b, st_h,
                        st_d, sb_b, sb_h, sb_d, N, H, format_max,
                        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, PV_FP8: tl.constexpr,
                        EMULATE_FP8: tl.constexpr, HAS_PERM: tl.constexpr, WANT_MEAN: tl.constexpr,
                        RBLOCK: tl.constexpr, V_SLOT: tl.constexpr, ROWS: tl.constexpr):
    """The overflow check of a scale from a sample (reference_quant.value_scale): a head where some block
    has |v| / s above the format's largest value is quantized again at its exact scale, max |v| /
    format_max over every block, which this head's programs (grid axis 1) write back into VSCALE
    and share out block by block. Elsewhere each program reads the head's per-block ratios and
    ends: a few us of a launch on the common path."""
    V = caller_ptr(V, ADDRS, V_SLOT)
    bh = tl.program_id(0)
    b, h = batch_head(bh, H)
    nb = tl.cdiv(N, BLOCK)
    worst = tl.zeros([RBLOCK], dtype=tl.float32)
    for r in range(0, nb, RBLOCK):
        offs = r + tl.arange(0, RBLOCK)
        worst = tl.maximum(worst, tl.load(RATIO + bh * nb + offs, mask=offs < nb, other=0.0))
    if tl.max(worst, 0) > format_max:
        offs_d = tl.arange(0, HEAD_DIM)
        amax = tl.zeros([RBLOCK, HEAD_DIM], dtype=tl.float32)
        for r in range(0, nb, RBLOCK):  # RBLOCK blocks' maxima per load
            offs = r + tl.arange(0, RBLOCK)
            amax = tl.maximum(amax, tl.load(VMAXB + (bh * nb + offs[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                                            mask=(offs < nb)[:, None], other=0.0))
        amax = tl.max(amax, 0)
        s = tl.maximum(tl.math.div_rn(amax, format_max), 1e-20)  # the reference's scale, exactly
        s = tl.where(offs_d < D_TRUE, s, 1.0)
        if tl.program_id(1) == 0:
            tl.store(VSCALE + b * svs_b + h * svs_h + offs_d, s, mask=offs_d < D_TRUE)
        for blk in range(tl.program_id(1), nb, tl.num_programs(1)):
            _quant_v_block(V, PERM, VT, VBAR, s, blk, b, h, sv_b, sv_h, sv_n, st_b, st_h, st_d, sb_b, sb_h, sb_d, N,
                           BLOCK, HEAD_DIM, D_TRUE, PV_FP8, EMULATE_FP8, HAS_PERM, WANT_MEAN, ROWS)


_quant_v_fix = Kernel(_quant_v_fix_kernel)
# programs per head of the overflow check: where nothing overflows each reads the head's per-block
# ratios (~1-2 KB) and ends; where a head does, they share its blocks (~16 each at HunyuanVideo 544p)
FIX_PROGRAMS = 32
_quant_v = Kernel(_quant_v_kernel)


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, H, N, D), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be fp16/bf16/fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in the head dimension")


def _step_rows(launch: Launch, block: int) -> int:
    """The token rows a quantizer program takes per step: launch.block, 0 for the whole block."""
    rows = min(launch.block or block, block)
    if block % rows or rows & (rows - 1):
        raise ValueError(f"steps of {rows} rows must be a power of two dividing the block ({block})")
    return rows


def _check_perm(perm, n, device):
    if perm is None:
        return None
    if perm.dtype != torch.int32 or perm.shape != (n,) or perm.device != device:
        raise ValueError(f"perm must be an int32 ({n},) tensor on {device}")
    return perm.contiguous()


def quant_pool(x: torch.Tensor, block: int, head_dim: int, extra_scale: float = 1.0,
               mean: torch.Tensor | None = None, want_pool: bool = True, perm: torch.Tensor | None = None,
               want_sim: bool | None = None, pool_i8_blocks: int = 0, launch: Launch | None = None,
               addr: tuple | None = None, want_top: bool = False):
    """x (B,H,N,D) -> int8 (B,H,nb*block,head_dim), scale (B,H,nb) fp32 (times extra_scale),
    pooled (B,H,nb,D) fp32, sim (B,H,nb) fp32. `mean` (B,H,D) fp32 is subtracted first (K smoothing).
    With `perm` (int32 (N,)), token i of the output is token perm[i] of x. The pooled means and
    the self-similarities are only computed when wanted (want_sim defaults to want_pool); what is
    not computed is returned as None.
    pool_i8_blocks > 0: also returns the pooled means as int8 (B,H,pool_i8_blocks,
    head_dim) with one fp32 scale per block (B,H,pool_i8_blocks), as a pair, then each block's
    channel variances (of x less `mean`) summed in VAR_GROUPS groups of contiguous channels, fp16
    (B,H,pool_i8_blocks,VAR_GROUPS), zero past the nb real blocks.
    want_top: also returns, last, each block's position of its largest-norm token by the int8
    values (B,H,nb) int32, the first on ties (reference_predict.block_top_keys).
    `launch`: the warps per program and the token rows per step (launch.block, 0: the whole
    block; speed only). addr (table, slot): x is read at the address table[slot] holds instead
    (kernels/caller_addrs.py); x gives its type, shape and strides."""
    _check(x, "x")
    B, H, N, D = x.shape
    if head_dim < D or head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} must be a power of two >= {D}")
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
    perm = _check_perm(perm, N, dev)
    pool_i8 = pool_i8_blocks > 0
    if pool_i8 and pool_i8_blocks < nb:
        raise ValueError(f"pool_i8_blocks {pool_i8_blocks} < {nb} blocks")
    # the kernel writes the zeros past the nb real blocks itself
    poolq = torch.empty(B, H, pool_i8_blocks, head_dim, dtype=torch.int8, device=dev) if pool_i8 else xq
    pools = torch.empty(B, H, pool_i8_blocks, dtype=torch.float32, device=dev) if pool_i8 else scale
    poolv = torch.empty(B, H, pool_i8_blocks, VAR_GROUPS.value, dtype=torch.float16, device=dev) if pool_i8 else xq
    top = torch.empty(B, H, nb, dtype=torch.int32, device=dev) if want_top else scale  # strides: scale's
    launch = launch or helper_launch(f"quant_pool{block}" if block in (64, 128) else "quant_pool64", dev)
    rows = _step_rows(launch, block)
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
        ROWS=rows, num_warps=launch.num_warps,
    )
    out = (xq, scale, pool[..., :D] if want_pool else None, sim if want_sim else None)
    out = out + ((poolq, pools), poolv) if pool_i8 else out
    return out + (top,) if want_top else out


def quant_v(v: torch.Tensor, scale: torch.Tensor, block: int, head_dim: int, pv_fp8: bool,
            perm: torch.Tensor | None = None, mean_blocks: int = 0, launch: Launch | None = None,
            addr: tuple | None = None, rescale_above: float | None = None):
    """v (B,H,N,D) / scale (B,H,D) -> transposed (B,H,head_dim,nb*block) fp8 e4m3 or fp16, zero padded;
    fp8 with each 32-key group in the P.V MMA's operand order (kernels/fp8.py: column
    fp8_v_columns(n)[a] holds key a).
    mean_blocks > 0: also returns each block's mean of v / scale, transposed and in V's type
    (B,H,head_dim,mean_blocks), zero beyond the nb real blocks (mean_blocks >= nb; for fp8 a
    multiple of 32, its columns in the same operand order over the blocks).
    rescale_above (a format's largest value): a head where some |v| / scale exceeds it is
    quantized again at max |v| / rescale_above per channel over all of its tokens (floored at
    1e-20), and that scale is written into `scale` in place (contiguous fp32, so the caller's
    tensor is the one written): the overflow check of a scale taken from a sample
    (reference_quant.value_scale). Costs a second, small launch that ends at once where nothing overflowed.
    `launch`: the warps per program and the token rows per step (launch.block, 0: the whole
    block; speed only). addr (table, slot): v is read at the address table[slot] holds
    (kernels/caller_addrs.py)."""
    _check(v, "v")
    B, H, N, D = v.shape
    nb = cdiv(N, block)
    launch = launch or helper_launch("quant_v", v.device)
    rows = _step_rows(launch, block)
    if scale.shape != (B, H, D) or scale.dtype != torch.float32:
        raise ValueError("v scale must be fp32 (B, H, D)")
    check = rescale_above is not None
    if check and not scale.is_contiguous():
        raise ValueError("rescale_above writes the scale in place: it must be contiguous")
    scale = scale.contiguous()
    vt = torch.empty(B, H, head_dim, nb * block, dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16, device=v.device)
    perm = _check_perm(perm, N, v.device)
    if mean_blocks and mean_blocks < nb:
        raise ValueError(f"mean_blocks {mean_blocks} < {nb} blocks")
    if mean_blocks % 32 and pv_fp8:
        raise ValueError(f"mean_blocks {mean_blocks}: fp8 means are stored in 32-block groups (kernels/fp8.py)")
    # the kernel writes the zero columns past the nb real blocks itself
    vbar = torch.empty(B, H, head_dim, mean_blocks, dtype=vt.dtype, device=v.device) if mean_blocks else vt
    # the overflow check's per-block partials: the largest |v| / scale, and max |v| per channel
    ratio = torch.empty(B * H, nb, dtype=torch.float32, device=v.device) if check else scale
    vmaxb = torch.empty(B * H, nb, head_dim, dtype=torch.float32, device=v.device) if check else scale
    addrs, slot = addr_args(addr, scale)
    args = (v, addrs, perm if perm is not None else scale, scale, vt, vbar, vmaxb, ratio,
            v.stride(0), v.stride(1), v.stride(2), scale.stride(0), scale.stride(1), vt.stride(0), vt.stride(1),
            vt.stride(2), vbar.stride(0) if mean_blocks else 0, vbar.stride(1) if mean_blocks else 0,
            vbar.stride(2) if mean_blocks else 0, N, H)
    common = dict(BLOCK=block, HEAD_DIM=head_dim, D_TRUE=D, PV_FP8=pv_fp8, EMULATE_FP8=INTERPRET,
                  HAS_PERM=perm is not None, WANT_MEAN=mean_blocks > 0, V_SLOT=slot, ROWS=rows,
                  num_warps=launch.num_warps)
    _quant_v[(nb, B * H)](*args, mean_blocks, CHECK=check, **common)
    if check:
        # a few programs per head: on the rare overflow they share out its blocks
        _quant_v_fix[(B * H, min(FIX_PROGRAMS, nb))](*args, float(rescale_above), RBLOCK=16, **common)
    return (vt, vbar) if mean_blocks else vt
