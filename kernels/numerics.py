"""Small pieces shared by the kernels: numerics and program indexing."""
import triton
import triton.language as tl

# int32 -> fp32 without the slow conversion unit: for |x| < 2^22, adding 1.5*2^23 puts x in the
# mantissa of a float whose bit pattern is (x + 0x4B400000). int8 dots with D <= 128 stay below
# 128*127*127 ~ 2^21, so this is exact.
MAGIC_I = tl.constexpr(0x4B400000)
MAGIC_F = tl.constexpr(12582912.0)
MAGIC_D = tl.constexpr(6755399441055744.0)  # 1.5 * 2^52: the same for float64
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
def round_to_i32(x, s, INTERPRETED: tl.constexpr):
    """x * s rounded to the nearest integer, ties to even, as int32, for |x * s| < 2^22: the exact
    product rounded once, as sparge_core.reference_quant.int8_values.

    On the GPU one FFMA: x * s + MAGIC_F is exact before its one rounding, which at that magnitude
    (ulp 1) rounds the product to an integer in the mantissa bits, and an int8 store keeps their
    low byte. Before v54 the quantizers rounded half away from zero, sign(x) * floor(|x| + 0.5):
    9 instructions a value on the FP32 and integer units, a quarter of Q's quantizer. The
    interpreter's fma rounds the product first, so it takes the same steps in float64, where the
    product of two fp32 values is exact."""
    if INTERPRETED:
        i = ((x.to(tl.float64) * s.to(tl.float64) + MAGIC_D) - MAGIC_D).to(tl.int32)
    else:
        i = tl.fma(x, s, MAGIC_F).to(tl.int32, bitcast=True) - MAGIC_I
    return i


@triton.jit
def batch_head(bh, H):
    """(batch, head) of a program's flattened batch*head index, as int64 (pointer offsets of large
    tensors overflow int32)."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)
