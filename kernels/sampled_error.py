"""The error-target measurement of a sparse call in two launches (sparge_core/adapt.py,
`sampled_error`): exact attention for a few sampled query rows, and per head the sums
|out - exact| and |exact| over those rows, added into the caller's (2, H) float64 accumulator.

Done with torch ops, a measured call made ~17 launches (index_select, the split-K flash call, the
merge's softmax, product and sum, the casts, the stack, the difference, the sums, the accumulation):
~430 us of host time on an H200's host, 4-8x an unmeasured call (bench/NOTES.md v29, v30).

1. `_rows_partial_kernel`: program (row tile, batch*head, key split) gathers its rows of q by
   index (no copy of them), streams its split of the keys with an online softmax (scores and the
   running sums in fp32, P.V at about fp32 precision) and writes its partial output, normalized,
   and its log2-sum-exp. A few hundred rows alone would give only B*H*R/64 programs, each
   streaming every key; the key splits multiply that.
2. `_rows_error_kernel`: program (row tile, batch*head) merges the splits by their log2-sum-exps,
   rounds the exact rows to the model's dtype (what the model would have computed), reads the
   same rows of the call's output and atomically adds its two sums into the accumulator (the
   order of those additions varies from run to run, and with it the sums' last bits).

The rows are a tensor of token indices, or drawn in both kernels from a seed; with an address
table (kernels/caller_addrs.py) the kernels read q, k, v, out, the accumulator and the seed from it,
so one CUDA graph of the measurement serves every measured call (sparge_core.graphed.measure_graphed).
"""
import torch
import triton
import triton.language as tl

from .caller_addrs import caller_ptr
from .fp8 import INTERPRET
from .host_math import cdiv, next_pow2
from .launch import Kernel
from .numerics import batch_head

LOG2E = 1.4426950408889634
SUMS_SLOT = 4  # with an address table: q, k, v, out at slots 0-3, the sums at 4 and the rows' seed after them


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
def _caller(X, ADDRS, SLOT: tl.constexpr, TABLE: tl.constexpr):
    """X, or with TABLE the tensor whose address ADDRS[SLOT] holds (caller_addrs.caller_ptr)."""
    if TABLE:
        return caller_ptr(X, ADDRS, SLOT)
    else:
        return X


@triton.jit
def _row_index(ROWS, offs_r, r_ok, N, seed, HAS_ROWS: tl.constexpr):
    """The token index of sampled rows offs_r: from ROWS, or drawn from `seed` (Philox; the same
    seed and index give the same row in both kernels and in `sampled_rows`)."""
    if HAS_ROWS:
        return tl.load(ROWS + offs_r, mask=r_ok, other=0).to(tl.int64)
    else:
        return tl.where(r_ok, tl.randint(seed, offs_r).to(tl.int64) % N, 0)


@triton.jit
def _seed_of(SEED, ADDRS, SUMS_AT: tl.constexpr, TABLE: tl.constexpr):
    if TABLE:
        return tl.load(ADDRS + SUMS_AT + 1)
    else:
        return SEED


@triton.jit
def _rows_partial_kernel(Q, K, V, ROWS, OP, SUMS, ADDRS, SEED, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                         H, GROUP, N, R, NK, KEYS_PER_SPLIT, qk_scale, HEADS_P2: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                         UPCAST: tl.constexpr, ZERO: tl.constexpr, HAS_ROWS: tl.constexpr, TABLE: tl.constexpr,
                         SUMS_AT: tl.constexpr):
    Q = _caller(Q, ADDRS, 0, TABLE)
    K = _caller(K, ADDRS, 1, TABLE)
    V = _caller(V, ADDRS, 2, TABLE)
    SUMS = _caller(SUMS, ADDRS, SUMS_AT, TABLE)
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
    rows = _row_index(ROWS, offs_r, offs_r < R, N, _seed_of(SEED, ADDRS, SUMS_AT, TABLE), HAS_ROWS)
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
        # log2 units: qk_scale = softmax scale * log2(e)
        s = tl.dot(_operand(q, UPCAST), _operand(k, UPCAST)) * qk_scale
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
def _rows_error_kernel(OP, OUT, ROWS, SUMS, ADDRS, SEED, so_b, so_h, so_n, H, N, R, SPLITS,
                       BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                       ROUND_BF16: tl.constexpr, HAS_ROWS: tl.constexpr, TABLE: tl.constexpr,
                       SUMS_AT: tl.constexpr):
    OUT = _caller(OUT, ADDRS, 3, TABLE)
    SUMS = _caller(SUMS, ADDRS, SUMS_AT, TABLE)
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
    rows = _row_index(ROWS, offs_r, r_ok, N, _seed_of(SEED, ADDRS, SUMS_AT, TABLE), HAS_ROWS)
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


@triton.jit
def _rows_kernel(OUT, SEED, N, R, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _row_index(OUT, offs, offs < R, N, SEED, False), mask=offs < R)


