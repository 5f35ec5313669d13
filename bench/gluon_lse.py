"""Prototype of the stage-1 "lse" scoring kernel (kernels/block_scores.py, _block_lse_kernel) in
Gluon for Hopper (sm_90), in the production default case: every key (key_stride 1), the mean
scores from the int8 mean keys (want_mean, kbar), no guard.

Why: in the Triton kernel each program waits for its int8 wgmma right after issuing it, so the
exponentials and row reductions of key block j never overlap the tensor-core product of block
j+1 (~127 us at Wan 480p, ~2.7x the MUFU.EX2 bound). Gluon exposes the async wgmma and its wait,
TMA and mbarriers, so the overlap is written out here.

Variant "pipe" (one warpgroup = 64 pooled queries x up to KB_TILE consecutive key blocks per
program, the production grid; no warp specialization):
  * K tiles (128 keys x 128 dims, int8) come by TMA into a STAGES-deep shared-memory ring, one
    mbarrier per slot (expect-tx bytes, phase = (use count) & 1). The program's key blocks are
    consecutive, so every load is known ahead: the prologue issues blocks 0..STAGES-1 and step j
    refills the slot of block j (its product S_j was waited for at the end of step j-1) with
    block j+STAGES. Loads past the program's blocks are predicated off (no branch: at a control
    flow join ptxas waits for every wgmma in flight).
  * The pooled queries are loaded (fp32), quantized to int8 per row in the kernel (the exact
    product rounded once in an FFMA, kernels/numerics.round_to_i32 re-expressed; v54), and
    stored once into shared memory, the A operand of every product (no registers held for Q).
  * Software pipelined by one block: step j waits for K_{j+1}'s barrier, issues
    S_{j+1} = Q_i8 . K_{j+1}^T (int8 -> int32, 4 IGMMA k-steps) asynchronously, then runs block
    j's magic-number conversion, row max, exp2 (MUFU.EX2), row sum and log2 on the CUDA cores
    while the tensor cores compute S_{j+1}; one warpgroup_mma_wait(0) at the end of the step
    hands S_{j+1} to the next step. Two int32 score tiles are live at the peak (64 + 64
    registers per thread).
  * Numerics as production: s = bits(dot + MAGIC_I) = dot + MAGIC_F exactly, f_max = row max,
    c = row_scale * ks, lse = (f_max - MAGIC_F) * c + log2(sum exp2((s - f_max) * c)), in log2
    units, row_scale = qamax / 127 * scale_log2. The program's last block is peeled and always
    masked (-inf on keys >= n_k): only the sequence's last block can be partial, and the mask is
    a no-op on a full one.
  * Per-(row, key block) results collect in a (64, KB_TILE) register tile in the layout of the
    mean product's accumulator (its row slice is the score tile's row slice: the per-block
    conversion is checked trivial at compile time, no shared memory, no barrier), stored once at
    the end. The mean scores are one int8 product of the quantized queries with the tile's
    KB_TILE mean keys (loaded with masks, as production, into shared memory), times the row
    scale times the mean-key scale; issued asynchronously together with S_0 and stored right
    away (a single store, as production's, but its registers are free for the loop).

sm_90 compile (Triton 3.6, Wan 480p shapes; `--compile` prints these): "pipe" 168 registers (the
cap, production's; 179 uncapped), no spills, 61,464 B dynamic shared memory (3 x 16 KB K slots, Q
8 KB, mean keys 4 KB, barriers): 3 programs per SM, as production. Main loop SASS: TMA refill
(3 BAR.SYNC around the elected-thread mbarrier/TMA ops), the mbarrier try-wait, ~21 MUFU.EX2 of
block j hoisted by ptxas, WARPGROUP.ARRIVE, the 4 IGMMA.64x128x32.S8.S8 of S_{j+1} interleaved
with the remaining ~43 MUFU.EX2, then WARPGROUP.DEPBAR.LE 0 after all 64 EX2 of the block (the
row sums and log2 around it); no LDS/STS in the loop. Production's loop: IGMMA x4, DEPBAR at once,
then the 64 EX2 (no overlap).
Tried and left out: issuing S_{j+2} at the end of step j (one product in flight across the loop's
back edge) makes ptxas serialize every wgmma (a DEPBAR after each IGMMA); computing block j's row
max before the loads' waits does not move the IGMMA above the hoisted EX2s (ptxas's choice, with
or without the register cap).

    /work/venv36/bin/python bench/gluon_lse.py --compile [--sass]   # sm_90 compile facts, no GPU
"""
import os
import sys

