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
    """Round to the nearest integer, halves away from zero (as sparge_core.reference does)."""
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(0.5 - x))


@triton.jit
def batch_head(bh, H):
    """(batch, head) of a program's flattened batch*head index, as int64 (pointer offsets of large
    tensors overflow int32)."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)
