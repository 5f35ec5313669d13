"""K's per-channel mean (for smoothing) and V's per-channel max |v| (for its fp8 scale) in one
pass over both tensors; optionally over a fixed sample of their rows only (runs of R rows, one
run in every E), so that the pass reads 1/E of K (and of V, when V's max comes from the sample
too). Two torch reductions along the token axis cost ~2x the bytes' time; here each program
reduces a run of token blocks to one partial row, and a second small kernel sums the few partials
per head in a fixed order (deterministic) and finishes the mean and the scale: one launch where
five torch ops (sum, divide, max, divide, clamp) each launched their own."""
import torch
import triton
import triton.language as tl

from .caller_addrs import addr_args, caller_ptr
from .config import Launch, helper_launch
from .host_math import cdiv, next_pow2
from .launch import Kernel
from .numerics import batch_head


@triton.jit
def _kv_stats_kernel(K, V, ADDRS, PERM, KSUM, VMAX, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, N, H, ROWS_PER_PROG, NCHUNK,
                     BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr,
                     STAGES: tl.constexpr, SAMPLE_ROWS: tl.constexpr, SAMPLE_EVERY: tl.constexpr,
                     HAS_PERM: tl.constexpr, V_SAMPLED: tl.constexpr, K_SLOT: tl.constexpr,
                     V_SLOT: tl.constexpr):
    K = caller_ptr(K, ADDRS, K_SLOT)
    V = caller_ptr(V, ADDRS, V_SLOT)
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = batch_head(bh, H)
    offs_d = tl.arange(0, HEAD_DIM)
    start = c * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, N)
    k_base = K + b * sk_b + h * sk_h + offs_d[None, :]
    v_base = V + b * sv_b + h * sv_h + offs_d[None, :]
    if V_SAMPLED:  # V's max over the sample's rows, in the loop below
        vmax = tl.zeros([SAMPLE_ROWS, HEAD_DIM], dtype=tl.float32)
    else:
        vmax = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        # STAGES > 1: the next steps' loads in flight (cp.async) while this one is reduced
        for r in tl.range(start, end, BLOCK, num_stages=STAGES):
            offs_n = r + tl.arange(0, BLOCK)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n,
                        mask=(offs_n < N)[:, None] & (offs_d < D_V)[None, :], other=0.0)
            vmax = tl.maximum(vmax, tl.abs(v.to(tl.float32)))
    # the sample's runs (every row when SAMPLE_EVERY is 1) that start in this chunk (chunks start
    # at multiples of SAMPLE_ROWS), in the order the attention visits the keys: through PERM when
    # it has one (the sample then is the reference's, which smooths the permuted keys)
    ksum_t = tl.zeros([SAMPLE_ROWS, HEAD_DIM], dtype=tl.float32)
    period = SAMPLE_ROWS * SAMPLE_EVERY
    # loads ahead here too: a program is a chain of runs (PERM, then K's and V's rows), so without
    # them each run waits out its loads' latency (v57: with 256 programs, one wave on an H100)
    for r in tl.range(tl.cdiv(start, period) * period, end, period, num_stages=STAGES):
        offs_n = r + tl.arange(0, SAMPLE_ROWS)
        rows = offs_n
        if HAS_PERM:
            rows = tl.load(PERM + offs_n, mask=offs_n < N, other=0)
        k = tl.load(k_base + rows[:, None].to(tl.int64) * sk_n,
                    mask=(offs_n < N)[:, None] & (offs_d < D_K)[None, :], other=0.0)
        ksum_t += k.to(tl.float32)
        if V_SAMPLED:
            v = tl.load(v_base + rows[:, None].to(tl.int64) * sv_n,
                        mask=(offs_n < N)[:, None] & (offs_d < D_V)[None, :], other=0.0)
            vmax = tl.maximum(vmax, tl.abs(v.to(tl.float32)))
    ksum = tl.sum(ksum_t, 0)
    out = (bh * NCHUNK + c) * HEAD_DIM + offs_d
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, tl.max(vmax, 0))


_kv_stats = Kernel(_kv_stats_kernel)


@triton.jit
def _kv_finish_kernel(KSUM, VMAX, KMEAN, VOUT, k_count, NCHUNK, v_headroom, v_div, HEAD_DIM: tl.constexpr,
                      D_K: tl.constexpr, D_V: tl.constexpr, SCALE: tl.constexpr):
    bh = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    ksum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    vmax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for c in range(NCHUNK):
        ksum += tl.load(KSUM + (bh * NCHUNK + c) * HEAD_DIM + offs_d)
        vmax = tl.maximum(vmax, tl.load(VMAX + (bh * NCHUNK + c) * HEAD_DIM + offs_d))
    tl.store(KMEAN + bh * D_K + offs_d, ksum / k_count, mask=offs_d < D_K)
    if SCALE:  # the reference's scale: max(amax * headroom / format max, 1e-20), in its order;
        # div_rn: Triton's `/` is the approximate div.full.f32 on NVIDIA GPUs (up to 2 ulp)
        vmax = tl.maximum(tl.math.div_rn(vmax * v_headroom, v_div), 1e-20)
    tl.store(VOUT + bh * D_V + offs_d, vmax, mask=offs_d < D_V)


