"""The fill_skipped pass of the attention kernel (kernels/attn_fwd.py): after the kept blocks, every
skipped key block joins a row's online softmax as one key, its mean key and mean value, scored
like sparge_core.reference_predict.fill_logits (the pooled query's lse bias and the second-order
term). Here: the pass itself (a @triton.jit helper the attention kernel calls with its running
max, sum and accumulator), its step and padding sizes, and the launcher's check of its inputs."""
import torch
import triton
import triton.language as tl

from .fp8 import p_operand
from .numerics import LN2
from .quantize import VAR_GROUPS

# The key-block means per step are the kernel config's fill_block (kernels/config.py). History
# (bench/NOTES.md): v18 128 spilled 66 registers, slower; v42-v43 the second-order term made 64 spill
# where 32 did not; v44 (the biases through the tensor cores) 64 fit and ran 3-4% faster than 32;
# v47 128 ran the pass ~7x slower: the loop's loads triple-buffered took the kernel's shared memory
# 73.8 -> 128 KB, one program per SM instead of three (v58); without the extra buffers (STAGES 1)
# 128 runs the pass ~10% faster than 64 on Hopper (v58)
BIAS_MAX = tl.constexpr(60000.0)  # log2 units: finite biases are held within +-this, inside fp16's range
FILL_PAD = 128  # the means and biases are padded to a multiple of this (of every config's fill_block)


