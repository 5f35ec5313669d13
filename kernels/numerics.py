"""Small pieces shared by the kernels: numerics and program indexing."""
import triton
import triton.language as tl

# int32 -> fp32 without the slow conversion unit: for |x| < 2^22, adding 1.5*2^23 puts x in the
# mantissa of a float whose bit pattern is (x + 0x4B400000). int8 dots with D <= 128 stay below
# 128*127*127 ~ 2^21, so this is exact.
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)


@triton.jit
def int32_bits_f32(x):
    """The float whose bits are x + MAGIC_I: equals x + MAGIC_F exactly, so it orders like x."""
    return (x + MAGIC_I).to(tl.float32, bitcast=True)


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


@triton.jit
def exp2_fma(x):
    """2^x on the FP32 and integer units instead of the MUFU, which gives 16 results per clock
    per SM on Hopper against 128 FMAs (FlashAttention-4's split of the softmax's exponentials).
    x = n + f with n = round(x) (MAGIC_F's mantissa trick, as above) and f in [-0.5, 0.5]: 2^f
    from a degree-3 minimax polynomial, relative error 7.5e-5 (P is then rounded to fp8, steps
    of 6%), and n added to its exponent bits. x is clamped at -125 so that every result is a
    normal float: -inf gives 2^-125 where exp2 gives 0, far below anything a sum of P or an fp8
    value keeps."""
    x = tl.maximum(x, -125.0)
    t = x + MAGIC_F
    f = x - (t - MAGIC_F)
    p = ((0.05517132 * f + 0.24261054) * f + 0.69326097) * f + 0.99992812
    n = t.to(tl.int32, bitcast=True) - MAGIC_I
    return (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)