if __name__ == "__main__" and "--compile" in sys.argv:
    os.environ.pop("TRITON_INTERPRET", None)  # an interpreted kernel does not compile

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_R = 64  # pooled queries per program: one warpgroup's wgmma M
COMPILED = {}  # VARIANTS name -> the compiled kernel of its last launch (registers, spills, shared memory)
MAGIC_I = gl.constexpr(0x4B400000)  # see kernels/numerics.py
MAGIC_F = gl.constexpr(12582912.0)


@gluon.jit
def _round_to_i32(x, s):
    """kernels.numerics.round_to_i32 in Gluon (the GPU's branch): x * s rounded to the nearest
    integer, ties to even, as int32: x * s + MAGIC_F is exact before the FFMA's one rounding."""
    return gl.fma(x, s, MAGIC_F).to(gl.int32, bitcast=True) - MAGIC_I


@gluon.jit
def _scores_max(s_i, kb, N_K, BLOCK_N: gl.constexpr, MMA: gl.constexpr, MASK: gl.constexpr):
    """One block's int32 scores as floats and their row max (production's _block_lse with
    key_stride 1): the float bits of dot + MAGIC_I equal dot + MAGIC_F exactly, so s - f_max is
    exact and each score keeps full fp32 precision. MASK: -inf on the keys >= N_K."""
    s = (s_i + MAGIC_I).to(gl.float32, bitcast=True)
    if MASK:
        cols = kb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, MMA))
        s = gl.where((cols < N_K)[None, :], s, float("-inf"))
    return s, gl.max(s, 1)


@gluon.jit
def _lse_rest(s, f_max, row_scale, ks):
    """log2 sum_j exp2(dot_j * row_scale * ks) per row, from _scores_max's floats and row max."""
    c = row_scale * ks
    return (f_max - MAGIC_F) * c + gl.log2(gl.sum(gl.exp2((s - f_max[:, None]) * c[:, None]), 1))


