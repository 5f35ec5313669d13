"""Sparse attention forward: FlashAttention-style online softmax over the KEPT key blocks only.

Q/K are int8 with one scale per block (Q's scale carries softmax scale * log2 e, so scores are
in log2 units and exp2 is exact). P.V runs in fp8 e4m3 (V per-channel scaled) on GPUs with fp8
tensor cores, fp16 elsewhere; accumulation is fp32. Structure follows Triton's fused-attention
tutorial: one program per (query block, batch*head), an inner helper per key block, and the
partial last key block peeled off so full blocks need no masking. With fill_skipped, one more
online-softmax pass over the key blocks' means (kernels/fill_pass.py) estimates what the
skipped blocks would have added (sparge_core.reference_predict.fill_bias). With RETURN_LSE the kernel also writes each row's log-sum-exp
(natural log of the scaled scores, as flash attention returns it) for ring-attention merges.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .caller_addrs import addr_args, caller_ptr
from .config import KernelConfig
from .fill_pass import check_fill, fill_skipped
from .fp8 import INTERPRET, p_operand
from .host_math import cdiv
from .launch import Kernel
from .numerics import LN2, MAGIC_F, batch_head, int32_bits_f32



@triton.jit
def _scores(q, k_src, k_row, kb, sk_n, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Q.K^T of one key block as the raw float bit patterns of (s_i + MAGIC_I): monotone in the
    int32 dot s_i, so the row max works on them directly, and int->float, scale and max fold into
    one FFMA in _softmax_pv."""
    start_n = kb * BLOCK_N
    if TMA:  # bulk tensor copies: one thread issues them, no per-thread addresses
        s_i = tl.dot(q, k_src.load([k_row + start_n, 0]).T)
    else:
        s_i = tl.dot(q, tl.load(k_src + start_n.to(tl.int64) * sk_n))  # (HEAD_DIM, BLOCK_N) int8
    return int32_bits_f32(s_i)