_kv_finish = Kernel(_kv_finish_kernel)


def kv_stats(k: torch.Tensor, v: torch.Tensor, v_format_max: float | None = None,
             launch: Launch | None = None, k_sample: tuple[int, int] | None = None,
             perm: torch.Tensor | None = None, k_addr: tuple | None = None,
             v_addr: tuple | None = None, v_headroom: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B,H,N,Dk), v (B,H,N,Dv) -> (mean of k over N (B,H,Dk), max |v| over N (B,H,Dv)), fp32.
    With v_format_max, the second is V's per-channel scale for a format whose largest value that
    is: max(max |v| / v_format_max, 1e-20). k_sample (R, E): the mean of k over the rows i with
    (i // R) % E == 0 only (R a power of two <= 128); with `perm` (int32 (N,)), row i is k's row
    perm[i] (the order the attention visits the keys in). v_headroom (needs v_format_max): V's
    max over the same sampled rows, and the scale max(max |v| * v_headroom / v_format_max, 1e-20)
    (reference_quant.value_scale before its overflow check, which quant_v's rescale_above does).
    `launch`: rows per step, warps, programs (speed only). k_addr, v_addr (table, slot): read k or
    v at the address table[slot] holds (kernels/caller_addrs.py)."""
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must be (B, H, N, D) with the same B, H, N, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must be contiguous in the head dimension")
    B, H, N, Dk = k.shape
    Dv = v.shape[3]
    hd = next_pow2(max(Dk, Dv))
    launch = launch or helper_launch("kv_stats", k.device)
    block = launch.block or 32
    s_rows, s_every = k_sample or (block, 1)  # the full mean: every run of `block` keys
    if s_rows < 1 or s_rows & (s_rows - 1) or s_rows > 128 or s_every < 1:
        raise ValueError(f"k_sample must be (R, E), R a power of two <= 128 and E >= 1, got {k_sample}")
    if v_headroom is not None and v_format_max is None:
        raise ValueError("v_headroom needs v_format_max")
    if perm is not None and (perm.dtype != torch.int32 or perm.shape != (N,) or perm.device != k.device):
        raise ValueError(f"perm must be an int32 ({N},) tensor on {k.device}")
    full, rest = divmod(N, s_rows * s_every)
    k_count = full * s_rows + min(s_rows, rest)  # N when every key counts
    # enough programs to fill the GPU several times over, each a whole number of token blocks
    nchunk = max(1, min(cdiv(N, block), cdiv(launch.programs, B * H)))
    step = max(block, s_rows)  # chunks start at whole runs
    rows = cdiv(cdiv(N, nchunk), step) * step
    nchunk = cdiv(N, rows)
    ksum = torch.empty(B * H, nchunk, hd, dtype=torch.float32, device=k.device)
    vmax = torch.empty_like(ksum)
    v_sampled = v_headroom is not None
    # the full mean and the full max do not depend on the order
    sampled_perm = perm is not None and s_every > 1
    addrs, k_slot = addr_args(k_addr, ksum)
    addrs_v, v_slot = addr_args(v_addr, ksum)
    if k_slot >= 0 and v_slot >= 0 and addrs_v is not addrs:
        raise ValueError("k_addr and v_addr must name one address table")
    _kv_stats[(nchunk, B * H)](
        k, v, addrs if k_slot >= 0 else addrs_v, perm.contiguous() if sampled_perm else ksum, ksum, vmax,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        N, H, rows, nchunk, BLOCK=block, HEAD_DIM=hd, D_K=Dk, D_V=Dv, STAGES=launch.num_stages,
        SAMPLE_ROWS=s_rows, SAMPLE_EVERY=s_every, HAS_PERM=sampled_perm, V_SAMPLED=v_sampled, K_SLOT=k_slot,
        V_SLOT=v_slot,
        **launch.warps_and_cap(),
    )
    k_mean = torch.empty(B, H, Dk, dtype=torch.float32, device=k.device)
    v_out = torch.empty(B, H, Dv, dtype=torch.float32, device=k.device)
    _kv_finish[(B * H,)](ksum, vmax, k_mean, v_out, float(k_count), nchunk, float(v_headroom or 1.0),
                         float(v_format_max or 1.0),
                         HEAD_DIM=hd, D_K=Dk, D_V=Dv, SCALE=v_format_max is not None, num_warps=1)
    return k_mean, v_out