@gluon.jit
def _lse_pipe(QP, k_desc, KS, KBAR, KBS, OUT, MEAN,
              sqp_b, sqp_h, sqp_r, sks_b, sks_h, skb_b, skb_h, skbs_b, skbs_h, so_b, so_h, so_r,
              NR, N_K, NKB, H, KV_GROUP, NK_PAD, scale_log2,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, D_TRUE: gl.constexpr, KB_TILE: gl.constexpr,
              STAGES: gl.constexpr, MMA: gl.constexpr, MMA_T: gl.constexpr, Q_LOAD: gl.constexpr,
              KBAR_LOAD: gl.constexpr, Q_SMEM: gl.constexpr, KBAR_SMEM: gl.constexpr):
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    ROW_T: gl.constexpr = gl.SliceLayout(1, MMA_T)
    COL_T: gl.constexpr = gl.SliceLayout(0, MMA_T)
    pid_r = gl.program_id(0)
    pid_c = gl.program_id(1)
    bh = gl.program_id(2)
    b = (bh // H).to(gl.int64)
    h = (bh % H).to(gl.int64)
    hk = h // KV_GROUP
    kb0 = pid_c * KB_TILE
    kb1 = gl.minimum(kb0 + KB_TILE, NKB)
    n = kb1 - kb0  # >= 1

    # the K ring, filled first: its loads run while the queries are loaded and quantized
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
    # K is a 2-D descriptor over (B*Hkv*NK_PAD, HEAD_DIM)
    k_row = ((b * (H // KV_GROUP) + hk) * NK_PAD + kb0 * BLOCK_N).to(gl.int32)
    for i in gl.static_range(STAGES):
        mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes, pred=i < n)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * BLOCK_N, 0], k_bar.index(i), k_smem.index(i),
                                        pred=i < n)

    # pooled queries to int8, one scale per row (rounded as the quantizers round)
    offs_r = pid_r * 64 + gl.arange(0, 64, gl.SliceLayout(1, Q_LOAD))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, Q_LOAD))
    qp = gl.load(QP + b * sqp_b + h * sqp_h + offs_r[:, None] * sqp_r + offs_d[None, :],
                 mask=(offs_r < NR)[:, None] & (offs_d < D_TRUE)[None, :], other=0.0)
    qamax = gl.maximum(gl.max(gl.abs(qp), 1), 1e-20)
    qs = gl.div_rn(gl.full_like(qamax, 127.0), qamax)[:, None]
    q_smem = gl.allocate_shared_memory(gl.int8, [64, HEAD_DIM], Q_SMEM, _round_to_i32(qp, qs).to(gl.int8))
    # the row scale in the score tile's row layout, once
    row_scale0 = gl.convert_layout(qamax / 127.0 * scale_log2, ROW)

    # the mean keys of this tile's blocks (int8, zero past the real blocks) and their scales
    cols_l = gl.arange(0, KB_TILE, gl.SliceLayout(1, KBAR_LOAD))
    offs_kd = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, KBAR_LOAD))
    kbar = gl.load(KBAR + b * skb_b + hk * skb_h + (kb0 + cols_l)[:, None] * HEAD_DIM + offs_kd[None, :],
                   mask=(kb0 + cols_l < NKB)[:, None], other=0)
    kbar_smem = gl.allocate_shared_memory(gl.int8, [KB_TILE, HEAD_DIM], KBAR_SMEM, kbar)
    cols = gl.arange(0, KB_TILE, COL_T)
    kbs = gl.load(KBS + b * skbs_b + hk * skbs_h + kb0 + cols, mask=kb0 + cols < NKB, other=0.0)
    fence_async_shared()  # the queries' and mean keys' generic-proxy stores before the wgmmas read them
    gl.thread_barrier()

    ks_ptr = KS + b * sks_b + hk * sks_h + kb0
    ks = gl.load(ks_ptr)
    # the mean product and S_0, in flight together
    mean_tok = warpgroup_mma(q_smem, kbar_smem.permute((1, 0)), gl.zeros([64, KB_TILE], gl.int32, MMA_T),
                             use_acc=False, is_async=True)
    mbarrier.wait(k_bar.index(0), 0)
    zero = gl.zeros([64, BLOCK_N], gl.int32, MMA)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    mean_i, s_i = warpgroup_mma_wait(0, deps=(mean_tok, s_tok))

    offs_ro = pid_r * 64 + gl.arange(0, 64, ROW_T)
    offs = b * so_b + h * so_h + offs_ro[:, None] * so_r + (kb0 + cols)[None, :]
    ok = (offs_ro < NR)[:, None] & (kb0 + cols < kb1)[None, :]
    row_scale_t = gl.convert_layout(row_scale0, ROW_T, assert_trivial=True)
    gl.store(MEAN + offs, mean_i.to(gl.float32) * row_scale_t[:, None] * kbs[None, :], mask=ok)

    lse_t = gl.zeros([64, KB_TILE], gl.float32, MMA_T)
    for j in range(n - 1):
        # slot j % STAGES is free (S_j was waited for): refill it with block j + STAGES
        slot = j % STAGES
        more = j + STAGES < n
        mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes, pred=more)
        tma.async_copy_global_to_shared(k_desc, [k_row + (j + STAGES) * BLOCK_N, 0], k_bar.index(slot),
                                        k_smem.index(slot), pred=more)
        ks_next = gl.load(ks_ptr + j + 1)  # the next block's scale, a step ahead
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_bar.index(nxt), ((j + 1) // STAGES) & 1)
        # S_{j+1} on the tensor cores while block j's exponentials run on the CUDA cores
        s_tok = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero, use_acc=False, is_async=True)
        s_f, f_max = _scores_max(s_i, kb0 + j, N_K, BLOCK_N, MMA, False)
        lse = _lse_rest(s_f, f_max, row_scale0, ks)
        lse_t = gl.where((cols == j)[None, :], gl.convert_layout(lse, ROW_T, assert_trivial=True)[:, None], lse_t)
        s_i = warpgroup_mma_wait(0, deps=(s_tok, ))
        ks = ks_next
    # the program's last block, peeled: the only one that can be partial (a no-op mask otherwise)
    s_f, f_max = _scores_max(s_i, kb1 - 1, N_K, BLOCK_N, MMA, True)
    lse = _lse_rest(s_f, f_max, row_scale0, ks)
    lse_t = gl.where((cols == n - 1)[None, :], gl.convert_layout(lse, ROW_T, assert_trivial=True)[:, None], lse_t)
    gl.store(OUT + offs, lse_t, mask=ok)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))


