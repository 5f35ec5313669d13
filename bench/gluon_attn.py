"""Prototype of the sparse attention forward in Gluon for Hopper (sm_90): the tensor-core work of
one key block overlaps the softmax of another inside each warpgroup (FlashAttention-3 style).

Same inputs and numerics as kernels.attn_fwd.sparse_attn_fwd in its common case (non-causal, no
pv_skip, fill, out_perm or lse; int8 Q/K with per-block scales, Q's carrying softmax scale * log2 e;
fp8 e4m3 V^T with per-channel scales; P pre-scaled by 2^P_LOG2; P.V of each block into a fresh
accumulator, added to the fp32 accumulator in registers: Hopper's fp8 wgmma keeps ~22-bit sums).

Why Gluon: Triton 3.6 waits for every wgmma right after issuing it, so Q.K^T, softmax and P.V run
one after the other in each warp. Gluon exposes the async wgmma and its wait
(warpgroup_mma(is_async=True) / warpgroup_mma_wait(n)), mbarriers and TMA, so the overlap is
written out by hand.

Variant "pipe" (one warpgroup of 64 query rows per program, 2 programs per SM by shared memory
and registers, no warp specialization):
  * K and V^T tiles come by TMA into a STAGES-deep shared-memory ring, one mbarrier per tile
    (expect-tx bytes, phase = use count & 1), issued by the kept-block index list by the same
    warps that consume them: a slot is refilled only after the wgmma that read it was waited for,
    so no "empty" barrier is needed. K slots free a step before V slots (Q.K^T of a block is
    waited for a step before its P.V), so K is refilled separately, STAGES blocks ahead.
  * The loop is software pipelined by one block: step j issues S_{j+1} = Q.K_{j+1}^T (int8 ->
    int32) asynchronously, runs block j's softmax on the CUDA cores while the tensor cores compute
    S_{j+1}, issues P_j.V_j (fp8, P from registers, fresh accumulator), and one wait for both (wgmma
    groups complete in order) precedes acc = acc * alpha + P_j.V_j. The tensor cores idle during
    P_j.V_j's wait only if the other program on the SM has nothing to issue.
    Why P_j.V_j is not also kept in flight across the next softmax (FA3's full schedule): with a
    fresh P.V accumulator that needs acc (64 regs/thread) + P.V result (64) + S in flight (64) +
    the scores being exponentiated (64) + P as an operand (16) > 255 registers, i.e. spills.
    FA3 accumulates P.V inside the MMA, which our fp8 numerics forbid.
  * Q (64 x 128 int8) is TMA-loaded once into shared memory and is the A operand of Q.K^T from
    there (no registers held for it).
  * Scores use the production "magic number" int32 -> fp32 trick (kernels/numerics.py): bits of
    s + MAGIC_I read as a float are s + MAGIC_F exactly, so conversion is an integer add on the ALU
    instead of I2F on the 16/clk conversion unit; scale, int->float and max fold into one FFMA.
  * The partial last key block (only ever the last list entry: lists are ascending) is peeled and
    gets -inf on columns >= n_k; full blocks pay nothing. Peeling, not a branch in the loop: at a
    control-flow join ptxas waits for every wgmma in flight.
  * A block's index and key scale are loaded a step ahead (two dependent global loads).

Variant "pipe_fa3": FlashAttention-3's intra-warpgroup order instead: step j issues S_j, then
P_{j-1}.V_{j-1}, waits for S_j only (wait(1)), and runs block j's softmax while P.V runs. Same
registers. Caveat seen in the sm_90 SASS: ptxas hoists the P.V wait (WARPGROUP.DEPBAR 0) above the
exponentials (after the row max) to retire the P.V registers early, so only the max overlaps P.V.

Variants "ws" / "ws_fa3" (gl.warp_specialize): two query blocks per program, each with its own
consumer warpgroup (64 rows, the "pipe" / "pipe_fa3" loop) and its own K/V ring (the two blocks'
kept lists differ, so FA3's shared tiles do not apply), plus a 1-warp TMA producer partition that
fills both rings ahead of the consumers (full/empty mbarrier pairs). setmaxnreg gives the
consumers 240 registers each and the producer 24. The two consumers are independent instruction
streams, so the warp schedulers interleave one's softmax with the other's wgmma; FA3 additionally
orders them with named barriers, which Gluon 3.6 does not expose.

Variants "ws_pp" / "ws_pp_s2": "ws_fa3" with FA3's ping-pong order between the two consumers, by a
pair of mbarriers instead of named barriers: each group of wgmma issues is a turn that waits for
the other consumer's previous turn, so one consumer's softmax runs while the other's products run
(_consume_fa3). "_s2": 2-deep rings (148 KB of shared memory instead of 214).

Variants "ws_fa3_ps_s2" / "ws_pp_ps_s2": P.V's A operand from shared memory (two 64 x 128 fp8 slots
per consumer, 180 KB in all) instead of registers. With P in registers ptxas moves the P.V wait
above the next block's exponentials (the SASS of pipe_fa3, ws_fa3 and ws_pp; the PTX has it after
them); from shared memory the wait stays after the softmax, so the product overlaps it in SASS.

Variant "seq_s2": production's own order (S_j, its wait, the softmax, P_j.V_j, its wait) and
registers (one score tile, the 168 cap: three programs per SM, 2-deep rings, 72 KB), with each
slot refilled as soon as its product is waited for: K_{j+2} right after S_j, V_{j+2} after
P_j.V_j. Triton's pipeliner issues both loads at the end of an iteration, after the P.V wait, so
that K's tile arrives just when the next iteration needs it (ncu: ~8% of the warps' samples wait
for it, bench/NOTES.md v68).

Variants "ws3_*" (gl.warp_specialize, three partitions of 4 warps): production's three programs per
SM as three consumer warpgroups of one program, each seq_s2's loop on its own query block and
2-deep ring (3 x 72 KB = 216.5 KB; 3 x 128 threads x 168 registers fill the register file). With RR
their wgmma issues go in a round robin of mbarrier turns (FA3's ping-pong, for three consumers in
production's order): 0:S, 2:-, 1:S, 0:PV, 2:S, 1:PV, ..., so that the tensor cores run two
consumers' products during each one's softmax and the three softmaxes follow one another on the
MUFU. "_rrN": the round robin for each consumer's first N turns only (a staggered start), then
free; "_noskip": without consumer 2's first turn given away (two softmaxes overlap).

Variants "split_s2*" (v72): seq_s2 with each block's scores as two async wgmma groups of 64 keys
(K and V^T by two 64-key TMA boxes a slot), so that S_a's exponentials could run while S_b is
computed, at production's registers. In split_s2's sm_90 code they do not: ptxas puts a wgmma
wait right after the last wgmma op before it, so S_b's wait precedes them. "_a1" / "_a2" (a proxy
fence / a CTA barrier before the wait) change nothing; "_pva" issues P_a.V_a after them (it then
spills); "_a4" issues a 64 x 8 product of P_a with a ones column there, which keeps the overlap;
"_a3" also takes P_a's row sums from it (fails the smoke test, not investigated). Measured (H100,
v72): split_s2 0.809 and split_s2_a4 0.873 against seq_s2's 0.732 at density 1.0 (Wan 480p).

Variant "seq_s2_qreg" (v73): seq_s2 with Q.K^T's A operand in registers (Q loaded once), so that the
product reads only K from shared memory. Measured (H100): 0.775 against seq_s2's 0.732 (Wan 480p,
density 1.0); at a 184-register cap (no spills, two programs per SM) 0.843.

Measured (H200, 2026-12-07, paired with cuDNN, Wan 480p, density 1.0; bench/NOTES.md v33 and v65):
production's Triton kernel 0.747, "ws" 0.797, "pipe" 0.855, every FA3-order variant 0.96-1.06, with
or without the ping-pong and P in shared memory. "seq_s2" (H100, 2026-12-07, two calls, v68a):
0.732 against production's 0.752 at density 1.0, 0.371 against 0.378 at 0.5, 0.083 against 0.081
at 0.1 (Wan 480p); HunyuanVideo 544p 0.730-0.735 against 0.750-0.753. "ws3" (H100, 2026-12-07, v70):
0.775 free, 0.784 in the round robin, 0.813 without the skip, against seq_s2's 0.732 and
production's 0.753 (Wan 480p, density 1.0; slower at every density and at HunyuanVideo 544p).
None went into the pack.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M, BLOCK_N, HEAD_DIM = 64, 128, 128
COMPILED = {}  # VARIANTS name -> the compiled kernel of its last launch (registers, spills, shared memory)
MAGIC_I = gl.constexpr(0x4B400000)  # see kernels/numerics.py
MAGIC_F = gl.constexpr(12582912.0)
P_LOG2 = gl.constexpr(8.0)

# wgmma accumulator layout of one warpgroup, 64 x 128: int8 and fp8 wgmma both have k = 32 per
# instruction, so S (int32) and the P.V result (fp32) share one layout and P needs no row moves
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32]))
P_OP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=4))  # fp8 A from registers
P_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2))  # fp8 P, 64 x 128
ROW = gl.constexpr(gl.SliceLayout(1, MMA.value))
COL = gl.constexpr(gl.SliceLayout(0, MMA.value))


@gluon.jit
def _issue_tile(desc, smem, bar, idx_base, row, j, count, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                IS_K: gl.constexpr):
    """TMA load of the j-th kept block's K (IS_K) or V^T tile into ring slot j % STAGES (nothing
    if j is past the list). K and V are refilled separately: a K slot frees as soon as its
    Q.K^T is waited for, a step before the V slot, so K is fetched a step further ahead."""
    if j < count:
        _issue_kb(desc, smem, bar, row, gl.load(idx_base + j), j, count, BLOCK_N, STAGES, IS_K)


@gluon.jit
def _issue_kb(desc, smem, bar, row, kb, j, count, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IS_K: gl.constexpr):
    """_issue_tile with the block's index kb already in a register (loaded a step before)."""
    if j < count:
        s = j % STAGES
        mbarrier.expect(bar.index(s), desc.block_type.nbytes)
        if IS_K:
            tma.async_copy_global_to_shared(desc, [row + kb * BLOCK_N, 0], bar.index(s), smem.index(s))
        else:
            tma.async_copy_global_to_shared(desc, [row, kb * BLOCK_N], bar.index(s), smem.index(s))