@triton.jit
def _softmax_pv(acc, l_i, m_i, n_skip, s, v_src, v_row, qk_scale, kb, offs_m, offs_n, N_Q, N_K, neg_lam,
                BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                PV_FP8: tl.constexpr, PV_SKIP: tl.constexpr, P_LOG2: tl.constexpr, EMULATE_FP8: tl.constexpr,
                TMA: tl.constexpr):
    start_n = kb * BLOCK_N
    cols = start_n + offs_n
    if MASK_KEYS:  # the partial last key block, and with IS_CAUSAL the blocks across the diagonal
        if IS_CAUSAL:
            s = tl.where((cols[None, :] < N_K) & (cols[None, :] <= offs_m[:, None] + (N_K - N_Q)), s, float("-inf"))
        else:
            s = tl.where((cols < N_K)[None, :], s, float("-inf"))
    # exact subtraction (both integers < 2^24); -inf stays -inf
    m_loc = (tl.max(s, 1) - MAGIC_F) * qk_scale
    if TMA:
        v = v_src.load([v_row, start_n]).T
    else:
        v = tl.load(v_src + start_n)  # (BLOCK_N, HEAD_DIM), N-contiguous
    do_pv = True
    if PV_SKIP:
        # skip when no real row of the tile can gain anything from this block
        need = ((m_loc - m_i) >= neg_lam) & (offs_m < N_Q)
        do_pv = tl.max(need.to(tl.int32), 0) > 0
    if do_pv:
        m_new = tl.maximum(m_i, m_loc)
        m_use = m_new
        if IS_CAUSAL and MASK_KEYS:  # a row may still have seen no key at all: avoid -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        # P is computed pre-scaled by 2^P_LOG2 (keeps small probabilities out of fp8 subnormals);
        # l carries the same factor, so it cancels in acc / l
        alpha = tl.math.exp2(m_i - m_use)
        # (bits - MAGIC_F) * scale - (m - P_LOG2) as one FFMA. The per-row constant c rounds by
        # up to 2^-24 * MAGIC_F * scale = 0.75 * scale log2 units: 4e-5 where a full-range int8 dot
        # (2^21) means 100 log2 units, against the up to 6% by which fp8 rounds P
        c = (m_use - P_LOG2) + qk_scale * MAGIC_F
        p = tl.math.exp2(s * qk_scale - c[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # P.V into a fresh accumulator, added to acc on the FP32 units: Hopper's fp8 MMA keeps
        # only ~22-bit sums, so accumulating every block inside the MMA drifts (measured rel-L1
        # 0.008 -> 0.052 on the realistic benchmark; SageAttention2's two-level accumulation)
        acc = acc * alpha[:, None] + tl.dot(p_operand(p, PV_FP8, EMULATE_FP8), v)
        m_i = m_new
    else:
        n_skip += 1
    return acc, l_i, m_i, n_skip


@triton.jit
def _key_block(acc, l_i, m_i, n_skip, q, q_scale, kb, ks_base, k_src, k_row, sk_n, v_src, v_row, offs_m, offs_n,
               N_Q, N_K, neg_lam, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
               PV_FP8: tl.constexpr, PV_SKIP: tl.constexpr, P_LOG2: tl.constexpr, EMULATE_FP8: tl.constexpr,
               TMA: tl.constexpr):
    """One kept key block kb: int8 scores, then its online-softmax and P.V step."""
    qk_scale = q_scale * tl.load(ks_base + kb)
    s = _scores(q, k_src, k_row, kb, sk_n, BLOCK_N, TMA)
    return _softmax_pv(acc, l_i, m_i, n_skip, s, v_src, v_row, qk_scale, kb, offs_m, offs_n, N_Q, N_K, neg_lam,
                       BLOCK_N, MASKED, IS_CAUSAL, PV_FP8, PV_SKIP, P_LOG2, EMULATE_FP8, TMA)


@triton.jit
def _sparse_attn_fwd(
    Q, K, VT, QS, KS, VS, O, ADDRS, OPERM, CNT, IDX, SKIP, PVT, KBAR, KBS, KVAR, VBAR, BIAS, fill_clamp,
    LSE, QRAW, KMEAN, sqr_b, sqr_h, sqr_n, lse_scale,  # read only with RETURN_LSE
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_d, so_b, so_h, so_n,
    sqs_b, sqs_h, sks_b, sks_h, svs_b, svs_h, sc_b, sc_h, si_b, si_h, si_q,
    skb_b, skb_h, sks2_b, sks2_h, skv_b, skv_h, svb_b, svb_h, sb_b, sb_h, sb_q,
    N_Q, N_K, H, KV_GROUP, NQB, NKC,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_OUT: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, PV_SKIP: tl.constexpr, P_LOG2: tl.constexpr,
    EMULATE_FP8: tl.constexpr, HAS_PERM: tl.constexpr,
    TMA: tl.constexpr, FILL: tl.constexpr, RETURN_LSE: tl.constexpr, O_SLOT: tl.constexpr,
    FILL_BLOCK: tl.constexpr, FILL_STAGES: tl.constexpr,
):
    # one program per (batch*head, query block), query blocks fastest: the programs running
    # together share one head's K and V in L2
    row = tl.program_id(0)
    pid_m = row % NQB
    if IS_CAUSAL:  # the longest lists first, so that the grid's last programs are short ones (NOTES v59)
        pid_m = NQB - 1 - pid_m
    bh = row // NQB
    b, h = batch_head(bh, H)
    hk = h // KV_GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # Q, K and V^T are padded to whole blocks by the quantizer: no load masks needed
    q_src = Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :]
    q = tl.load(q_src)
    q_scale = tl.load(QS + b * sqs_b + h * sqs_h + pid_m)
    if TMA:  # K and V^T are 2-D descriptors over (B*Hkv*N_pad, D) and (B*Hkv*D, N_pad)
        k_src = K
        v_src = VT
        k_row = ((b * sk_b + hk * sk_h) // sk_n).to(tl.int32)
        v_row = ((b * sv_b + hk * sv_h) // sv_d).to(tl.int32)
    else:
        k_src = K + b * sk_b + hk * sk_h + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None]
        v_src = VT + b * sv_b + hk * sv_h + offs_d[None, :] * sv_d + offs_n[:, None]
        k_row = 0
        v_row = 0
    ks_base = KS + b * sks_b + hk * sks_h
    idx_base = IDX + b * si_b + h * si_h + pid_m * si_q
    count = tl.load(CNT + b * sc_b + h * sc_h + pid_m)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skip = 0
    neg_lam = 0.0
    if PV_SKIP:
        neg_lam = -tl.load(PVT + h)

    # the partial last key block can only be the last entry (lists are ascending): peel it
    n_full = count
    if count > 0:
        last = tl.load(idx_base + count - 1)
        if (last + 1) * BLOCK_N > N_K:
            n_full = count - 1
    if IS_CAUSAL:
        # only the key blocks that reach past the block's first row's diagonal need the causal mask:
        # in an ascending list they are the last entries (one or two at 64-row query blocks and
        # 128-key blocks, more if a list holds future blocks), the rest run unmasked (flash
        # attention's split; masking every block took ~30% of the loop's instructions, NOTES v59)
        first_sees = pid_m * BLOCK_M + (N_K - N_Q)  # the last key the first row attends to
        more = n_full > 0
        while more:
            more = (tl.load(idx_base + n_full - 1) + 1) * BLOCK_N - 1 > first_sees
            if more:
                n_full -= 1
            more = more & (n_full > 0)
    # Triton 3.6 pipelines this loop with 2-deep K/V buffers and issues the next block's loads after
    # P.V's wait, so K's load latency shows at each block's start (ncu: ~8% of the warps' samples at
    # density 1.0). Issued as soon as Q.K^T frees the slot (Gluon, bench/gluon_attn.py seq_s2) the
    # kernel ran 2-3% faster; the Triton forms tried got a third of that at most (NOTES v68, v68b)
    for it in range(0, n_full):
        acc, l_i, m_i, n_skip = _key_block(acc, l_i, m_i, n_skip, q, q_scale, tl.load(idx_base + it), ks_base, k_src,
                                           k_row, sk_n, v_src, v_row, offs_m, offs_n, N_Q, N_K, neg_lam, BLOCK_N,
                                           False, IS_CAUSAL, PV_FP8, PV_SKIP, P_LOG2, EMULATE_FP8, TMA)
    if IS_CAUSAL:  # the blocks across the diagonal (and the partial last one), masked
        for it in range(n_full, count):
            acc, l_i, m_i, n_skip = _key_block(acc, l_i, m_i, n_skip, q, q_scale, tl.load(idx_base + it), ks_base,
                                               k_src, k_row, sk_n, v_src, v_row, offs_m, offs_n, N_Q, N_K, neg_lam,
                                               BLOCK_N, True, IS_CAUSAL, PV_FP8, PV_SKIP, P_LOG2, EMULATE_FP8, TMA)
    elif n_full < count:  # the partial last key block, masked
        acc, l_i, m_i, n_skip = _key_block(acc, l_i, m_i, n_skip, q, q_scale, tl.load(idx_base + n_full), ks_base,
                                           k_src, k_row, sk_n, v_src, v_row, offs_m, offs_n, N_Q, N_K, neg_lam,
                                           BLOCK_N, True, IS_CAUSAL, PV_FP8, PV_SKIP, P_LOG2, EMULATE_FP8, TMA)
    if FILL:
        if TMA:  # 2-D descriptors over (B*Hkv*NKC, HEAD_DIM) and (B*Hkv*HEAD_DIM, NKC), like K and V^T
            kbar_src = KBAR
            vbar_src = VBAR
            kbar_row = ((b * skb_b + hk * skb_h) // HEAD_DIM).to(tl.int32)
            vbar_row = ((b * svb_b + hk * svb_h) // NKC).to(tl.int32)
        else:
            kbar_src = KBAR + b * skb_b + hk * skb_h
            vbar_src = VBAR + b * svb_b + hk * svb_h
            kbar_row = 0
            vbar_row = 0
        acc, l_i, m_i = fill_skipped(acc, l_i, m_i, q_src, q_scale, kbar_src, kbar_row, KBS + b * sks2_b + hk * sks2_h,
                                     KVAR + b * skv_b + hk * skv_h, vbar_src, vbar_row,
                                     BIAS + b * sb_b + h * sb_h + pid_m * sb_q, NKC,
                                     tl.cdiv(N_K, BLOCK_N), tl.minimum(N_Q - pid_m * BLOCK_M, BLOCK_M).to(tl.float32),
                                     fill_clamp, offs_d, HEAD_DIM, P_LOG2, PV_FP8, EMULATE_FP8, TMA, FILL_BLOCK,
                                     FILL_STAGES)

    vs = tl.load(VS + b * svs_b + hk * svs_h + offs_d, mask=offs_d < D_OUT, other=0.0)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc * vs[None, :] / l_safe[:, None]
    rows = offs_m
    if HAS_PERM:  # scatter rows back to the caller's token order
        rows = tl.load(OPERM + offs_m, mask=offs_m < N_Q, other=0)
    o_ptr = caller_ptr(O, ADDRS, O_SLOT) + b * so_b + h * so_h + rows[:, None].to(tl.int64) * so_n + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D_OUT)[None, :])
    if PV_SKIP:
        tl.store(SKIP + b * sc_b + h * sc_h + pid_m, n_skip)
    if RETURN_LSE:
        # l carries 2^P_LOG2 (see _softmax_pv), so log2 sum_j 2^s_j = m + log2(l) - P_LOG2 over the
        # smoothed keys; adding q . mean(k) undoes the smoothing, so shards with different key means
        # merge. It is taken from the un-quantized q (rows in output order: the quantizer gathered
        # them the same way), as int8 q's rounding would not cancel here as it does in the softmax.
        # q is read here rather than kept live through the loop: fewer registers.
        # No key at all (causal, empty list): -inf. LSE (B,H,N_Q), KMEAN (B,Hkv,HEAD_DIM) contiguous.
        q_raw = tl.load(QRAW + b * sqr_b + h * sqr_h + rows[:, None].to(tl.int64) * sqr_n + offs_d[None, :],
                        mask=(offs_m < N_Q)[:, None] & (offs_d < D_OUT)[None, :], other=0.0)
        kmean = tl.load(KMEAN + (b * (H // KV_GROUP) + hk) * HEAD_DIM + offs_d)
        shift = tl.sum(q_raw.to(tl.float32) * kmean[None, :], 1) * lse_scale
        lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe) - P_LOG2, float("-inf")) + shift
        tl.store(LSE + (b * H + h) * N_Q + rows, lse2 * LN2, mask=offs_m < N_Q)


_attn = Kernel(_sparse_attn_fwd)


def sparse_attn_fwd(q_i8, k_i8, v_t, q_scale, k_scale, v_scale, counts, indices, pvthreshd,
                    n_q: int, n_k: int, d_out: int, out_dtype, is_causal: bool, pv_skip: bool,
                    config: KernelConfig, out_perm: torch.Tensor | None = None, fill: tuple | None = None,
                    lse_inputs: tuple | None = None, out: torch.Tensor | None = None, out_addr: tuple | None = None,
                    fill_clamp: float | None = None):
    """Launch the kernel on quantized inputs (kernels.quantize, quantize_v). Returns (out (B,H,n_q,d_out), a view of
    (B,n_q,H,d_out) memory, skipped (B,H,NQ) or None), and lse as a third item when lse_inputs is given.

    config: tiles and launch settings (kernels.config); its pv_fp8 is not read here, v_t's dtype
    (fp8 or fp16) decides the P.V type. TMA loads need contiguous K and V^T (else plain loads).
    out_perm (int32 (n_q,)): query row i is written to output row out_perm[i].
    fill (fill_skipped): (kbar, kbar_scale, kvar, vbar_t, bias): int8 mean keys (B,Hkv,NKC,head_dim) with
    one fp32 scale each (B,Hkv,NKC), the keys' channel variances summed per VAR_GROUPS groups in fp16
    (B,Hkv,NKC,VAR_GROUPS; kernels.quantize), mean values transposed like v_t (B,Hkv,head_dim,NKC)
    and in its dtype, fp32 biases (B,H,NQ,NKC); NKC a multiple of config.fill_block (FILL_PAD is); -inf
    biases add nothing, and the columns past the key blocks are not read. fill_clamp (with fill): the
    bound of the second-order term, log2 units (reference_predict.FILL_ORDER2_CLAMP).
    lse_inputs (q, k_mean, scale): the un-quantized q (B,H,n_q,d_out) in output row order (the
    caller's order when out_perm is also the permutation q was quantized through), the mean key
    (B,Hkv,d_out) fp32 that K was smoothed by (zeros if it was not) and the softmax scale. The kernel
    then also returns lse (B,H,n_q) fp32: per output row, the natural log of sum_j exp(scale * q.k_j)
    over what the row summed (kept blocks, fill means), the logsumexp flash attention returns; -inf
    for a row that summed nothing.
    out: where to write the output, else a new tensor: (B,H,n_q,d_out) in out_dtype, a transposed view of
    contiguous (B,n_q,H,d_out) memory, as the kernel would allocate it (a CUDA graph's caller owns it).
    out_addr (table, slot): write the output at the address table[slot] holds instead, in out's
    layout (kernels/caller_addrs.py)."""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a kernels.config.KernelConfig, got {type(config).__name__}")
    block_m, block_n = config.block_m, config.block_n
    B, H, nq_pad, hd = q_i8.shape
    Hkv = k_i8.shape[1]
    NQ = cdiv(n_q, block_m)
    if q_i8.dtype != torch.int8 or k_i8.dtype != torch.int8:
        raise ValueError("q and k must be int8 (quantize them with kernels.quantize.quant_pool)")
    if v_t.dtype not in (torch.float8_e4m3fn, torch.float16):
        raise ValueError("v must be fp8 e4m3 or fp16, transposed (B, H, D, N)")
    if H % Hkv or k_i8.shape[0] != B or v_t.shape[:3] != (B, Hkv, hd) or k_i8.shape[-1] != hd:
        raise ValueError(f"shape mismatch: q {tuple(q_i8.shape)}, k {tuple(k_i8.shape)}, v^T {tuple(v_t.shape)}")
    if hd > 128:
        raise ValueError("head dims above 128 are not supported (int8 dot sums must stay below 2^22)")
    if nq_pad != NQ * block_m or k_i8.shape[2] % block_n or v_t.shape[3] != k_i8.shape[2]:
        raise ValueError("quantized q/k/v must be padded to whole blocks")
    if counts.shape != (B, H, NQ) or indices.shape[:3] != (B, H, NQ) or counts.dtype != torch.int32:
        raise ValueError(f"block lists must be (B,H,{NQ}) int32 counts + (B,H,{NQ},NK) indices")
    if indices.shape[3] * block_n < n_k or indices.stride(-1) != 1:
        raise ValueError("index lists must cover every key block and be contiguous per row")
    if out_perm is not None and (out_perm.dtype != torch.int32 or out_perm.shape != (n_q,)):
        raise ValueError(f"out_perm must be int32 ({n_q},)")
    kbar, kbs, kvar, vbar, bias, nkc, fill_clamp = check_fill(fill, fill_clamp, v_t, B, H, Hkv, NQ, hd, n_k, block_n,
                                                              config.fill_block, counts)
    # without lse_inputs the lse arguments are stand-ins the kernel never reads (RETURN_LSE is off), as
    # for the other optional inputs above: a real tensor, not None, works on every Triton version
    lse = q_raw = kmean = None
    lse_scale, sqr = 0.0, (0, 0, 0)
    if lse_inputs is not None:
        q_raw, k_mean, lse_scale = lse_inputs
        if q_raw.shape != (B, H, n_q, d_out) or q_raw.stride(-1) != 1 or k_mean.shape != (B, Hkv, d_out):
            raise ValueError(f"lse_inputs want q ({B},{H},{n_q},{d_out}) contiguous in the head dim and k_mean "
                             f"({B},{Hkv},{d_out}), got {tuple(q_raw.shape)} and {tuple(k_mean.shape)}")
        kmean = torch.zeros(B, Hkv, hd, dtype=torch.float32, device=q_i8.device)
        kmean[..., :d_out] = k_mean
        lse = torch.empty(B, H, n_q, dtype=torch.float32, device=q_i8.device)
        sqr = (q_raw.stride(0), q_raw.stride(1), q_raw.stride(2))
        lse_scale = float(lse_scale) * 1.4426950408889634  # scores in log2 units, like the main loop
    # token-major memory, as flash attention returns it: ComfyUI's (B, N, H*D) is then a view of it
    # (a head-major output cost the node a copy of the whole output per call)
    if out is None:
        out = torch.empty(B, n_q, H, d_out, dtype=out_dtype, device=q_i8.device).transpose(1, 2)
    elif (out.shape != (B, H, n_q, d_out) or out.dtype != out_dtype or out.device != q_i8.device
          or not out.transpose(1, 2).is_contiguous()):
        raise ValueError(f"out must be ({B},{H},{n_q},{d_out}) {out_dtype} on {q_i8.device}, a transposed view of "
                         f"contiguous ({B},{n_q},{H},{d_out}) memory; got {tuple(out.shape)} {out.dtype}")
    # every program writes its own entry: no zero fill (a launch of its own on the host)
    skipped = torch.empty(B, H, NQ, dtype=torch.int32, device=q_i8.device) if pv_skip else counts
    pvt = pvthreshd.to(device=q_i8.device, dtype=torch.float32).contiguous()
    pv_fp8 = v_t.dtype == torch.float8_e4m3fn
    k_arg, v_arg = k_i8, v_t
    tma = config.tma and k_i8.is_contiguous() and v_t.is_contiguous()
    kbar_arg, vbar_arg = kbar, vbar
    if tma:
        k_arg = TensorDescriptor.from_tensor(k_i8.view(-1, hd), [block_n, hd])
        v_arg = TensorDescriptor.from_tensor(v_t.view(-1, v_t.shape[-1]), [hd, block_n])
        if nkc:  # the fill pass's means too (check_fill: contiguous)
            kbar_arg = TensorDescriptor.from_tensor(kbar.view(-1, hd), [config.fill_block, hd])
            vbar_arg = TensorDescriptor.from_tensor(vbar.view(-1, nkc), [hd, config.fill_block])
    addrs, o_slot = addr_args(out_addr, counts)
    stages = config.stages_for(is_causal, pv_skip)
    _attn[(B * H * NQ,)](
        q_i8, k_arg, v_arg, q_scale, k_scale, v_scale, out, addrs, out_perm if out_perm is not None else counts,
        counts, indices, skipped, pvt, kbar_arg, kbs, kvar, vbar_arg, bias, float(fill_clamp),
        *((lse, q_raw, kmean) if lse is not None else (counts, counts, counts)), *sqr, lse_scale,
        q_i8.stride(0), q_i8.stride(1), q_i8.stride(2), k_i8.stride(0), k_i8.stride(1), k_i8.stride(2),
        v_t.stride(0), v_t.stride(1), v_t.stride(2), out.stride(0), out.stride(1), out.stride(2),
        q_scale.stride(0), q_scale.stride(1), k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        counts.stride(0), counts.stride(1), indices.stride(0), indices.stride(1), indices.stride(2),
        kbar.stride(0) if nkc else 0, kbar.stride(1) if nkc else 0, kbs.stride(0) if nkc else 0,
        kbs.stride(1) if nkc else 0, kvar.stride(0) if nkc else 0, kvar.stride(1) if nkc else 0,
        vbar.stride(0) if nkc else 0, vbar.stride(1) if nkc else 0,
        bias.stride(0) if nkc else 0, bias.stride(1) if nkc else 0, bias.stride(2) if nkc else 0,
        n_q, n_k, H, H // Hkv, NQ, nkc,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=hd, D_OUT=d_out, IS_CAUSAL=is_causal,
        PV_FP8=pv_fp8, PV_SKIP=pv_skip, P_LOG2=8.0 if pv_fp8 else 0.0, EMULATE_FP8=INTERPRET,
        HAS_PERM=out_perm is not None, TMA=tma, FILL=nkc > 0, RETURN_LSE=lse is not None, O_SLOT=o_slot,
        FILL_BLOCK=config.fill_block, FILL_STAGES=config.fill_stages or stages, num_warps=config.num_warps,
        num_stages=stages, **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )
    if lse is not None:
        return out, (skipped if pv_skip else None), lse
    return out, (skipped if pv_skip else None)