def _layouts(hd: int, kb_tile: int):
    """The kernel's constexpr layouts: int8 wgmma accumulators (k = 32 per instruction) of the
    score tile (64 x 128) and of the mean/result tile (64 x kb_tile), both over one warpgroup with
    16 rows per warp (their row slices are the same distribution), the loads' blocked layouts and
    the operands' shared-memory layouts."""
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
    mma_t = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, kb_tile, 32])
    q_load = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32], warps_per_cta=[4, 1], order=[1, 0])
    kbar_load = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
    return dict(MMA=mma, MMA_T=mma_t, Q_LOAD=q_load, KBAR_LOAD=kbar_load,
                Q_SMEM=gl.NVMMASharedLayout.get_default_for([BLOCK_R, hd], gl.int8),
                KBAR_SMEM=gl.NVMMASharedLayout.get_default_for([kb_tile, hd], gl.int8))


def _kb_tile(row_tiles: int, bh: int, nkb: int, tile: int, programs: int) -> int:
    """Key blocks per program, as block_lse_scores picks them: the most (up to `tile`) that still
    make about `programs` programs; a power of two, 16 at least."""
    kb_tile = max(16, triton.next_power_of_2(tile))
    while kb_tile > 16 and row_tiles * bh * triton.cdiv(nkb, kb_tile) < programs:
        kb_tile //= 2
    return kb_tile