@gluon.jit
def _prologue_loads(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, idx_base, k_row, v_row, count,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        _issue_tile(k_desc, k_smem, k_bar, idx_base, k_row, i, count, BLOCK_N, STAGES, True)
    for i in gl.static_range(STAGES - 1):
        _issue_tile(v_desc, v_smem, v_bar, idx_base, v_row, i, count, BLOCK_N, STAGES, False)


@gluon.jit
def _issue_scores(q_smem, k_smem, k_bar, j, STAGES: gl.constexpr):
    """Wait for K of kept block j and issue S_j = Q.K_j^T (int8, int32 result) asynchronously."""
    s = j % STAGES
    mbarrier.wait(k_bar.index(s), (j // STAGES) & 1)
    zero = gl.zeros([64, 128], gl.int32, MMA)
    return warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)


@gluon.jit
def _turn_wait(turn_me, t, ME: gl.constexpr, PP: gl.constexpr):
    """Ping-pong (PP): wait until this consumer may issue its t-th group of wgmmas. The two
    consumers take turns 0, 0, 1, 1, ... (consumer 0 first); consumer 0's first wait passes at once
    (parity 1 of a fresh barrier counts as completed), every later one waits for the other
    consumer's arrive of the turn before."""
    if PP:
        mbarrier.wait(turn_me, (t & 1) ^ (1 - ME))


@gluon.jit
def _turn_pass(turn_other, PP: gl.constexpr):
    """Ping-pong: this consumer's wgmmas of the turn are issued; the other consumer's turn."""
    if PP:
        mbarrier.arrive(turn_other, count=1)


@gluon.jit
def _p_store(p8, p_smem, j, PSMEM: gl.constexpr):
    """PSMEM: P_j into slot j % 2 of the consumer's shared-memory pair, visible to the async proxy
    (the wgmma) once every thread of the warpgroup has written. Slot j % 2 last held P_{j-2},
    whose P.V was waited for in step j - 1."""
    if PSMEM:
        p_smem.index(j % 2).store(p8)
        fence_async_shared()
        gl.thread_barrier()


@gluon.jit
def _p_operand(p8, p_smem, j, PSMEM: gl.constexpr):
    """P_j as the A operand of P_j.V_j: its registers, or with PSMEM its shared-memory copy, so that
    no register the in-flight wgmma reads is live across the next softmax."""
    if PSMEM:
        return p_smem.index(j % 2)
    else:
        return p8


@gluon.jit
def _softmax(s_i, m_i, l_i, qk_scale, kb, N_K, BLOCK_N: gl.constexpr, MASK: gl.constexpr):
    """Online-softmax step of one block from its int32 scores: returns P (fp8, as the P.V A
    operand, pre-scaled by 2^P_LOG2), alpha, and the new m, l (as _softmax_pv in attn_fwd.py)."""
    s = (s_i + MAGIC_I).to(gl.float32, bitcast=True)  # = s_i + MAGIC_F exactly, ordered like s_i
    if MASK:
        if (kb + 1) * BLOCK_N > N_K:  # a partial block: -inf on the padding keys
            cols = kb * BLOCK_N + gl.arange(0, BLOCK_N, COL)
            s = gl.where((cols < N_K)[None, :], s, float("-inf"))
    m_loc = (gl.max(s, 1) - MAGIC_F) * qk_scale  # exact subtraction: both integers below 2^24
    m_new = gl.maximum(m_i, m_loc)
    alpha = gl.exp2(m_i - m_new)
    c = (m_new - P_LOG2) + qk_scale * MAGIC_F
    p = gl.exp2(s * qk_scale - c[:, None])  # one FFMA + MUFU.EX2 per score
    l_i = l_i * alpha + gl.sum(p, 1)
    p8 = gl.convert_layout(p.to(gl.float8e4nv), P_OP)
    return p8, alpha, m_new, l_i


@gluon.jit
def _consume(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row, v_row, count,
             qs, N_K, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PRODUCE: gl.constexpr,
             empty_bar, HEAD_DIM: gl.constexpr):
    """The pipelined loop of one warpgroup (64 query rows) over the kept key blocks; returns the
    un-normalized accumulator and the row sums. With PRODUCE this warpgroup also issues the TMA
    loads; otherwise it releases each slot on empty_bar for the producer partition."""
    m_i = gl.full([64], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([64], gl.float32, ROW)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    zero_o = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    if PRODUCE:
        _prologue_loads(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, idx_base, k_row, v_row, count,
                        BLOCK_N, STAGES)
    if count > 0:
        s_i = warpgroup_mma_wait(0, deps=(_issue_scores(q_smem, k_smem, k_bar, 0, STAGES), ))
        kb = gl.load(idx_base)
        qk_scale = qs * gl.load(ks_base + kb)
        for j in range(count - 1):
            slot = j % STAGES
            if PRODUCE:  # refill K of block j (S_j was waited for in step j-1) and V of block j-1
                _issue_tile(k_desc, k_smem, k_bar, idx_base, k_row, j + STAGES, count, BLOCK_N, STAGES, True)
                _issue_tile(v_desc, v_smem, v_bar, idx_base, v_row, j + STAGES - 1, count, BLOCK_N, STAGES, False)
            # the next block's index and scale, a step ahead: two dependent global loads
            kb_next = gl.load(idx_base + j + 1)
            qk_next = qs * gl.load(ks_base + kb_next)
            # S_{j+1} on the tensor cores while this block's softmax runs on the CUDA cores
            s_tok = _issue_scores(q_smem, k_smem, k_bar, j + 1, STAGES)
            p8, alpha, m_i, l_i = _softmax(s_i, m_i, l_i, qk_scale, kb, N_K, BLOCK_N, False)
            mbarrier.wait(v_bar.index(slot), (j // STAGES) & 1)
            o_tok = warpgroup_mma(p8, v_smem.index(slot).permute((1, 0)), zero_o, use_acc=False, is_async=True)
            # wgmma groups complete in order: one wait returns S_{j+1} and P_j.V_j. (P_j's registers,
            # read by the async wgmma, cannot be a dep: 3.6 lowers no 8-bit deps; ptxas keeps them.)
            s_i, pv = warpgroup_mma_wait(0, deps=(s_tok, o_tok))
            if not PRODUCE:  # slot j (K_j and V_j) is free
                mbarrier.arrive(empty_bar.index(slot), count=1)
            acc = acc * alpha[:, None] + pv
            kb = kb_next
            qk_scale = qk_next
        # the last kept block (the only one that can be partial: lists are ascending), peeled
        last = count - 1
        slot = last % STAGES
        p8, alpha, m_i, l_i = _softmax(s_i, m_i, l_i, qk_scale, kb, N_K, BLOCK_N, True)
        mbarrier.wait(v_bar.index(slot), (last // STAGES) & 1)
        o_tok = warpgroup_mma(p8, v_smem.index(slot).permute((1, 0)), zero_o, use_acc=False, is_async=True)
        pv = warpgroup_mma_wait(0, deps=(o_tok, ))
        if not PRODUCE:
            mbarrier.arrive(empty_bar.index(slot), count=1)
        acc = acc * alpha[:, None] + pv
    return acc, l_i


@gluon.jit
def _rr_wait(turn_me, t, ME: gl.constexpr, RR: gl.constexpr):
    """Round robin (RR) of three consumers: wait until this consumer may issue its t-th wgmma.
    Consumer 0's first wait passes at once (parity 1 of a fresh barrier counts as completed),
    every other waits for its predecessor's arrive (the order 0 -> 2 -> 1 -> 0).
    RR is the number of each consumer's turns under the round robin (0: none); later issues run
    free."""
    if RR > 0:
        if t < RR:
            if ME == 0:
                mbarrier.wait(turn_me, (t & 1) ^ 1)
            else:
                mbarrier.wait(turn_me, t & 1)


@gluon.jit
def _rr_pass(turn_next, t, RR: gl.constexpr):
    """Round robin: this consumer's wgmma of turn t is issued; the next consumer's turn."""
    if RR > 0:
        if t < RR:
            mbarrier.arrive(turn_next, count=1)


@gluon.jit
def _seq_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, j, kb, qk_scale, kb_ahead,
              count, acc, m_i, l_i, zero_o, N_K, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr,
              turn_me, turn_next, t, ME: gl.constexpr, RR: gl.constexpr):
    """Block j in production's order (S_j, its wait, the softmax, P_j.V_j, its wait), with each
    slot refilled the moment its product is waited for: K_{j+STAGES} right after S_j, while the
    softmax and P.V still run, V_{j+STAGES} right after P_j.V_j. With RR each wgmma issue is a
    turn of the three consumers' round robin (t: this consumer's turn for S_j, t + 1 for P_j.V_j);
    a tile's wait comes before the turn's, so a late tile never holds the others' turns."""
    s = j % STAGES
    ph = (j // STAGES) & 1
    mbarrier.wait(k_bar.index(s), ph)
    zero = gl.zeros([64, 128], gl.int32, MMA)
    _rr_wait(turn_me, t, ME, RR)
    s_tok = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
    _rr_pass(turn_next, t, RR)
    s_i = warpgroup_mma_wait(0, deps=(s_tok, ))
    _issue_kb(k_desc, k_smem, k_bar, k_row, kb_ahead, j + STAGES, count, BLOCK_N, STAGES, True)
    p8, alpha, m_i, l_i = _softmax(s_i, m_i, l_i, qk_scale, kb, N_K, BLOCK_N, MASK)
    mbarrier.wait(v_bar.index(s), ph)
    _rr_wait(turn_me, t + 1, ME, RR)
    o_tok = warpgroup_mma(p8, v_smem.index(s).permute((1, 0)), zero_o, use_acc=False, is_async=True)
    _rr_pass(turn_next, t + 1, RR)
    pv = warpgroup_mma_wait(0, deps=(o_tok, ))
    _issue_kb(v_desc, v_smem, v_bar, v_row, kb_ahead, j + STAGES, count, BLOCK_N, STAGES, False)
    acc = acc * alpha[:, None] + pv
    return acc, m_i, l_i


@gluon.jit
def _consume_seq(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row, v_row, count,
                 qs, N_K, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
                 turn_me, turn_next, t0, ME: gl.constexpr, RR: gl.constexpr):
    """Production's sequential loop (one score tile, so production's registers and three programs
    per SM) with the loads placed by hand: Triton 3.6's pipeliner issues the next tiles' TMA loads
    at the end of an iteration, after the P.V wait, so K's arrives just as it is needed (ncu, NOTES
    v68: ~8% of the warps' samples wait for K). Here K_{j+STAGES} goes out once S_j is done.
    With RR (three consumers of one program, _attn_ws3) every wgmma issue is a round-robin turn;
    this consumer's first is turn t0 and it takes 2 * count turns."""
    m_i = gl.full([64], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([64], gl.float32, ROW)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    zero_o = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    for i in gl.static_range(STAGES):
        _issue_tile(k_desc, k_smem, k_bar, idx_base, k_row, i, count, BLOCK_N, STAGES, True)
        _issue_tile(v_desc, v_smem, v_bar, idx_base, v_row, i, count, BLOCK_N, STAGES, False)
    if count > 0:
        kb = gl.load(idx_base)
        qk_scale = qs * gl.load(ks_base + kb)
        for j in range(count - 1):
            # a step ahead: the next block's index and scale, and the index of the block to fetch
            kb_next = gl.load(idx_base + j + 1)
            qk_next = qs * gl.load(ks_base + kb_next)
            kb_ahead = gl.load(idx_base + gl.minimum(j + STAGES, count - 1))
            acc, m_i, l_i = _seq_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, j, kb,
                                      qk_scale, kb_ahead, count, acc, m_i, l_i, zero_o, N_K, BLOCK_N, STAGES, False,
                                      turn_me, turn_next, t0 + 2 * j, ME, RR)
            kb = kb_next
            qk_scale = qk_next
        # the last kept block (the only one that can be partial: lists are ascending), peeled
        acc, m_i, l_i = _seq_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, count - 1, kb,
                                  qk_scale, kb, count, acc, m_i, l_i, zero_o, N_K, BLOCK_N, STAGES, True,
                                  turn_me, turn_next, t0 + 2 * (count - 1), ME, RR)
    return acc, l_i


@gluon.jit
def _fa3_step(q_smem, k_smem, v_smem, k_bar, v_bar, j, kb, qk_scale, p8, acc, m_i, l_i, zero_o, N_K,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PRODUCE: gl.constexpr, empty_bar, MASK: gl.constexpr,
              turn_me, turn_other, ME: gl.constexpr, PP: gl.constexpr, p_smem, PSMEM: gl.constexpr):
    """Step j >= 1 of _consume_fa3: S_j and P_{j-1}.V_{j-1} issued back to back, block j's softmax
    while P_{j-1}.V_{j-1} runs. No branch may sit between the issue and the waits: at a control-flow
    join ptxas waits for every wgmma in flight (seen in the SASS), so the masked step is a copy."""
    prev = (j - 1) % STAGES
    _turn_wait(turn_me, j, ME, PP)  # turn j: S_j and P_{j-1}.V_{j-1}
    s_tok = _issue_scores(q_smem, k_smem, k_bar, j, STAGES)
    mbarrier.wait(v_bar.index(prev), ((j - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(_p_operand(p8, p_smem, j - 1, PSMEM), v_smem.index(prev).permute((1, 0)), zero_o,
                          use_acc=False, is_async=True)
    _turn_pass(turn_other, PP)
    s_i = warpgroup_mma_wait(1, deps=(s_tok, ))  # S_j; P_{j-1}.V_{j-1} may still run
    p8_new, alpha, m_i, l_i = _softmax(s_i, m_i, l_i, qk_scale, kb, N_K, BLOCK_N, MASK)
    _p_store(p8_new, p_smem, j, PSMEM)
    # l_i as a dep ties the wait to the end of the softmax (its row sums) at the MLIR/LLVM level
    pv, l_i = warpgroup_mma_wait(0, deps=(o_tok, l_i))
    if not PRODUCE:  # slot j-1 (K_{j-1} and V_{j-1}) is free
        mbarrier.arrive(empty_bar.index(prev), count=1)
    # acc holds blocks < j-1 relative to m_{j-1}; add P_{j-1}.V_{j-1}, then rescale to m_j
    acc = (acc + pv) * alpha[:, None]
    return p8_new, acc, m_i, l_i


@gluon.jit
def _consume_fa3(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row, v_row, count,
                 qs, N_K, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PRODUCE: gl.constexpr,
                 empty_bar, HEAD_DIM: gl.constexpr, turn_me, turn_other, count_other, ME: gl.constexpr,
                 PP: gl.constexpr, p_smem, PSMEM: gl.constexpr):
    """_consume with FlashAttention-3's intra-warpgroup order: step j issues S_j and then
    P_{j-1}.V_{j-1}, waits for S_j only (wait(1): groups complete in order), and runs block j's
    softmax while P_{j-1}.V_{j-1} is on the tensor cores. The tensor cores get S_j and P.V back to
    back; the softmax hides behind P.V instead of Q.K^T. About the same registers at the peak as
    _consume (acc, the P.V result in flight, the scores, two fp8 P).

    With PP (FA3's inter-warpgroup ping-pong, by mbarriers where FA3 uses named barriers) each
    issue of wgmmas is a turn, taken alternately with the other consumer: turn 0 issues S_0, turn j
    S_j and P_{j-1}.V_{j-1}, turn count the last P.V, so one consumer's softmax runs while the
    other's products run. A consumer whose list is done keeps passing turns (no work) until the
    other's are all taken: max(T0, T1) turns each, T = count + 1 (0 for an empty list).

    With PSMEM P goes to the P.V wgmma from shared memory (two slots) instead of registers: ptxas
    moves the wait for P_{j-1}.V_{j-1} above block j's exponentials while its A operand is in
    registers (the SASS of pipe_fa3 and ws_pp), which undoes the overlap inside the warpgroup."""
    m_i = gl.full([64], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([64], gl.float32, ROW)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    zero_o = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    if PRODUCE:
        _prologue_loads(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, idx_base, k_row, v_row, count,
                        BLOCK_N, STAGES)
    if count > 0:
        kb = gl.load(idx_base)
        _turn_wait(turn_me, 0, ME, PP)
        s0_tok = _issue_scores(q_smem, k_smem, k_bar, 0, STAGES)
        _turn_pass(turn_other, PP)
        s_i = warpgroup_mma_wait(0, deps=(s0_tok, ))
        # block 0 may be the partial last one (a one-block list)
        p8, alpha, m_i, l_i = _softmax(s_i, m_i, l_i, qs * gl.load(ks_base + kb), kb, N_K, BLOCK_N, True)
        _p_store(p8, p_smem, 0, PSMEM)
        kb = gl.load(idx_base + gl.minimum(1, count - 1))  # index and scale a step ahead
        qk_scale = qs * gl.load(ks_base + kb)
        for j in range(1, count - 1):
            if PRODUCE:  # refill K of block j-1 (S_{j-1} is done) and V of block j-2
                _issue_tile(k_desc, k_smem, k_bar, idx_base, k_row, j + STAGES - 1, count, BLOCK_N, STAGES, True)
                _issue_tile(v_desc, v_smem, v_bar, idx_base, v_row, j + STAGES - 2, count, BLOCK_N, STAGES, False)
            kb_next = gl.load(idx_base + j + 1)
            qk_next = qs * gl.load(ks_base + kb_next)
            p8, acc, m_i, l_i = _fa3_step(q_smem, k_smem, v_smem, k_bar, v_bar, j, kb, qk_scale, p8, acc, m_i, l_i,
                                          zero_o, N_K, BLOCK_N, STAGES, PRODUCE, empty_bar, False,
                                          turn_me, turn_other, ME, PP, p_smem, PSMEM)
            kb = kb_next
            qk_scale = qk_next
        if count > 1:  # the last block, the only one that can be partial, peeled
            if PRODUCE:
                _issue_tile(k_desc, k_smem, k_bar, idx_base, k_row, count + STAGES - 2, count, BLOCK_N, STAGES,
                            True)
                _issue_tile(v_desc, v_smem, v_bar, idx_base, v_row, count + STAGES - 3, count, BLOCK_N, STAGES,
                            False)
            p8, acc, m_i, l_i = _fa3_step(q_smem, k_smem, v_smem, k_bar, v_bar, count - 1, kb, qk_scale, p8, acc,
                                          m_i, l_i, zero_o, N_K, BLOCK_N, STAGES, PRODUCE, empty_bar, True,
                                          turn_me, turn_other, ME, PP, p_smem, PSMEM)
        last = (count - 1) % STAGES
        _turn_wait(turn_me, count, ME, PP)
        mbarrier.wait(v_bar.index(last), ((count - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(_p_operand(p8, p_smem, count - 1, PSMEM), v_smem.index(last).permute((1, 0)), zero_o,
                              use_acc=False, is_async=True)
        _turn_pass(turn_other, PP)
        pv = warpgroup_mma_wait(0, deps=(o_tok, ))
        if not PRODUCE:
            mbarrier.arrive(empty_bar.index(last), count=1)
        acc = acc + pv
    if PP:  # pass the turns the other consumer still needs
        t_mine = gl.where(count > 0, count + 1, 0)
        t_all = gl.maximum(t_mine, gl.where(count_other > 0, count_other + 1, 0))
        for t in range(t_mine, t_all):
            _turn_wait(turn_me, t, ME, PP)
            _turn_pass(turn_other, PP)
    return acc, l_i


@gluon.jit
def _epilogue(acc, l_i, O, VS, b, h, hk, row0, so_b, so_h, so_n, svs_b, svs_h, N_Q,
              D_OUT: gl.constexpr, HEAD_DIM: gl.constexpr):
    offs_m = row0 + gl.arange(0, 64, ROW)
    offs_d = gl.arange(0, HEAD_DIM, COL)
    vs = gl.load(VS + b * svs_b + hk * svs_h + offs_d, mask=offs_d < D_OUT, other=0.0)
    l_safe = gl.where(l_i > 0, l_i, 1.0)
    out = acc * vs[None, :] / l_safe[:, None]
    o_ptr = O + b * so_b + h * so_h + offs_m[:, None].to(gl.int64) * so_n + offs_d[None, :]
    gl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D_OUT)[None, :])


@gluon.jit
def _program_coords(H, KV_GROUP, NQB, G: gl.constexpr):
    """The first of the program's G query blocks, and its batch, head and key head. Query blocks
    fastest, as production: concurrent programs share one head's K/V in L2."""
    row = gl.program_id(0)
    groups = (NQB + G - 1) // G
    qb0 = (row % groups) * G
    bh = row // groups
    b = (bh // H).to(gl.int64)
    h = (bh % H).to(gl.int64)
    return qb0, b, h, h // KV_GROUP


@gluon.jit
def _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                BOXES: gl.constexpr = 1):
    """One warpgroup's Q tile and K/V^T ring with their barriers (no empty barriers: the warpgroup
    refills its own slots). BOXES: TMA boxes a slot (2 for the split variants' 64-key halves,
    buffers 2s and 2s + 1 of slot s)."""
    q_smem = gl.allocate_shared_memory(gl.int8, [64, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(gl.int8, [BOXES * STAGES, BLOCK_N // BOXES, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [BOXES * STAGES, HEAD_DIM, BLOCK_N // BOXES], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    return q_smem, k_smem, v_smem, q_bar, k_bar, v_bar


@gluon.jit
def _program_start(q_desc, q_smem, q_bar, QS, KS, CNT, IDX, sqs_b, sqs_h, sks_b, sks_h, sc_b, sc_h, si_b, si_h, si_q,
                   pid_m, b, h, hk, H, KV_GROUP, NQ_PAD, NK_PAD, HEAD_DIM: gl.constexpr):
    """Issue the query block's Q tile (TMA, on q_bar) and return the program's K and V^T rows and
    its kept list (count, indices, key scales) and Q scale. Q, K, V^T are 2-D descriptors over
    (B*H*NQ_PAD, D), (B*Hkv*NK_PAD, D), (B*Hkv*D, NK_PAD)."""
    q_row = ((b * H + h) * NQ_PAD + pid_m * 64).to(gl.int32)
    k_row = ((b * (H // KV_GROUP) + hk) * NK_PAD).to(gl.int32)
    v_row = ((b * (H // KV_GROUP) + hk) * HEAD_DIM).to(gl.int32)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    count = gl.load(CNT + b * sc_b + h * sc_h + pid_m)
    idx_base = IDX + b * si_b + h * si_h + pid_m * si_q
    ks_base = KS + b * sks_b + hk * sks_h
    qs = gl.load(QS + b * sqs_b + h * sqs_h + pid_m)
    return k_row, v_row, count, idx_base, ks_base, qs


@gluon.jit
def _attn_pipe(q_desc, k_desc, v_desc, QS, KS, VS, O, CNT, IDX,
               so_b, so_h, so_n, sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, sc_b, sc_h, si_b, si_h, si_q,
               N_Q, N_K, H, KV_GROUP, NQB, NQ_PAD, NK_PAD,
               BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, D_OUT: gl.constexpr, STAGES: gl.constexpr,
               FA3: gl.constexpr, SEQ: gl.constexpr = False, QREG: gl.constexpr = False):
    pid_m, b, h, hk = _program_coords(H, KV_GROUP, NQB, 1)
    q_smem, k_smem, v_smem, q_bar, k_bar, v_bar = _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    k_row, v_row, count, idx_base, ks_base, qs = _program_start(
        q_desc, q_smem, q_bar, QS, KS, CNT, IDX, sqs_b, sqs_h, sks_b, sks_h, sc_b, sc_h, si_b, si_h, si_q,
        pid_m, b, h, hk, H, KV_GROUP, NQ_PAD, NK_PAD, HEAD_DIM)
    mbarrier.wait(q_bar, 0)
    if SEQ:
        # QREG: Q.K^T's A operand from registers (16 a thread), so that the product reads only K
        # from shared memory (v73)
        q_op = q_smem.load(P_OP) if QREG else q_smem
        acc, l_i = _consume_seq(q_op, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row,
                                v_row, count, qs, N_K, BLOCK_N, STAGES, HEAD_DIM, q_bar, q_bar, 0, 0, 0)
    elif FA3:
        acc, l_i = _consume_fa3(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row,
                                v_row, count, qs, N_K, BLOCK_N, STAGES, True, k_bar, HEAD_DIM, q_bar, q_bar, 0,
                                0, False, k_smem, False)
    else:
        acc, l_i = _consume(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row, v_row,
                            count, qs, N_K, BLOCK_N, STAGES, True, k_bar, HEAD_DIM)
    _epilogue(acc, l_i, O, VS, b, h, hk, pid_m * 64, so_b, so_h, so_n, svs_b, svs_h, N_Q, D_OUT, HEAD_DIM)


@gluon.jit
def _produce(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, empty_bar, idx_base, k_row, v_row, j, count,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Producer warp: kept block j of one consumer into its ring, once the consumer freed the slot
    (empty barriers start as if their previous phase completed: the first lap does not wait)."""
    if j < count:
        s = j % STAGES
        mbarrier.wait(empty_bar.index(s), ((j // STAGES) & 1) ^ 1)
        kb = gl.load(idx_base + j)
        mbarrier.expect(k_bar.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + kb * BLOCK_N, 0], k_bar.index(s), k_smem.index(s))
        mbarrier.expect(v_bar.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [v_row, kb * BLOCK_N], v_bar.index(s), v_smem.index(s))


@gluon.jit
def _producer_part(q_desc, k_desc, v_desc, q_smem, k_smem0, v_smem0, k_smem1, v_smem1, q_bar, k_bar0, v_bar0,
                   e_bar0, k_bar1, v_bar1, e_bar1, q_row, k_row, v_row, idx0, idx1, count0, count1,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for c in gl.static_range(2):
        mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + c * 64, 0], q_bar.index(c), q_smem.index(c))
    # the two consumers' lists, step by step: each ring runs up to STAGES blocks ahead of its consumer
    for j in range(gl.maximum(count0, count1)):
        _produce(k_desc, v_desc, k_smem0, v_smem0, k_bar0, v_bar0, e_bar0, idx0, k_row, v_row, j, count0,
                 BLOCK_N, STAGES)
        _produce(k_desc, v_desc, k_smem1, v_smem1, k_bar1, v_bar1, e_bar1, idx1, k_row, v_row, j, count1,
                 BLOCK_N, STAGES)


@gluon.jit
def _consumer_part(q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, empty_bar, k_desc, v_desc, idx_base, ks_base,
                   count, qs, N_K, O, VS, b, h, hk, row0, so_b, so_h, so_n, svs_b, svs_h, N_Q,
                   turn_me, turn_other, count_other,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, D_OUT: gl.constexpr, HEAD_DIM: gl.constexpr,
                   FA3: gl.constexpr, ME: gl.constexpr, PP: gl.constexpr, PSMEM: gl.constexpr):
    """One consumer warpgroup: 64 query rows, the "pipe" (or FA3-order) schedule on its own ring;
    with PP the FA3 order in turns with the other consumer, with PSMEM P through shared memory
    (_consume_fa3)."""
    mbarrier.wait(q_bar, 0)
    if FA3:
        if PSMEM:
            p_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, 64, HEAD_DIM], P_SMEM)
        else:
            p_smem = k_smem  # not read
        acc, l_i = _consume_fa3(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, 0, 0,
                                count, qs, N_K, BLOCK_N, STAGES, False, empty_bar, HEAD_DIM, turn_me, turn_other,
                                count_other, ME, PP, p_smem, PSMEM)
    else:
        acc, l_i = _consume(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, 0, 0, count,
                            qs, N_K, BLOCK_N, STAGES, False, empty_bar, HEAD_DIM)
    _epilogue(acc, l_i, O, VS, b, h, hk, row0, so_b, so_h, so_n, svs_b, svs_h, N_Q, D_OUT, HEAD_DIM)


@gluon.jit
def _ring(k_desc, v_desc, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """A K/V^T ring of STAGES slots with its "full" (K, V) and "empty" barriers."""
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    e_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(e_bar.index(i), count=1)
    return k_smem, v_smem, k_bar, v_bar, e_bar


@gluon.jit
def _attn_ws(q_desc, k_desc, v_desc, QS, KS, VS, O, CNT, IDX,
             so_b, so_h, so_n, sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, sc_b, sc_h, si_b, si_h, si_q,
             N_Q, N_K, H, KV_GROUP, NQB, NQ_PAD, NK_PAD,
             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, D_OUT: gl.constexpr, STAGES: gl.constexpr,
             CONSUMER_REGS: gl.constexpr, FA3: gl.constexpr, PP: gl.constexpr, PSMEM: gl.constexpr):
    """Two query blocks per program (2*pid, 2*pid+1), each with its own consumer warpgroup and its
    own K/V ring (their kept-block lists differ), one producer warp feeding both rings; with PP the
    consumers issue their wgmmas in turns (ping-pong, see _consume_fa3)."""
    qb0, b, h, hk = _program_coords(H, KV_GROUP, NQB, 2)
    has1 = qb0 + 1 < NQB  # the second block of an odd count does not exist: an empty list
    q_smem = gl.allocate_shared_memory(gl.int8, [2, 64, HEAD_DIM], q_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    # one ring per consumer (separate allocations: Triton 3.6 wants power-of-two shapes, 2 x 3 slots is not)
    k0, v0, kb0, vb0, eb0 = _ring(k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    k1, v1, kb1, vb1, eb1 = _ring(k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)

    q_row = ((b * H + h) * NQ_PAD + qb0 * 64).to(gl.int32)
    k_row = ((b * (H // KV_GROUP) + hk) * NK_PAD).to(gl.int32)
    v_row = ((b * (H // KV_GROUP) + hk) * HEAD_DIM).to(gl.int32)
    cnt = CNT + b * sc_b + h * sc_h + qb0
    count0 = gl.load(cnt)
    count1 = gl.load(cnt + 1, mask=has1, other=0)
    idx0 = IDX + b * si_b + h * si_h + qb0 * si_q
    idx1 = idx0 + si_q
    ks_base = KS + b * sks_b + hk * sks_h
    qsp = QS + b * sqs_b + h * sqs_h + qb0
    qs0 = gl.load(qsp)
    qs1 = gl.load(qsp + 1, mask=has1, other=0.0)
    gl.warp_specialize([
        (_consumer_part, (q_smem.index(0), k0, v0, q_bar.index(0), kb0, vb0, eb0, k_desc, v_desc, idx0, ks_base,
                          count0, qs0, N_K, O, VS, b, h, hk, qb0 * 64, so_b, so_h, so_n, svs_b, svs_h, N_Q,
                          turn.index(0), turn.index(1), count1, BLOCK_N, STAGES, D_OUT, HEAD_DIM, FA3, 0, PP,
                          PSMEM)),
        (_consumer_part, (q_smem.index(1), k1, v1, q_bar.index(1), kb1, vb1, eb1, k_desc, v_desc, idx1, ks_base,
                          count1, qs1, N_K, O, VS, b, h, hk, qb0 * 64 + 64, so_b, so_h, so_n, svs_b, svs_h, N_Q,
                          turn.index(1), turn.index(0), count0, BLOCK_N, STAGES, D_OUT, HEAD_DIM, FA3, 1, PP,
                          PSMEM)),
        (_producer_part, (q_desc, k_desc, v_desc, q_smem, k0, v0, k1, v1, q_bar, kb0, vb0, eb0, kb1, vb1, eb1,
                          q_row, k_row, v_row, idx0, idx1, count0, count1, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


@gluon.jit
def _seq3_part(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, turn_me, turn_next,
               idx_base, ks_base, q_row, k_row, v_row, count, turns, qs, N_K, O, VS, b, h, hk, row0,
               so_b, so_h, so_n, svs_b, svs_h, N_Q, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               D_OUT: gl.constexpr, HEAD_DIM: gl.constexpr, ME: gl.constexpr, RR: gl.constexpr,
               SKIP: gl.constexpr):
    """One of _attn_ws3's three consumers: a query block in production's order on its own ring,
    loading its own tiles (seq_s2's loop). With RR its wgmma issues take turns with the other two;
    with SKIP consumer 2 gives its first turn away, so that in the steady state the tensor cores
    run S and P.V of the other two during each consumer's softmax and the three softmaxes follow
    one another: turns go 0:S, 2:-, 1:S, 0:PV, 2:S, 1:PV, 0:S, 2:PV, ... It then passes turns
    until all three consumers' turns are taken (a hang otherwise)."""
    t0 = 0
    if RR > 0:
        if SKIP:
            if ME == 2:
                _rr_wait(turn_me, 0, ME, RR)
                _rr_pass(turn_next, 0, RR)
                t0 = 1
    if count > 0:
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        mbarrier.wait(q_bar, 0)
    acc, l_i = _consume_seq(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, idx_base, ks_base, k_row, v_row,
                            count, qs, N_K, BLOCK_N, STAGES, HEAD_DIM, turn_me, turn_next, t0, ME, RR)
    if RR > 0:
        for t in range(t0 + 2 * count, gl.minimum(turns, RR)):
            _rr_wait(turn_me, t, ME, RR)
            _rr_pass(turn_next, t, RR)
    _epilogue(acc, l_i, O, VS, b, h, hk, row0, so_b, so_h, so_n, svs_b, svs_h, N_Q, D_OUT, HEAD_DIM)


@gluon.jit
def _attn_ws3(q_desc, k_desc, v_desc, QS, KS, VS, O, CNT, IDX,
              so_b, so_h, so_n, sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, sc_b, sc_h, si_b, si_h, si_q,
              N_Q, N_K, H, KV_GROUP, NQB, NQ_PAD, NK_PAD,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, D_OUT: gl.constexpr, STAGES: gl.constexpr,
              RR: gl.constexpr, SKIP: gl.constexpr):
    """Three query blocks per program (3*pid .. 3*pid+2), each a consumer warpgroup of 64 rows at
    production's 168 registers on its own 2-deep ring: production's three programs per SM, as one
    program, so that with RR their wgmma issues can be put in a round robin (FA3's ping-pong for
    three consumers in production's order; see _seq3_part)."""
    qb0, b, h, hk = _program_coords(H, KV_GROUP, NQB, 3)
    turn = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(3):
        mbarrier.init(turn.index(i), count=1)
    q0, k0, v0, qb_0, kb_0, vb_0 = _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    q1, k1, v1, qb_1, kb_1, vb_1 = _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)
    q2, k2, v2, qb_2, kb_2, vb_2 = _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES)

    q_row = ((b * H + h) * NQ_PAD + qb0 * 64).to(gl.int32)
    k_row = ((b * (H // KV_GROUP) + hk) * NK_PAD).to(gl.int32)
    v_row = ((b * (H // KV_GROUP) + hk) * HEAD_DIM).to(gl.int32)
    cnt = CNT + b * sc_b + h * sc_h + qb0
    c0 = gl.load(cnt)
    c1 = gl.load(cnt + 1, mask=qb0 + 1 < NQB, other=0)  # past the last query block: an empty list
    c2 = gl.load(cnt + 2, mask=qb0 + 2 < NQB, other=0)
    turns = gl.maximum(gl.maximum(2 * c0, 2 * c1), 2 * c2 + SKIP)  # each consumer takes this many
    idx0 = IDX + b * si_b + h * si_h + qb0 * si_q
    ks_base = KS + b * sks_b + hk * sks_h
    qsp = QS + b * sqs_b + h * sqs_h + qb0
    qs0 = gl.load(qsp)
    qs1 = gl.load(qsp + 1, mask=qb0 + 1 < NQB, other=0.0)
    qs2 = gl.load(qsp + 2, mask=qb0 + 2 < NQB, other=0.0)
    # turns go 0 -> 2 -> 1 -> 0: consumer c arrives on the barrier of the next one
    gl.warp_specialize([
        (_seq3_part, (q_desc, k_desc, v_desc, q0, k0, v0, qb_0, kb_0, vb_0, turn.index(0), turn.index(2), idx0,
                      ks_base, q_row, k_row, v_row, c0, turns, qs0, N_K, O, VS, b, h, hk, qb0 * 64,
                      so_b, so_h, so_n, svs_b, svs_h, N_Q, BLOCK_N, STAGES, D_OUT, HEAD_DIM, 0, RR, SKIP)),
        (_seq3_part, (q_desc, k_desc, v_desc, q1, k1, v1, qb_1, kb_1, vb_1, turn.index(1), turn.index(0),
                      idx0 + si_q, ks_base, q_row + 64, k_row, v_row, c1, turns, qs1, N_K, O, VS, b, h, hk,
                      qb0 * 64 + 64, so_b, so_h, so_n, svs_b, svs_h, N_Q, BLOCK_N, STAGES, D_OUT, HEAD_DIM, 1, RR,
                      SKIP)),
        (_seq3_part, (q_desc, k_desc, v_desc, q2, k2, v2, qb_2, kb_2, vb_2, turn.index(2), turn.index(1),
                      idx0 + 2 * si_q, ks_base, q_row + 128, k_row, v_row, c2, turns, qs2, N_K, O, VS, b, h, hk,
                      qb0 * 64 + 128, so_b, so_h, so_n, svs_b, svs_h, N_Q, BLOCK_N, STAGES, D_OUT, HEAD_DIM, 2, RR,
                      SKIP)),
    ], [4, 4], [168, 168])


# "split": S_j as two 64-key halves, so that S_j's second half is computed while the first
# half's exponentials run (one program's own chain shortened by ~a half product) at production's
# registers: the two int32 halves take the registers of one 64 x 128 score tile
HALF = gl.constexpr(64)
MMA_H = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32]))
ROW_H = gl.constexpr(gl.SliceLayout(1, MMA_H.value))
COL_H = gl.constexpr(gl.SliceLayout(0, MMA_H.value))
# ANCHOR 3 / 4: a 64 x 8 product P_a.ones (column 0: P_a's row sums) issued after S_a's exponentials
MMA_8 = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 32]))
P_OP8 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA_8.value, k_width=4))
ONES_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2))
ONES_REG = gl.constexpr(gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0]))


@gluon.jit
def _issue_halves(desc, smem, bar, row, kb, j, count, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  IS_K: gl.constexpr):
    """TMA loads of kept block kb's two key halves (K: rows, V^T: columns) into ring slot
    j % STAGES (buffers 2s, 2s + 1), both on the slot's one barrier; nothing past the list."""
    if j < count:
        s = j % STAGES
        mbarrier.expect(bar.index(s), 2 * desc.block_type.nbytes)
        for i in gl.static_range(2):
            if IS_K:
                tma.async_copy_global_to_shared(desc, [row + kb * BLOCK_N + i * HALF, 0], bar.index(s),
                                                smem.index(2 * s + i))
            else:
                tma.async_copy_global_to_shared(desc, [row, kb * BLOCK_N + i * HALF], bar.index(s),
                                                smem.index(2 * s + i))


@gluon.jit
def _split_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, j, kb, qk_scale, kb_ahead,
                count, acc, m_i, l_i, zero_o, N_K, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr,
                PVA: gl.constexpr, ANCHOR: gl.constexpr, ones_smem):
    """Block j as seq_s2's _seq_step, with S_j = [S_a | S_b] issued as two async wgmma groups: the
    exponentials of S_a (relative to max(m, its row max)) run while S_b is computed; once S_b's
    row max gives the block's, P_a is rescaled by exp2(m_a - m_new) before its fp8 cast, so P is
    what production's softmax gives (to rounding). P_a.V_a and P_b.V_b accumulate into one fresh
    accumulator (a 128-key sum, as production's one product).
    PVA: P_a (relative to m_a) goes into P_a.V_a as soon as it is cast, so that a wgmma issue that
    needs the exponentials stands between them and S_b's wait (ptxas otherwise moves that wait
    above them); its fresh accumulator is then rescaled by exp2(m_a - m_new) before P_b.V_b adds to
    it (64 more live registers during S_b's softmax).
    ANCHOR, what stands between S_a's exponentials and S_b's wait: 1 a proxy fence, 2 a CTA barrier,
    3 a 64 x 8 product of P_a with ones_smem whose row sums then serve l, 4 the same product, its
    result unused (times 0). Only 3 and 4 keep the wait after the exponentials (bench/NOTES.md v72)."""
    s = j % STAGES
    ph = (j // STAGES) & 1
    mbarrier.wait(k_bar.index(s), ph)
    zero = gl.zeros([64, HALF], gl.int32, MMA_H)
    ta = warpgroup_mma(q_smem, k_smem.index(2 * s).permute((1, 0)), zero, use_acc=False, is_async=True)
    tb = warpgroup_mma(q_smem, k_smem.index(2 * s + 1).permute((1, 0)), zero, use_acc=False, is_async=True)
    s_ia = warpgroup_mma_wait(1, deps=(ta, ))
    sa = (s_ia + MAGIC_I).to(gl.float32, bitcast=True)
    if MASK:  # the last block (peeled): no branch, since at a control-flow join ptxas waits for every wgmma
        cols = kb * BLOCK_N + gl.arange(0, HALF, COL_H)
        sa = gl.where((cols < N_K)[None, :], sa, float("-inf"))
    m_a = gl.maximum(m_i, gl.convert_layout((gl.max(sa, 1) - MAGIC_F) * qk_scale, ROW))
    m_ah = gl.convert_layout(m_a, ROW_H)
    pa = gl.exp2(sa * qk_scale - ((m_ah - P_LOG2) + qk_scale * MAGIC_F)[:, None])
    if PVA:
        mbarrier.wait(v_bar.index(s), ph)
        sum_a = gl.sum(pa, 1)
        o = warpgroup_mma(gl.convert_layout(pa.to(gl.float8e4nv), P_OP), v_smem.index(2 * s).permute((1, 0)),
                          zero_o, use_acc=False, is_async=True)
        s_ib = warpgroup_mma_wait(1, deps=(tb, ))
    else:
        if ANCHOR == 1:  # ptxas places a wgmma wait right after the last wgmma op: a fence in between
            fence_async_shared()
        if ANCHOR == 2:
            gl.thread_barrier()
        if ANCHOR >= 3:  # a wgmma issue that needs the exponentials pins S_b's wait after them
            r = warpgroup_mma(gl.convert_layout(pa.to(gl.float8e4nv), P_OP8), ones_smem.permute((1, 0)),
                              gl.zeros([64, 8], gl.float32, MMA_8), use_acc=False, is_async=True)
            s_ib = warpgroup_mma_wait(1, deps=(tb, ))
        else:  # pa passes through the wait: LLVM otherwise sinks the exponentials below it, to their uses
            s_ib, pa = warpgroup_mma_wait(0, deps=(tb, pa))
    _issue_halves(k_desc, k_smem, k_bar, k_row, kb_ahead, j + STAGES, count, BLOCK_N, STAGES, True)
    sb = (s_ib + MAGIC_I).to(gl.float32, bitcast=True)
    if MASK:
        cols = kb * BLOCK_N + HALF + gl.arange(0, HALF, COL_H)
        sb = gl.where((cols < N_K)[None, :], sb, float("-inf"))
    m_new = gl.maximum(m_a, gl.convert_layout((gl.max(sb, 1) - MAGIC_F) * qk_scale, ROW))
    m_nh = gl.convert_layout(m_new, ROW_H)
    pb = gl.exp2(sb * qk_scale - ((m_nh - P_LOG2) + qk_scale * MAGIC_F)[:, None])
    alpha = gl.exp2(m_i - m_new)
    pb8 = gl.convert_layout(pb.to(gl.float8e4nv), P_OP)
    if PVA:
        beta = gl.exp2(m_a - m_new)
        l_i = l_i * alpha + gl.convert_layout(sum_a, ROW) * beta + gl.convert_layout(gl.sum(pb, 1), ROW)
        o, pb = warpgroup_mma_wait(0, deps=(o, pb))
        o = o * beta[:, None]
    else:
        beta_h = gl.exp2(m_ah - m_nh)
        pa = pa * beta_h[:, None]
        if ANCHOR == 3:  # P_a's row sums from the product (of its fp8 values before the rescale)
            r = warpgroup_mma_wait(0, deps=(r, ))
            l_i = l_i * alpha + gl.convert_layout(gl.sum(r, 1), ROW) * gl.convert_layout(beta_h, ROW) \
                + gl.convert_layout(gl.sum(pb, 1), ROW)
        else:  # ANCHOR 4: the product's result unused (the anchor alone)
            l_i = l_i * alpha + gl.convert_layout(gl.sum(pa, 1) + gl.sum(pb, 1), ROW)
            if ANCHOR == 4:  # used times 0 (not folded for floats), so that the product is not removed
                r = warpgroup_mma_wait(0, deps=(r, ))
                l_i = l_i + gl.convert_layout(gl.sum(r, 1), ROW) * 0.0
        pa8 = gl.convert_layout(pa.to(gl.float8e4nv), P_OP)
        mbarrier.wait(v_bar.index(s), ph)
        o = warpgroup_mma(pa8, v_smem.index(2 * s).permute((1, 0)), zero_o, use_acc=False, is_async=True)
    o = warpgroup_mma(pb8, v_smem.index(2 * s + 1).permute((1, 0)), o, use_acc=True, is_async=True)
    pv = warpgroup_mma_wait(0, deps=(o, ))
    _issue_halves(v_desc, v_smem, v_bar, v_row, kb_ahead, j + STAGES, count, BLOCK_N, STAGES, False)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@gluon.jit
def _attn_split(q_desc, k_desc, v_desc, QS, KS, VS, O, CNT, IDX,
                so_b, so_h, so_n, sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, sc_b, sc_h, si_b, si_h, si_q,
                N_Q, N_K, H, KV_GROUP, NQB, NQ_PAD, NK_PAD,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, D_OUT: gl.constexpr, STAGES: gl.constexpr,
                PVA: gl.constexpr, ANCHOR: gl.constexpr):
    """seq_s2 (one warpgroup, production's order, 2-deep rings, loads placed by hand) with each
    block's scores in two halves (_split_step). K and V^T tiles arrive as two 64-key boxes each."""
    pid_m, b, h, hk = _program_coords(H, KV_GROUP, NQB, 1)
    q_smem, k_smem, v_smem, q_bar, k_bar, v_bar = _q_and_ring(q_desc, k_desc, v_desc, BLOCK_N, HEAD_DIM, STAGES, 2)
    # (8, 64) fp8: ones in row 0 (the B operand's column 0), zeros elsewhere
    ones_rows = gl.arange(0, 8, gl.SliceLayout(1, ONES_REG))
    ones = gl.where(ones_rows[:, None] == 0, 1.0, 0.0) + gl.zeros([8, HALF], gl.float32, ONES_REG)
    ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [8, HALF], ONES_SMEM, ones.to(gl.float8e4nv))
    fence_async_shared()
    k_row, v_row, count, idx_base, ks_base, qs = _program_start(
        q_desc, q_smem, q_bar, QS, KS, CNT, IDX, sqs_b, sqs_h, sks_b, sks_h, sc_b, sc_h, si_b, si_h, si_q,
        pid_m, b, h, hk, H, KV_GROUP, NQ_PAD, NK_PAD, HEAD_DIM)

    m_i = gl.full([64], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([64], gl.float32, ROW)
    acc = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    zero_o = gl.zeros([64, HEAD_DIM], gl.float32, MMA)
    for i in gl.static_range(STAGES):
        if i < count:
            kb_i = gl.load(idx_base + i)
            _issue_halves(k_desc, k_smem, k_bar, k_row, kb_i, i, count, BLOCK_N, STAGES, True)
            _issue_halves(v_desc, v_smem, v_bar, v_row, kb_i, i, count, BLOCK_N, STAGES, False)
    mbarrier.wait(q_bar, 0)
    if count > 0:
        kb = gl.load(idx_base)
        qk_scale = qs * gl.load(ks_base + kb)
        for j in range(count - 1):
            kb_next = gl.load(idx_base + j + 1)
            qk_next = qs * gl.load(ks_base + kb_next)
            kb_ahead = gl.load(idx_base + gl.minimum(j + STAGES, count - 1))
            acc, m_i, l_i = _split_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, j, kb,
                                        qk_scale, kb_ahead, count, acc, m_i, l_i, zero_o, N_K, BLOCK_N, STAGES,
                                        False, PVA, ANCHOR, ones_smem)
            kb = kb_next
            qk_scale = qk_next
        acc, m_i, l_i = _split_step(q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, k_row, v_row, count - 1,
                                    kb, qk_scale, kb, count, acc, m_i, l_i, zero_o, N_K, BLOCK_N, STAGES, True, PVA,
                                    ANCHOR, ones_smem)
    _epilogue(acc, l_i, O, VS, b, h, hk, pid_m * 64, so_b, so_h, so_n, svs_b, svs_h, N_Q, D_OUT, HEAD_DIM)


def _descs_split(q_i8, k_i8, v_t):
    """Q's tile, and K / V^T as 64-key boxes (two per block)."""
    hd = q_i8.shape[-1]
    ql = gl.NVMMASharedLayout.get_default_for([BLOCK_M, hd], gl.int8)
    kl = gl.NVMMASharedLayout.get_default_for([HALF.value, hd], gl.int8)
    vl = gl.NVMMASharedLayout.get_default_for([hd, HALF.value], gl.float8e4nv)
    return (TensorDescriptor.from_tensor(q_i8.view(-1, hd), [BLOCK_M, hd], ql),
            TensorDescriptor.from_tensor(k_i8.view(-1, hd), [HALF.value, hd], kl),
            TensorDescriptor.from_tensor(v_t.view(-1, v_t.shape[-1]), [hd, HALF.value], vl))


def _descs(q_i8, k_i8, v_t, q_rows):
    hd = q_i8.shape[-1]
    ql = gl.NVMMASharedLayout.get_default_for([q_rows, hd], gl.int8)
    kl = gl.NVMMASharedLayout.get_default_for([BLOCK_N, hd], gl.int8)
    vl = gl.NVMMASharedLayout.get_default_for([hd, BLOCK_N], gl.float8e4nv)
    return (TensorDescriptor.from_tensor(q_i8.view(-1, hd), [q_rows, hd], ql),
            TensorDescriptor.from_tensor(k_i8.view(-1, hd), [BLOCK_N, hd], kl),
            TensorDescriptor.from_tensor(v_t.view(-1, v_t.shape[-1]), [hd, BLOCK_N], vl))


def gluon_sparse_attn_fwd(q_i8, k_i8, v_t, q_scale, k_scale, v_scale, counts, indices, n_q, n_k, d_out, out_dtype,
                          variant="pipe", stages=3, fa3=False, pp=False, psmem=False, rr=0, skip=False, maxnreg=168,
                          pva=False, anchor=0, qreg=False):
    """kernels.attn_fwd.sparse_attn_fwd's common case (see the module docstring) in Gluon.
    Returns out (B,H,n_q,d_out), a transposed view of contiguous (B,n_q,H,d_out) memory."""
    B, H, nq_pad, hd = q_i8.shape
    Hkv = k_i8.shape[1]
    NQ = triton.cdiv(n_q, BLOCK_M)
    if hd != HEAD_DIM or q_i8.dtype != torch.int8 or k_i8.dtype != torch.int8 or v_t.dtype != torch.float8_e4m3fn:
        raise ValueError("the Gluon prototype wants int8 q/k, fp8 e4m3 v^T and head dim 128")
    if nq_pad != NQ * BLOCK_M or k_i8.shape[2] % BLOCK_N or v_t.shape[3] != k_i8.shape[2] or H % Hkv:
        raise ValueError("quantized q/k/v must be padded to whole blocks")
    if not (q_i8.is_contiguous() and k_i8.is_contiguous() and v_t.is_contiguous()) or indices.stride(-1) != 1:
        raise ValueError("q, k, v^T must be contiguous (TMA descriptors over them) and index rows contiguous")
    if counts.shape != (B, H, NQ) or indices.shape[:3] != (B, H, NQ):
        raise ValueError("block lists must be (B,H,NQ) counts + (B,H,NQ,NK) indices")
    out = torch.empty(B, n_q, H, d_out, dtype=out_dtype, device=q_i8.device).transpose(1, 2)
    if (pp or psmem) and variant != "ws":
        raise ValueError("ping-pong turns and P from shared memory are built for the two consumers of 'ws'")
    fa3 = fa3 or pp or psmem  # both are built on the FA3 order
    rr_tag = "" if not rr else "_rr" if rr >= 1 << 30 else f"_rr{rr}"
    key = (variant + ("_pp" if pp else "_fa3" if fa3 else "") + ("_ps" if psmem else "") + rr_tag
           + ("" if skip or not rr else "_noskip") + ("" if stages == 3 else f"_s{stages}") + ("_pva" if pva else "")
           + ("" if not anchor else f"_a{anchor}") + ("_qreg" if qreg else "")
           + ("" if maxnreg == 168 else f"_r{maxnreg}"))  # a VARIANTS name
    common = (q_scale, k_scale, v_scale, out, counts, indices,
              out.stride(0), out.stride(1), out.stride(2), q_scale.stride(0), q_scale.stride(1),
              k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
              counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), indices.stride(2),
              n_q, n_k, H, H // Hkv)
    if variant == "pipe":
        qd, kd, vd = _descs(q_i8, k_i8, v_t, BLOCK_M)
        COMPILED[key] = _attn_pipe[(B * H * NQ,)](qd, kd, vd, *common, NQ, nq_pad, k_i8.shape[2],
                                  BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, D_OUT=d_out, STAGES=stages, FA3=fa3, num_warps=4)
    elif variant == "seq":  # production's order and registers (the 168 cap: three programs per SM)
        qd, kd, vd = _descs(q_i8, k_i8, v_t, BLOCK_M)
        COMPILED[key] = _attn_pipe[(B * H * NQ,)](qd, kd, vd, *common, NQ, nq_pad, k_i8.shape[2],
                                  BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, D_OUT=d_out, STAGES=stages, FA3=False,
                                  SEQ=True, QREG=qreg, num_warps=4, maxnreg=maxnreg)
    elif variant == "ws":
        qd, kd, vd = _descs(q_i8, k_i8, v_t, BLOCK_M)
        # 4 + 4 + 1 warps run as 3 warpgroups; 168 x 384 threads fill the register file and
        # setmaxnreg moves the producer's share to the consumers (24 + 2 x 240 = 3 x 168)
        COMPILED[key] = _attn_ws[(B * H * triton.cdiv(NQ, 2),)](
            qd, kd, vd, *common, NQ, nq_pad, k_i8.shape[2], BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, D_OUT=d_out,
            STAGES=stages, CONSUMER_REGS=240, FA3=fa3, PP=pp, PSMEM=psmem, num_warps=4, maxnreg=168)
    elif variant == "ws3":  # three consumers of production's registers: 3 x 128 threads x 168 fill the file
        qd, kd, vd = _descs(q_i8, k_i8, v_t, BLOCK_M)
        COMPILED[key] = _attn_ws3[(B * H * triton.cdiv(NQ, 3),)](
            qd, kd, vd, *common, NQ, nq_pad, k_i8.shape[2], BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, D_OUT=d_out,
            STAGES=stages, RR=rr, SKIP=skip, num_warps=4, maxnreg=168)  # rr: turns a consumer takes in turn
    elif variant == "split":  # seq_s2 with each block's scores in two 64-key halves
        qd, kd, vd = _descs_split(q_i8, k_i8, v_t)
        COMPILED[key] = _attn_split[(B * H * NQ,)](qd, kd, vd, *common, NQ, nq_pad, k_i8.shape[2],
                                   BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, D_OUT=d_out, STAGES=stages, PVA=pva,
                                   ANCHOR=anchor, num_warps=4, maxnreg=maxnreg)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return out


VARIANTS = {  # name -> gluon_sparse_attn_fwd keywords
    "pipe": dict(variant="pipe", stages=3),  # S_{j+1} overlaps softmax_j
    # production's order, K fetched as soon as its slot frees (2-deep rings: 72 KB, three programs per SM)
    "seq_s2": dict(variant="seq", stages=2),
    "pipe_fa3": dict(variant="pipe", stages=3, fa3=True),  # P_{j-1}.V_{j-1} overlaps softmax_j
    "ws": dict(variant="ws", stages=3),  # two consumer warpgroups + producer warp, "pipe" order
    "ws_fa3": dict(variant="ws", stages=3, fa3=True),
    "ws_pp": dict(variant="ws", stages=3, fa3=True, pp=True),  # ws_fa3 + FA3's ping-pong between the consumers
    "ws_pp_s2": dict(variant="ws", stages=2, fa3=True, pp=True),
    # P.V's A operand from shared memory (2-deep rings: 148 + 32 KB): the P.V wait can stay after the softmax
    "ws_fa3_ps_s2": dict(variant="ws", stages=2, fa3=True, psmem=True),
    "ws_pp_ps_s2": dict(variant="ws", stages=2, fa3=True, pp=True, psmem=True),
    # production's three programs per SM as three consumers of one program (216.5 KB), free or in a round robin
    "ws3_s2": dict(variant="ws3", stages=2),
    "ws3_rr_s2": dict(variant="ws3", stages=2, rr=1 << 30, skip=True),
    "ws3_rr_noskip_s2": dict(variant="ws3", stages=2, rr=1 << 30),
    "ws3_rr6_s2": dict(variant="ws3", stages=2, rr=6, skip=True),  # staggered at the start only, then free
    "ws3_rr32_s2": dict(variant="ws3", stages=2, rr=32, skip=True),
    # seq_s2 with S_j in two 64-key halves: S_b computed during S_a's exponentials (v72)
    "split_s2": dict(variant="split", stages=2),
    "split_s2_r232": dict(variant="split", stages=2, maxnreg=232),
    "split_s2_pva": dict(variant="split", stages=2, pva=True),
    "split_s2_a1": dict(variant="split", stages=2, anchor=1),  # a proxy fence before S_b's wait
    "split_s2_a2": dict(variant="split", stages=2, anchor=2),  # a CTA barrier before S_b's wait
    "split_s2_a3": dict(variant="split", stages=2, anchor=3),  # P_a's row sums by a 64 x 8 product before it
    "split_s2_a4": dict(variant="split", stages=2, anchor=4),  # the same product as an anchor only
    # seq_s2 with Q.K^T's A operand (Q) in registers: the product reads only K from shared memory (v73)
    "seq_s2_qreg": dict(variant="seq", stages=2, qreg=True),
    "seq_s2_qreg_r184": dict(variant="seq", stages=2, qreg=True, maxnreg=184),
}
KERNELS = {"pipe": _attn_pipe, "seq": _attn_pipe, "ws": _attn_ws, "ws3": _attn_ws3, "split": _attn_split}
