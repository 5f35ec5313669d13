"""Small pieces shared by the kernels: numerics and program indexing."""
import triton
import triton.language as tl

# int32 -> fp32 without the slow conversion unit: for |x| < 2^22, adding 1.5*2^23 puts x in the
# mantissa of a float whose bit pattern is (x + 0x4B400000). int8 dots with D <= 128 stay below
# 128*127*127 ~ 2^21, so this is exact.
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def int32_bits_f32(x):
    """The float whose bits are x + MAGIC_I: equals x + MAGIC_F exactly, so it orders like x."""
    return (x + MAGIC_I).to(tl.float32, bitcast=True)


@triton.jit
def log2_mufu(x, INTERPRETED: tl.constexpr):
    """log2 on the MUFU (lg2.approx.ftz.f32: absolute error ~2^-22 for x in [0.5, 2], relative
    elsewhere) instead of libdevice's precise log2 (~25 FFMA and a range fix-up); the interpreter
    runs no inline assembly and takes the precise one."""
    if INTERPRETED:
        y = tl.math.log2(x)
    else:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def round_half_away(x):
    """sign(x) * floor(|x| + 0.5) as int32, as sparge_core.reference rounds, for |x| < 2^22.

    On the FP32 and integer units: floor and float->int run on the conversion unit, 16 results
    per clock per SM on Hopper against 128 FP32 ones, and the quantizers spent 3 of them per
    element. Adding MAGIC_F rounds a = |x| + 0.5 to the nearest integer (ties to even) in the
    mantissa bits; one less where that rounded up gives floor(a)."""
    a = tl.abs(x) + 0.5
    t = a + MAGIC_F
    i = t.to(tl.int32, bitcast=True) - MAGIC_I
    i = tl.where(t - MAGIC_F > a, i - 1, i)
    return tl.where(x < 0, -i, i)


@triton.jit
def batch_head(bh, H):
    """(batch, head) of a program's flattened batch*head index, as int64 (pointer offsets of large
    tensors overflow int32)."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)