def gluon_block_lse_scores(q_pool: torch.Tensor, k_i8: torch.Tensor, k_scale: torch.Tensor, scale: float,
                           n_k: int, block_k: int, kbar: tuple, variant: str = "pipe", stages: int = 3,
                           tile: int = 32, programs: int = 256, maxnreg: int | None = 168):
    """kernels.block_scores.block_lse_scores(q_pool, k_i8, k_scale, scale, n_k, block_k,
    want_mean=True, kbar=kbar) with key_stride 1 and no guard, in Gluon (sm_90). Returns
    (scores, mean), each (B,H,NQ,NK) fp32 in log2 units. tile/programs/maxnreg: production's
    Hopper launch shape (kernels/config.py _HOPPER: 32-block tiles, >= 256 programs, 168 regs)."""
    B, H, NQ, D = q_pool.shape
    Hkv, n_pad, hd = k_i8.shape[1:]
    if variant != "pipe":
        raise ValueError(f"unknown variant {variant!r}")
    if block_k != 128 or hd != 128 or k_i8.dtype != torch.int8 or n_pad % block_k or H % Hkv or D > hd:
        raise ValueError("the Gluon prototype wants int8 keys padded to whole 128-key blocks, head dim 128")
    nkb = n_pad // block_k
    if k_scale.shape != (B, Hkv, nkb):
        raise ValueError(f"k_scale must be (B, Hkv, {nkb})")
    kbar_i8, kbar_s = kbar
    if (kbar_i8.dtype != torch.int8 or kbar_i8.shape[:2] != (B, Hkv) or kbar_i8.shape[2] < nkb
            or kbar_i8.shape[3] != hd or kbar_i8.stride(2) != hd or kbar_i8.stride(3) != 1
            or kbar_s.shape != kbar_i8.shape[:3]):
        raise ValueError(f"kbar must be int8 (B, Hkv, >= {nkb}, {hd}) rows and their (B, Hkv, >= {nkb}) scales")
    k_i8 = k_i8.contiguous()  # the TMA descriptor's 2-D view
    q_pool = q_pool.float().contiguous()
    out = torch.empty(B, H, NQ, nkb, dtype=torch.float32, device=q_pool.device)
    mean = torch.empty_like(out)
    row_tiles = triton.cdiv(NQ, BLOCK_R)
    kb_tile = _kb_tile(row_tiles, B * H, nkb, tile, programs)
    lay = _layouts(hd, kb_tile)
    k_desc = TensorDescriptor.from_tensor(k_i8.view(-1, hd), [block_k, hd],
                                          gl.NVMMASharedLayout.get_default_for([block_k, hd], gl.int8))
    grid = (row_tiles, triton.cdiv(nkb, kb_tile), B * H)
    key = variant + ("" if stages == 3 else f"_s{stages}") + ("" if tile == 32 else f"_t{tile}")
    COMPILED[key] = _lse_pipe[grid](
        q_pool, k_desc, k_scale, kbar_i8, kbar_s, out, mean,
        q_pool.stride(0), q_pool.stride(1), q_pool.stride(2), k_scale.stride(0), k_scale.stride(1),
        kbar_i8.stride(0), kbar_i8.stride(1), kbar_s.stride(0), kbar_s.stride(1),
        out.stride(0), out.stride(1), out.stride(2), NQ, n_k, nkb, H, H // Hkv, n_pad, scale * 1.4426950408889634,
        BLOCK_N=block_k, HEAD_DIM=hd, D_TRUE=D, KB_TILE=kb_tile, STAGES=stages, **lay, num_warps=4,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return out, mean


VARIANTS = {  # name -> gluon_block_lse_scores keywords (the bench times these)
    "pipe": dict(variant="pipe", stages=3),  # S_{j+1} on the tensor cores while block j's exp2 run
    "pipe_t16": dict(variant="pipe", stages=3, tile=16),  # the same, 16 key blocks per program
}
COMPILE_ONLY = {  # compiled by --compile for the facts, not timed
    "pipe_s4": dict(variant="pipe", stages=4),  # a deeper K ring: 77.9 KB, 2 programs per SM
    "pipe_nocap": dict(variant="pipe", stages=3, maxnreg=None),  # ptxas's own register count
}
KERNELS = {"pipe": _lse_pipe}


# ---- compile check for sm_90 on a machine without a GPU (Triton 3.6, TRITON_INTERPRET unset) ----

def _compile_main(argv):
    import argparse
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))  # devkit
    sys.path.insert(0, str(here))  # gluon_compile's helpers
    from devkit.cross_compile import compile_through, cubin_resources, use_target
    from gluon_compile import report_compile

    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--sass", action="store_true", help="write each variant's SASS to /tmp/gluon_lse_<variant>.sass")
    args = ap.parse_args(argv)
    use_target(90)
    print(f"triton {triton.__version__}, target sm_90")
    # Wan 480p: 12 heads, 32,760 tokens (a partial last key block), 512 pooled queries, 256 key blocks
    B, H, N, D = 1, 12, 32760, 128
    nq, nkb = N // 64 + (N % 64 > 0), triton.cdiv(N, 128)

    def x(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype)

    mod = sys.modules[__name__]
    patterns = [("IGMMA", r"\bIGMMA\b"), ("WARPGROUP.ARRIVE", r"WARPGROUP\.ARRIVE"),
                ("WARPGROUP.DEPBAR", r"WARPGROUP\.DEPBAR"), ("MUFU.EX2", r"MUFU\.EX2"), ("MUFU.LG2", r"MUFU\.LG2"),
                ("BAR.SYNC", r"\bBAR\.SYNC"), ("STS", r"\bSTS\b"), ("LDS", r"\bLDS\b"),
                ("local ld/st (spill)", r"\b(?:LDL|STL)\b")]
    for name, kw in {**VARIANTS, **COMPILE_ONLY}.items():
        launch = (lambda kw=kw: mod.gluon_block_lse_scores(
            x(B, H, nq, D), x(B, H, nkb * 128, D, dtype=torch.int8), x(B, H, nkb), D ** -0.5, N, 128,
            (x(B, H, 384, D, dtype=torch.int8), x(B, H, 384)), **kw))
        sass = report_compile(name, kw, KERNELS[kw["variant"]], launch, patterns,
                              f"/tmp/gluon_lse_{name}.sass" if args.sass else None)
        if sass is not None:
            print("   main loop (the backward branch's body): " + _loop_order(sass))
    # production's Triton kernel at the same shape and launch (kernels/config.py's Hopper shape), for comparison
    try:
        from kernels import block_scores, config

        k = compile_through(block_scores._block_lse_kernel, lambda: block_scores.block_lse_scores(
            x(B, H, nq, D), x(B, H, nkb * 128, D, dtype=torch.int8), x(B, H, nkb), D ** -0.5, N, 128,
            want_mean=True, launch=config.helper_launches_for(9)["block_lse"],
            kbar=(x(B, H, 384, D, dtype=torch.int8), x(B, H, 384))))
        sass = k.asm["sass"]
        print(f"\n== production _block_lse_kernel (Triton): {cubin_resources(k.asm['cubin'])}, "
              f"{k.metadata.shared} B shared memory, {k.metadata.num_warps} warps")
        print("   main loop (the backward branch's body): " + _loop_order(sass))
    except Exception:  # the comparison is optional
        import traceback

        print("\n== production _block_lse_kernel: COMPILE FAILED")
        traceback.print_exc(limit=-3)


