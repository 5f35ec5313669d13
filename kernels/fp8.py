"""fp8 P.V operands: the order of V's keys in fp8, and e4m3 rounding for the Triton interpreter.

V^T in fp8 stores each 32-key group of a block in the order of the fp8 MMA's A operand (P):
the softmax tile P comes out of the Q.K^T MMA with each thread holding columns 2t, 2t+1 of
every 8, while an fp8 A operand wants k = 4t..4t+3 and 16+4t..16+4t+3 of every 32 (t = lane %
4; wgmma on sm_90 and mma.sync on sm_89 alike). Keys in that order make the reorder of P a
relabelling within each thread (p_operand) instead of shuffles between lanes
and byte permutes (sm_90: 51 of the loop's 634 instructions per key block). Position a
(5 bits h i1 q1 q0 i0 within its group) is stored at column h q1 q0 i1 i0. fp16 V^T keeps the
keys' order: its A operand already matches the tile (k = 2t, 2t+1 of every 8). The block
means of fp8 V (fill_skipped's mean values, one per key block) are stored the same way over
the blocks, for the fill pass's P (sm_90: its loop 475 -> 450 instructions).

The CPU interpreter's fp32 -> fp8 cast mis-rounds values just below a power of two (125.9
became 64 in Triton 3.8). Under TRITON_INTERPRET we round to the e4m3 grid ourselves (round
half to even, like the GPU's cvt) so the cast that follows is exact. Compiled kernels never
use this path."""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def round_to_e4m3(x):
    ax = tl.minimum(tl.abs(x), 448.0)
    e = tl.floor(tl.math.log2(tl.maximum(ax, 1e-30)))
    e = tl.maximum(e, -6.0)  # below 2^-6 the spacing is fixed (subnormals)
    ulp = tl.math.exp2(e - 3.0)
    y = ax / ulp
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where(tie & odd, r - 1.0, r)
    return tl.where(x < 0, -r * ulp, r * ulp)


@triton.jit
def to_pv_dtype(x, PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """x as a P.V operand: fp8 e4m3 (rounded by round_to_e4m3 under the interpreter) or fp16."""
    if PV_FP8:
        if EMULATE_FP8:
            x = round_to_e4m3(x)
        y = x.to(tl.float8e4nv)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def v_column(pos, PV_FP8: tl.constexpr):
    """The column of quant_v's V^T (or of its block means) that holds key (block) position pos:
    in fp8 the operand's order (see the module's docstring), in fp16 pos itself."""
    if PV_FP8:
        pos = (pos & ~31) | (pos & 16) | (((pos >> 1) & 3) << 2) | (((pos >> 3) & 1) << 1) | (pos & 1)
    return pos


@triton.jit
def v_key(col, PV_FP8: tl.constexpr):
    """The inverse of v_column: the key (block) position that column col holds."""
    if PV_FP8:
        col = (col & ~31) | (col & 16) | (((col >> 1) & 1) << 3) | (((col >> 2) & 3) << 1) | (col & 1)
    return col


def fp8_v_columns(n: int, device=None) -> torch.Tensor:
    """v_column of fp8 for positions 0..n-1 (n a multiple of 32), on the host (the same function
    on a torch index): column fp8_v_columns(n)[a] of an fp8 V^T from quant_v holds key a."""
    return v_column.fn(torch.arange(n, device=device), True)


def v_in_key_order(vt: torch.Tensor) -> torch.Tensor:
    """quant_v's V^T, or its block means, with the columns in key (block) order."""
    return vt[..., fp8_v_columns(vt.shape[-1], vt.device)] if vt.dtype == torch.float8_e4m3fn else vt


@triton.jit
def p_operand(p, PV_FP8: tl.constexpr, EMULATE_FP8: tl.constexpr):
    """P as the P.V operand: in V's type, and in fp8 with its columns in fp8 V^T's key order
    (this module's docstring): column k = (h q1 q0 i1 i0) of each 32 takes P's column
    (h i1 q1 q0 i0). In the MMA layouts each thread already holds those values, so this is a
    relabelling of its registers: on sm_90 the attention loop's shuffles 24 -> 8 (the row
    reductions'), byte permutes and selects 32 -> 0, instructions 634 -> 583 per key block."""
    p = to_pv_dtype(p, PV_FP8, EMULATE_FP8)
    if PV_FP8:
        BM: tl.constexpr = p.shape[0]
        BN: tl.constexpr = p.shape[1]
        p = tl.reshape(tl.permute(tl.reshape(p, [BM, BN // 32, 2, 2, 4, 2]), [0, 1, 2, 4, 3, 5]), [BM, BN])
    return p
