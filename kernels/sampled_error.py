"""The error-target measurement of a sparse call in two launches (sparge_core/adapt.py,
`sampled_error`): exact attention for a few sampled query rows, and per head the sums
|out - exact| and |exact| over those rows, added into the caller's (2, H) float64 accumulator.

Done with torch ops, a measured call made ~17 launches (index_select, the split-K flash call, the
merge's softmax, product and sum, the casts, the stack, the difference, the sums, the accumulation):
~430 us of host time on an H200's host, 4-8x an unmeasured call (bench/NOTES.md v29).

1. `_rows_partial_kernel`: program (row tile, batch*head, key split) gathers its rows of q by
   index (no copy of them), streams its split of the keys with an online softmax (scores and
   the running sums in fp32, P.V at about fp32 precision) and writes
   its partial output, normalized, and its log2-sum-exp. A few hundred rows alone would give only
   B*H*R/64 programs, each streaming every key; the key splits multiply that.
2. `_rows_error_kernel`: program (row tile, batch*head) merges the splits by their log2-sum-exps,
   rounds the exact rows to the model's dtype (what the model would have computed), reads the
   same rows of the call's output and atomically adds its two sums into the accumulator.
"""
import torch
import triton
import triton.language as tl

from .fp8 import INTERPRET
from .host_math import cdiv, next_pow2
from .launch import Kernel
from .numerics import batch_head