@triton.jit
def fill_skipped(acc, l_i, m_i, q_src, q_scale, kbar_src, kbar_row, kbs_base, kvar_base, vbar_src, vbar_row, bias_base,
                 NKC, n_kb, n_rows, clamp, offs_d, HEAD_DIM: tl.constexpr, P_LOG2: tl.constexpr, PV_FP8: tl.constexpr,
                 EMULATE_FP8: tl.constexpr, TMA: tl.constexpr, FILL_BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Every key block with a finite bias joins the softmax as one key: its mean key (int8, one
    scale per mean: scores q . kbar + bias in log2 units, plus the second-order term of
    reference_predict.fill_logits: (q^2 - qbar^2) . var over VAR_GROUPS channel groups, times q's
    scale squared and ln 2 / 2, held within +-clamp through the variances) and its mean value
    (stored like V: transposed, fp8 in the operand's order or fp16), FILL_BLOCK means per step, on
    the same tensor-core paths as the main loop. The biases join the scores through an fp16 product
    as well, as a high and a low part (~22 bits; held within +-BIAS_MAX).
    Only the steps that hold some of the n_kb key blocks run: the means are padded to NKC columns
    (FILL_PAD), and a step of padding alone (biases -inf) would add exactly nothing
    (HunyuanVideo 544p: 528 blocks, 640 columns; at 64 means a step 10 steps -> 9, at 128 5 -> 5).
    TMA: the mean keys and values come by bulk tensor copies, as the main loop's K and V tiles:
    kbar_src and vbar_src are then 2-D descriptors over (B*Hkv*NKC, HEAD_DIM) and (B*Hkv*HEAD_DIM,
    NKC) and kbar_row / vbar_row this head's first row in them; else pointers to this head's means
    (rows 0). STAGES: the steps whose loads are in flight at once (tl.range's num_stages): each
    one more buffers the step's tiles in shared memory, which the whole kernel shares (NOTES v58)."""
    offs_c = tl.arange(0, FILL_BLOCK)
    # The first step's biases, loaded here so that the setup below (~1,000 instructions) hides
    # their latency; each step then loads the next one's (ncu: the first step waited for them, NOTES v69)
    bias_n = tl.load(bias_base + offs_c)
    offs_g = tl.arange(0, VAR_GROUPS)
    # the second-order term's operand: each row's squares less the squared mean of the block's
    # n_rows real rows (the padded rows are zeros), averaged over each group of channels, times
    # the term's factor, in fp16 for the tensor cores: (BLOCK_M, VAR_GROUPS), 4 registers a thread
    # where the whole diagonal's (BLOCK_M, HEAD_DIM) took 32 and spilled (v42).
    # Q's tile read again (8 KB from L2; volatile, or it is merged with the first load): using the
    # main loop's q here kept its registers live through that loop (sm_90: 8 more bytes spilled)
    q = tl.load(q_src, volatile=True)
    qi = q.to(tl.int32)
    qbar = tl.sum(qi, 0).to(tl.float32) / n_rows
    # each group's sum of q^2 in integers (exact: 32 channels of at most 127^2), less the group's sum
    # of qbar^2: the same operand as the mean of (q^2 - qbar^2) without converting every value to
    # float (64 I2F a thread on the conversion unit before, NOTES v69)
    sq = tl.sum(tl.reshape(qi * qi, (q.shape[0], VAR_GROUPS, HEAD_DIM // VAR_GROUPS)), 2)
    qb2 = tl.sum(tl.reshape(qbar * qbar, (VAR_GROUPS, HEAD_DIM // VAR_GROUPS)), 1)
    c2 = q_scale * q_scale * (0.5 * LN2)
    d2 = ((sq.to(tl.float32) - qb2[None, :]) * (VAR_GROUPS / HEAD_DIM) * c2).to(tl.float16)
    # the term's bound: the block's group variances capped at clamp over the largest row sum of
    # |d2| (real rows), so that |d2 . var| <= clamp for every row. Bounding the product itself
    # would need it as a tile of its own beside the scores (sm_90: 388 instructions per 32 means);
    # as the operands' bound it accumulates into the scores' tile (322; 301 with no bound at all,
    # which also drops the main loop's one 8-byte spill and measured 1.7% faster, NOTES v43)
    s_abs = tl.sum(tl.abs(d2.to(tl.float32)), 1)
    s_max = tl.max(tl.where(tl.arange(0, q.shape[0]) < n_rows, s_abs, 0.0), 0)
    cap = tl.minimum(clamp / tl.maximum(s_max, 1e-30), 65504.0).to(tl.float16)
    # the biases' product: ones in the first two columns against the biases' high and low parts in
    # the first two rows of a (VAR_GROUPS, FILL_BLOCK) tile. Added as a column vector in the
    # scores' layout, a bias took a register per column a thread holds (16 at 64 means a step)
    ones2 = tl.where(offs_g[None, :] < 2, 1.0, 0.0).to(tl.float16) + tl.zeros([q.shape[0], VAR_GROUPS], tl.float16)
    n_c = tl.cdiv(n_kb, FILL_BLOCK) * FILL_BLOCK
    for c0 in tl.range(0, n_c, FILL_BLOCK, num_stages=STAGES):
        # all-kept steps (every bias -inf) are computed too: testing for them measured slower (v18)
        bias = bias_n
        nxt = c0 + FILL_BLOCK  # the next step's biases, in flight during this step (none after the last)
        bias_n = tl.load(bias_base + nxt + offs_c, mask=nxt < n_c, other=0.0)
        kept = bias == float("-inf")
        finite = tl.where(kept, 0.0, tl.minimum(tl.maximum(bias, -BIAS_MAX), BIAS_MAX))
        hi = finite.to(tl.float16)
        lo = (finite - hi.to(tl.float32)).to(tl.float16)
        hi = tl.where(kept, float("-inf"), hi.to(tl.float32)).to(tl.float16)
        b2 = tl.where(offs_g[:, None] == 0, hi[None, :], tl.where(offs_g[:, None] == 1, lo[None, :], 0.0))
        if TMA:  # straight into shared memory, no per-thread addresses or registers
            kb = kbar_src.load([kbar_row + c0, 0]).T  # (HEAD_DIM, FILL_BLOCK)
        else:
            kb = tl.load(kbar_src + (c0 + offs_c)[None, :] * HEAD_DIM + offs_d[:, None])
        col_scale = q_scale * tl.load(kbs_base + c0 + offs_c)
        kv2 = tl.load(kvar_base + (c0 + offs_c)[None, :] * VAR_GROUPS + offs_g[:, None])  # (VAR_GROUPS, FILL_BLOCK)
        t = tl.dot(q, kb).to(tl.float32) * col_scale[None, :]
        t = tl.dot(d2, tl.minimum(kv2, cap), acc=t)
        t = tl.dot(ones2, b2.to(tl.float16), acc=t)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(t - (m_use - P_LOG2)[:, None])  # pre-scaled like the main loop's P
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            vb = vbar_src.load([vbar_row, c0]).T  # (FILL_BLOCK, HEAD_DIM)
        else:
            vb = tl.load(vbar_src + offs_d[None, :] * NKC + (c0 + offs_c)[:, None])
        acc = acc * alpha[:, None] + tl.dot(p_operand(p, PV_FP8, EMULATE_FP8), vb)
        m_i = m_new
    return acc, l_i, m_i


def check_fill(fill, fill_clamp, v_t, B: int, H: int, Hkv: int, NQ: int, hd: int, n_k: int, block_n: int,
               fill_block: int, stand_in: torch.Tensor):
    """The attention launcher's fill inputs checked (kernels.attn_fwd.sparse_attn_fwd's docstring):
    (kbar, kbar_scale, kvar, vbar, bias, NKC, clamp); without fill, stand_in for every tensor (the
    kernel never reads them), NKC 0 and clamp 0."""
    if fill is None:
        return stand_in, stand_in, stand_in, stand_in, stand_in, 0, 0.0
    kbar, kbs, kvar, vbar, bias = fill
    nkc = bias.shape[-1]
    if (kbar.dtype != torch.int8 or kbs.dtype != torch.float32 or kvar.dtype != torch.float16
            or vbar.dtype != v_t.dtype or bias.dtype != torch.float32 or kbar.shape != (B, Hkv, nkc, hd)
            or kbs.shape != (B, Hkv, nkc) or kvar.shape != (B, Hkv, nkc, VAR_GROUPS.value)
            or vbar.shape != (B, Hkv, hd, nkc)
            or bias.shape != (B, H, NQ, nkc) or nkc % fill_block or nkc * block_n < n_k
            or not all(x.is_contiguous() for x in (kbar, kbs, kvar, vbar, bias))):
        raise ValueError(f"fill wants contiguous int8 kbar (B,Hkv,NKC,{hd}), fp32 scales (B,Hkv,NKC), fp16 "
                         f"kvar (B,Hkv,NKC,{VAR_GROUPS.value}), vbar^T (B,Hkv,{hd},NKC) in v's dtype and fp32 bias "
                         f"(B,H,{NQ},NKC), NKC a multiple of {fill_block} covering the keys")
    if fill_clamp is None or not fill_clamp >= 0:
        raise ValueError(f"fill wants fill_clamp >= 0 (the second-order term's bound), got {fill_clamp}")
    return kbar, kbs, kvar, vbar, bias, nkc, float(fill_clamp)