_partial = Kernel(_rows_partial_kernel)
_error = Kernel(_rows_error_kernel)
_rows = Kernel(_rows_kernel)

PROGRAMS = 1024  # the partial pass's programs to aim for (key splits fill up to it)


def _tiles(head_dim: int) -> tuple:
    """(rows, keys, pipeline stages) per step of the partial pass. Past 128 channels: half the rows
    (the fp32 accumulator lives in registers) and half the keys in two stages (3 stages of 64 keys
    need 152 KB of shared memory at 256 channels; RTX 30xx-50xx allow 99 KB per block)."""
    return (64, 64, 3) if head_dim <= 128 else (32, 32, 2)


def sampled_rows(seed: int, count: int, n: int, device) -> torch.Tensor:
    """The `count` token indices in [0, n) that `seed` draws in sampled_error_sums (int64)."""
    out = torch.empty(count, dtype=torch.int64, device=device)
    if count:
        _rows[(cdiv(count, 256),)](out, seed, n, count, BLOCK=256, num_warps=1)
    return out


def sampled_error_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, rows,
                       acc: torch.Tensor | None = None, scale: float | None = None, programs: int = PROGRAMS,
                       fresh: bool = False, table: torch.Tensor | None = None,
                       sums_slot: int = SUMS_SLOT) -> torch.Tensor:
    """Add to acc (2, H) float64, per head, sum |out - exact| and sum |exact| over the sampled query
    rows of every batch item; returns acc (a new one without). q and out (B, H, N, D), k and v
    (B, Hkv, Nk, D) with H a multiple of Hkv, fp16 or bf16, any strides with the head dimension
    contiguous, D <= 256. No host sync. `programs`: speed only.

    rows: an int tensor of token indices (repeats count again), or (count, seed): `count` rows
    drawn in the kernels from the int `seed` (`sampled_rows` gives them), no tensor made.
    fresh: acc holds garbage and is zeroed first, by the first kernel (a new acc always is).
    table: an int64 address table (kernels/caller_addrs.py) from which the kernels read q, k, v
    and out at slots 0-3, acc at `sums_slot` and, with rows (count, None), the seed at the slot
    after it when they run: a CUDA graph of the measurement serves every call of the same layouts
    (sparge_core/graphed.py; a sparse call's graph that measures too puts its thresholds between
    out and acc). The tensors passed then only give shapes, strides and dtypes."""
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
    if acc is None:
        acc, fresh = torch.empty(2, H, dtype=torch.float64, device=q.device), True
    if acc.shape != (2, H) or acc.dtype != torch.float64 or not acc.is_contiguous():
        raise ValueError(f"acc must be a contiguous (2, {H}) float64 tensor, got {tuple(acc.shape)} {acc.dtype}")
    has_rows = isinstance(rows, torch.Tensor)
    if has_rows:
        if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rows must be a 1-D int tensor or (count, seed), got {tuple(rows.shape)} {rows.dtype}")
        R, seed, devices = rows.shape[0], 0, (q, k, v, out, rows, acc)
    else:
        R, seed = int(rows[0]), rows[1]
        devices = (q, k, v, out, acc)
        if R < 0 or (seed is None) != (table is not None):
            raise ValueError("rows (count, seed) takes an int seed, or None with a table (the seed after acc's slot)")
        seed = 0 if seed is None else int(seed)
    if len({t.device for t in devices}) != 1:
        raise ValueError("q, k, v, out, rows and acc must be on one device")
    if table is not None and (table.dtype != torch.int64 or table.dim() != 1
                              or not SUMS_SLOT <= sums_slot < table.numel() - 1 or table.device != q.device):
        raise ValueError(f"table must be an int64 1-D address table on {q.device} with acc's slot {sums_slot} >= "
                         f"{SUMS_SLOT} and the seed's after it")
    if R == 0:
        return acc.zero_() if fresh else acc
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
    idx = rows if has_rows else part  # the rows' tensor, or a stand-in the kernels do not read
    addrs = table if table is not None else part
    _partial[(tiles, B * H, splits)](
        q, k, v, idx, part, acc, addrs, seed, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), H, H // Hkv, N, R, Nk, per_split, qk_scale,
        HEADS_P2=next_pow2(H), BLOCK_R=br, BLOCK_N=bn, HEAD_DIM=hd, D=D, UPCAST=INTERPRET, ZERO=fresh,
        HAS_ROWS=has_rows, TABLE=table is not None, SUMS_AT=sums_slot, num_warps=4, num_stages=stages,
    )
    _error[(tiles, B * H)](part, out, idx, acc, addrs, seed, out.stride(0), out.stride(1), out.stride(2), H, N, R,
                           splits, BLOCK_R=br, HEAD_DIM=hd, D=D, ROUND_BF16=INTERPRET and out.dtype == torch.bfloat16,
                           HAS_ROWS=has_rows, TABLE=table is not None, SUMS_AT=sums_slot, num_warps=4)
    return acc