LOG2E = 1.4426950408889634


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A dot operand; upcast to fp32 (exactly) under the interpreter, whose bf16 dot is wrong
    (Triton 3.8: 16x16 products off by 1e10)."""
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 (ties to even), as fp32: the interpreter's cast truncates."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rows_partial_kernel(Q, K, V, ROWS, OP, SUMS, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                         H, GROUP, R, NK, KEYS_PER_SPLIT, qk_scale, HEADS_P2: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                         UPCAST: tl.constexpr, ZERO: tl.constexpr):
    rt = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    nbh = tl.num_programs(1)
    b, h = batch_head(bh, H)
    if ZERO:  # a fresh accumulator: zeroed here, before the next launch adds into it (one launch less)
        if rt + bh + split == 0:
            offs_h = tl.arange(0, 2 * HEADS_P2)
            tl.store(SUMS + offs_h, tl.zeros([2 * HEADS_P2], dtype=tl.float64), mask=offs_h < 2 * H)
    LSE2 = OP + tl.num_programs(2).to(tl.int64) * nbh * R * HEAD_DIM  # the log2-sum-exps follow the outputs
    hk = h // GROUP
    offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    rows = tl.load(ROWS + offs_r, mask=offs_r < R, other=0).to(tl.int64)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :],
                mask=(offs_r < R)[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * sk_b + hk * sk_h + offs_d[:, None]
    v_base = V + b * sv_b + hk * sv_h + offs_d[None, :]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    start = split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, NK)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * sk_n, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(_operand(q, UPCAST), _operand(k, UPCAST)) * qk_scale  # log2 units: qk_scale = softmax scale * log2(e)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # P as the sum of two values of v's dtype: P.V at ~fp32 precision for twice a small product's
        # MMAs (flash attention rounds P to 8 or 11 bits: ~0.3% off at bf16, a bias of the reference)
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        v = _operand(v, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(_operand(p_hi, UPCAST), v) + tl.dot(_operand(p_lo, UPCAST), v)
        m = m_new
    # every split holds at least one key (the launcher's split length), so l > 0
    part = (split * nbh + bh) * R + offs_r
    r_ok = offs_r < R
    tl.store(OP + part[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], acc / l[:, None], mask=r_ok[:, None])
    tl.store(LSE2 + part, m + tl.log2(l), mask=r_ok)


@triton.jit
def _rows_error_kernel(OP, OUT, ROWS, SUMS, so_b, so_h, so_n, H, R, SPLITS,
                       BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                       ROUND_BF16: tl.constexpr):
    rt = tl.program_id(0)
    bh = tl.program_id(1)
    nbh = tl.num_programs(1)
    b, h = batch_head(bh, H)
    LSE2 = OP + nbh.to(tl.int64) * SPLITS * R * HEAD_DIM
    offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = offs_r < R
    ok = r_ok[:, None] & (offs_d < D)[None, :]
    # the splits' weights exp2(lse_s - max) / sum: each split's share of the softmax's denominator
    top = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(SPLITS):
        top = tl.maximum(top, tl.load(LSE2 + (s * nbh + bh) * R + offs_r, mask=r_ok, other=0.0))
    num = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(SPLITS):
        part = (s * nbh + bh) * R + offs_r
        w = tl.exp2(tl.load(LSE2 + part, mask=r_ok, other=0.0) - top)
        den += w
        num += w[:, None] * tl.load(OP + part[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    rows = tl.load(ROWS + offs_r, mask=r_ok, other=0).to(tl.int64)
    out = tl.load(OUT + b * so_b + h * so_h + rows[:, None] * so_n + offs_d[None, :], mask=ok, other=0.0)
    exact = num / den[:, None]
    if ROUND_BF16:
        exact = _round_bf16(exact)
    else:
        exact = exact.to(out.dtype).to(tl.float32)
    exact = tl.where(ok, exact, 0.0)
    diff = tl.sum(tl.sum(tl.abs(out.to(tl.float32) - exact), 1), 0)
    ref = tl.sum(tl.sum(tl.abs(exact), 1), 0)
    tl.atomic_add(SUMS + h, diff.to(tl.float64))
    tl.atomic_add(SUMS + H + h, ref.to(tl.float64))


_partial = Kernel(_rows_partial_kernel)
_error = Kernel(_rows_error_kernel)

PROGRAMS = 1024  # the partial pass's programs to aim for (key splits fill up to it)


def _tiles(head_dim: int) -> tuple:
    """(rows, keys, pipeline stages) per step of the partial pass. Past 128 channels: half the rows
    (the fp32 accumulator lives in registers) and half the keys in two stages (3 stages of 64 keys
    need 152 KB of shared memory at 256 channels; RTX 30xx-50xx allow 99 KB per block)."""
    return (64, 64, 3) if head_dim <= 128 else (32, 32, 2)


def sampled_error_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
                       acc: torch.Tensor | None = None, scale: float | None = None,
                       programs: int = PROGRAMS) -> torch.Tensor:
    """Add to acc (2, H) float64, per head, sum |out - exact| and sum |exact| over the query `rows`
    (int64 token indices, repeats count again) of every batch item; returns acc (a new one
    without). q and out
    (B, H, N, D), k and v (B, Hkv, Nk, D) with H a multiple of Hkv, fp16 or bf16, any strides with
    the head dimension contiguous, D <= 256. No host sync. `programs`: speed only."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or out.shape != q.shape:
        raise ValueError(f"q, out (B, H, N, D) and k, v (B, Hkv, Nk, D) expected, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)}")
    B, H, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or H % Hkv or Nk == 0:
        raise ValueError(f"k and v must be (B, Hkv, Nk, {D}) with H a multiple of Hkv, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or {k.dtype, v.dtype, out.dtype} != {q.dtype} or D > 256:
        raise ValueError(f"fp16 or bf16 q, k, v, out of one dtype with D <= 256 expected, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {out.dtype}, D={D}")
    if any(t.stride(-1) != 1 for t in (q, k, v, out)):
        raise ValueError("q, k, v and out must be contiguous in the head dimension")
    zero = acc is None
    if zero:
        acc = torch.empty(2, H, dtype=torch.float64, device=q.device)
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64) or acc.shape != (2, H) \
            or acc.dtype != torch.float64 or not acc.is_contiguous():
        raise ValueError(f"rows (R,) int and acc (2, {H}) contiguous float64 expected, got {tuple(rows.shape)} "
                         f"{rows.dtype}, {tuple(acc.shape)} {acc.dtype}")
    if len({t.device for t in (q, k, v, out, rows, acc)}) != 1:
        raise ValueError("q, k, v, out, rows and acc must be on one device")
    R = rows.shape[0]
    if R == 0:
        return acc.zero_() if zero else acc
    hd = max(16, next_pow2(D))
    br, bn, stages = _tiles(hd)
    tiles = cdiv(R, br)
    # key splits: enough programs to fill the GPU, each split a whole number of key tiles, none empty
    splits = max(1, min(cdiv(programs, tiles * B * H), cdiv(Nk, bn)))
    per_split = cdiv(cdiv(Nk, splits), bn) * bn
    splits = cdiv(Nk, per_split)
    # each split's normalized output rows, then their log2-sum-exps: one allocation
    part = torch.empty(splits * B * H * R * (hd + 1), dtype=torch.float32, device=q.device)
    qk_scale = (D ** -0.5 if scale is None else float(scale)) * LOG2E
    _partial[(tiles, B * H, splits)](
        q, k, v, rows, part, acc, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), H, H // Hkv, R, Nk, per_split, qk_scale, HEADS_P2=next_pow2(H),
        BLOCK_R=br, BLOCK_N=bn, HEAD_DIM=hd, D=D, UPCAST=INTERPRET, ZERO=zero, num_warps=4, num_stages=stages,
    )
    _error[(tiles, B * H)](part, out, rows, acc, out.stride(0), out.stride(1), out.stride(2), H, R, splits,
                           BLOCK_R=br, HEAD_DIM=hd, D=D, ROUND_BF16=INTERPRET and out.dtype == torch.bfloat16,
                           num_warps=4)
    return acc
