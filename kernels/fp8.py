"""fp8 e4m3 rounding for the Triton interpreter.

The CPU interpreter's fp32 -> fp8 cast mis-rounds values just below a power of two (125.9
became 64 in Triton 3.8). Under TRITON_INTERPRET we round to the e4m3 grid ourselves (round
half to even, like the GPU's cvt) so the cast that follows is exact. Compiled kernels never
use this path."""
import os

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