def _loop_order(sass: str) -> str:
    """The order of IGMMA, WARPGROUP.DEPBAR/ARRIVE, MUFU.EX2, LDS/STS/BAR, mbarrier and TMA
    instructions in the main loop: the shortest span from a backward branch's target to the branch
    that holds both IGMMA and MUFU.EX2 (the mbarrier retry loops are placed out of line)."""
    import re

    lines = sass.splitlines()
    label_at = {}
    for n, line in enumerate(lines):
        m = re.match(r"\s*\.?(LBB\d+|L_x_\d+):", line)
        if m:
            label_at[m.group(1)] = n
    best = None
    for n, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?`?\(?\.?(LBB\d+|L_x_\d+)", line)
        if m and m.group(1) in label_at and label_at[m.group(1)] < n:
            body = lines[label_at[m.group(1)]:n + 1]
            if not any("MUFU.EX2" in ln for ln in body) or not any("IGMMA" in ln for ln in body):
                continue
            if best is None or len(body) < best[0]:  # the innermost such loop
                best = (len(body), label_at[m.group(1)], n, body)
    if best is None:
        return "(no loop found)"
    ev = []
    for ln in best[3]:
        m = re.search(r"(IGMMA\S*|WARPGROUP\.DEPBAR\S*|WARPGROUP\.ARRIVE|MUFU\.EX2|MUFU\.LG2|\bBAR\.SYNC\b|"
                      r"\bSTS\S*|\bLDS\S*|SYNCS\.\S+|UTMALDG\S*)", ln)
        if m:
            e = m.group(1)
            if ev and ev[-1][0] == e:
                ev[-1][1] += 1
            else:
                ev.append([e, 1])
    return f"lines {best[1]}-{best[2]}: " + "  ".join(f"{e}x{c}" for e, c in ev)


if __name__ == "__main__":
    if "--compile" in sys.argv:
        _compile_main(sys.argv[1:])
    else:
        print(__doc__)
