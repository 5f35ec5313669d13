"""V's per-channel fp8/fp16 cast, written transposed so that the P.V product reads it K-major (fp8
in the MMA operand's order, kernels/fp8.py), with the estimate's mean values and the overflow
check of a scale taken from a sample."""
import torch
import triton
import triton.language as tl

from .caller_addrs import addr_args, caller_ptr
from .config import Launch, helper_launch
from .fp8 import INTERPRET, to_pv_dtype, v_column
from .host_math import cdiv
from .launch import Kernel
from .numerics import batch_head
from .token_blocks import check_input, check_perm, step_rows, token_rows


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
        offs_n, valid, rows = token_rows(PERM, blk * (BLOCK // ROWS) + i, N, ROWS, HAS_PERM, PV_FP8)
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
    check_input(v, "v")
    B, H, N, D = v.shape
    nb = cdiv(N, block)
    launch = launch or helper_launch("quant_v", v.device)
    rows = step_rows(launch, block)
    if scale.shape != (B, H, D) or scale.dtype != torch.float32:
        raise ValueError("v scale must be fp32 (B, H, D)")
    check = rescale_above is not None
    if check and not scale.is_contiguous():
        raise ValueError("rescale_above writes the scale in place: it must be contiguous")
    scale = scale.contiguous()
    vt = torch.empty(B, H, head_dim, nb * block, dtype=torch.float8_e4m3fn if pv_fp8 else torch.float16, device=v.device)
    perm = check_perm(perm, N, v.device)
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
                  **launch.warps_and_cap())
    _quant_v[(nb, B * H)](*args, mean_blocks, CHECK=check, **common)
    if check:
        # a few programs per head: on the rare overflow they share out its blocks
        _quant_v_fix[(B * H, min(FIX_PROGRAMS, nb))](*args, float(rescale_above), RBLOCK=16, **common)
    return (vt, vbar) if mean_blocks else vt
